"""Reliability under hostile input: crafted requests against `bitsmith serve`, damaged and
crafted artifacts against `bitsmith.load`, mutated IR text against `ir.parse`; then a load run
with 64 clients, a tenth of them sending invalid requests, and SIGTERM in the middle.

    python bench/hostile.py [--requests 400] [--artifacts 400] [--parser 3000]
                            [--load-seconds 8] [--json hostile.json]

Every case ends in one class:
- refused: a clean refusal (HTTP 4xx/503 with a JSON reason; ArtifactError; ParseError);
- accepted: valid input, answered, and the answer checked right (requests: against the
  artifact run in this process on the same input; artifacts: the original's output); IR
  text: parsed to a module;
- unchecked: a request answered 200 in a form this script's own decoder does not read (so
  only its outputs' shapes against their data are checked);
- crash: the server died, answered 500 or dropped the connection; any other exception type;
- hang: no answer within the limit;
- wrong: accepted, and the answer differs from the reference;
- code ran: a marker file that an injected payload would write exists afterwards.
Everything but the first three columns must be zero.

The load run counts, for each request sent: answered 200 and right, 200 and wrong, 4xx (the
invalid ones), 503 (after SIGTERM), lost (written to a connection and never answered),
refused connections (new connections after the listener closed: the client knows it was not
sent) and duplicated answers (an id answered twice).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from serving import Server, compile_model  # bench/serving.py

import bitsmith
from bitsmith.errors import ArtifactError, ParseError

CLASSES = ("refused", "accepted", "unchecked", "crash", "hang", "wrong", "code ran")
MARKER_NAME = "bitsmith-hostile-ran"


class Tally:
    """Outcome counts of one campaign, with a few examples of each bad outcome."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, outcome: str, what: str = "") -> None:
        self.counts[outcome] += 1
        if outcome not in ("refused", "accepted", "unchecked") and len(
                self.examples[outcome]) < 5:
            self.examples[outcome].append(what[:200])

    def row(self) -> str:
        total = sum(self.counts.values())
        return f"| {self.name} | {total} | " + " | ".join(str(self.counts[c]) for c in CLASSES) \
            + " |"


# ------------------------------------------------------------------ requests against a server

def http_request(body: bytes, *, path: str = "/v2/models/mlp/infer",
                 headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Type": "application/json",
            "Content-Length": str(len(body) if length is None else length), **(headers or {})}
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    return "\r\n".join(lines).encode() + body


async def exchange(port: int, raw: bytes, *, stall: float = 0.0,
                   limit: float = 20.0) -> tuple[str, int, bytes]:
    """Send `raw` on a fresh connection (then keep it open `stall` seconds without sending
    more), read one response: ("answer", status, body) / ("closed", 0, b"") / ("hang", ...)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "closed", 0, b""
    try:
        writer.write(raw)
        await writer.drain()
        if stall:
            await asyncio.sleep(stall)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), limit)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), limit)
        return "answer", status, body
    except TimeoutError:
        return "hang", 0, b""
    except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, IndexError):
        return "closed", 0, b""
    finally:
        writer.close()


def reference_input(doc: Any) -> np.ndarray | None:
    """The input a request for the mlp model means, decoded here independently of the server
    (only the plain form: FP32, a [B, 64] shape and that many numbers), else None."""
    try:
        tensor = doc["inputs"][0]
        if len(doc["inputs"]) != 1 or tensor.get("datatype") != "FP32":
            return None
        shape = tensor["shape"]
        flat = np.asarray(tensor["data"], dtype=np.float64).reshape(-1)
        if (not isinstance(shape, list) or len(shape) != 2 or shape[1] != 64 or shape[0] < 1
                or flat.size != shape[0] * 64):
            return None
        return flat.astype(np.float32).reshape(shape)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):
        return None


def crafted_bodies(valid: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
    """Requests an attacker or a careless client sends, by label."""
    def with_(**fields: Any) -> bytes:
        return orjson.dumps({**valid, **fields})
    data = valid["inputs"][0]["data"]
    tensor = valid["inputs"][0]
    yield "nested 100k outside data", b"[" * 100_000 + b"]" * 100_000
    yield "nested 300k unclosed", b"[" * 300_000
    yield "nested 5k in data", with_(inputs=[{**tensor, "data": "HOLE"}]).replace(
        b'"HOLE"', b"[" * 5000 + b"1" + b"]" * 5000)
    yield "nested 2k in parameters", orjson.dumps(valid)[:-1] + b', "parameters": ' + \
        b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}"
    yield "duplicate outputs x1000", with_(outputs=[{"name": "output0"}] * 1000)
    yield "unknown output", with_(outputs=[{"name": "nope"}])
    yield "outputs not a list", with_(outputs="output0")
    yield "NaN literal", orjson.dumps(valid).replace(b"[", b"[NaN,", 1)
    yield "1e400", with_(inputs=[{**tensor, "data": [1e308] * (len(data) - 1)}]).replace(
        b"1e308", b"1e400", 1)
    yield "2**70 in data", with_(inputs=[{**tensor, "data": [2**63 - 1] + data[1:]}]).replace(
        str(2**63 - 1).encode(), str(2**70).encode())
    yield "negative shape", with_(inputs=[{**tensor, "shape": [-4, 64]}])
    yield "shape overflows int64", with_(inputs=[{**tensor, "shape": [2**40, 2**40]}])
    yield "shape of strings", with_(inputs=[{**tensor, "shape": ["1", "64"]}])
    yield "data too short", with_(inputs=[{**tensor, "data": data[:-1]}])
    yield "data of strings", with_(inputs=[{**tensor, "data": ["1"] * len(data)}])
    yield "data of bools", with_(inputs=[{**tensor, "data": [True] * len(data)}])
    yield "datatype BYTES", with_(inputs=[{**tensor, "datatype": "BYTES"}])
    yield "two inputs", with_(inputs=[tensor, tensor])
    yield "no inputs", with_(inputs=[])
    yield "top-level number", b"12"
    yield "top-level string", b'"__import__(\\"os\\").system(\\"touch /tmp/x\\")"'
    yield "empty body", b""
    yield "not UTF-8", b"\xff\xfe" + orjson.dumps(valid)
    yield "injection in name", with_(inputs=[{**tensor, "name": "__import__('os').system("
                                              f"'touch /tmp/{MARKER_NAME}')"}])
    yield "id of 1 MiB", with_(id="x" * 2**20)
    yield "huge id number", with_(id="HOLE").replace(b'"HOLE"', b"1" + b"0" * 30)
    yield "duplicate keys", orjson.dumps(valid)[:-1] + b', "inputs": 5}'


JSON_BYTES = b'[]{}",:0123456789-.eE \x00\xff'


def mutate_bytes(body: bytes, rng: random.Random, alphabet: bytes = JSON_BYTES,
                 edits: int = 4, span: int = 40) -> bytes:
    """1..`edits` random edits: a byte replaced from `alphabet`, a run deleted, or a span of
    the text copied elsewhere."""
    data = bytearray(body)
    for _ in range(rng.randint(1, edits)):
        where = rng.randrange(len(data))
        choice = rng.random()
        if choice < 0.4:
            data[where] = rng.choice(alphabet)
        elif choice < 0.7:
            del data[where:where + rng.randint(1, span // 2)]
        else:
            data[where:where] = data[rng.randrange(len(data)):][:rng.randint(1, span)]
    return bytes(data)


def mutate_doc(doc: Any, rng: random.Random) -> Any:
    """A structural mutation: one node replaced by junk, deleted or duplicated."""
    doc = json.loads(json.dumps(doc))
    paths = list(_json_paths(doc))
    where = rng.choice([p for p in paths if p])
    parent = doc
    for step in where[:-1]:
        parent = parent[step]
    junk = [None, -1, 0, 2**64, 1.5, "", "x", [], {}, True, [1, 2], {"a": 1}, "FP64", "INT32",
            [-1, 64], [1, 64], [2, 32], 1e39]
    if isinstance(parent, list) and rng.random() < 0.3:
        parent.insert(where[-1], parent[where[-1]])
    elif isinstance(parent, dict) and rng.random() < 0.3:
        del parent[where[-1]]
    else:
        parent[where[-1]] = rng.choice(junk)
    return doc


def _json_paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _json_paths(value, (*prefix, key))
    elif isinstance(node, list) and len(node) <= 64:
        for i, value in enumerate(node):
            yield from _json_paths(value, (*prefix, i))


def classify_answer(kind: str, status: int, body: bytes, sent: bytes, model: Any) -> str:
    if kind != "answer":
        return "hang" if kind == "hang" else "crash"
    if status >= 500 and status != 503:
        return "crash"
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:  # uvicorn's own 400 for what is not HTTP: plain text
        return "refused" if 400 <= status < 500 and body.strip() else "crash"
    if status != 200:
        return "refused" if isinstance(answer.get("error"), str) and answer["error"] else "crash"
    try:
        doc = orjson.loads(sent)
    except orjson.JSONDecodeError:
        return "wrong"  # the server accepted what is not JSON
    x = reference_input(doc)
    if x is None:
        return "unchecked" if _consistent(answer) else "wrong"
    want = model(x)
    got = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(want.shape)
    same = np.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    return "accepted" if same else "wrong"


def _consistent(answer: Any) -> bool:
    """An answer we cannot recompute (a request form this decoder does not read): at least
    every output's data must match its shape."""
    try:
        return all(len(np.asarray(o["data"]).reshape(-1)) == int(np.prod(o["shape"]))
                   for o in answer["outputs"])
    except (KeyError, TypeError, ValueError):
        return False


def request_campaign(artifact: Path, n: int, seed: int) -> Tally:
    """Crafted bodies, raw-socket tricks and `n` mutated bodies against a live server."""
    tally = Tally("requests")
    model = bitsmith.load(artifact)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    valid = {"id": "r", "inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32",
                                    "data": [float(v) for v in x.reshape(-1)]}]}
    marker = Path(tempfile.gettempdir()) / MARKER_NAME
    marker.unlink(missing_ok=True)
    flags = ("--body-timeout-s", "2")
    server = Server(artifact, *flags).__enter__()
    pyrng = random.Random(seed)

    def send(raw: bytes, what: str, stall: float = 0.0, sent: bytes = b"") -> None:
        nonlocal server
        kind, status, body = asyncio.run(exchange(server.port, raw, stall=stall))
        outcome = classify_answer(kind, status, body, sent or raw.split(b"\r\n\r\n", 1)[-1],
                                  model)
        if server.proc.poll() is not None:  # it died: a crash, whatever the answer said
            outcome = "crash"
            server = Server(artifact, *flags).__enter__()
        tally.add(outcome, f"{what}: {kind} {status} {body[:120]!r}")

    for label, body in crafted_bodies(valid):
        send(http_request(body), label)
    # the socket, not the body: a body cut short, stalled headers, a lying Content-Length
    send(http_request(orjson.dumps(valid))[:-100], "body shorter than Content-Length",
         sent=b"-")
    send(http_request(orjson.dumps(valid), length=10**12), "Content-Length 10^12", sent=b"-")
    send(http_request(orjson.dumps(valid), length=-5), "negative Content-Length", sent=b"-")
    send(http_request(b"{}", headers={"Transfer-Encoding": "chunked"})[:-2],
         "chunked, never finished", sent=b"-")
    for i in range(n):
        doc_or_bytes = (mutate_doc(valid, pyrng) if i % 2 else
                        mutate_bytes(orjson.dumps(valid), pyrng))
        body = (doc_or_bytes if isinstance(doc_or_bytes, bytes)
                else json.dumps(doc_or_bytes).encode())
        send(http_request(body), f"mutation {i}", sent=body)
    server.__exit__()
    if marker.exists():
        tally.add("code ran", str(marker))
    return tally


# ------------------------------------------------------------------ artifacts

KEY = b"hostile-bench-key-0123456789abcdef"


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write(path: Path, items: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> None:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", method) as zf:
        warnings.simplefilter("ignore")  # duplicate names are the point of some cases
        for name, data in items:
            zf.writestr(name, data)


def _reseal(members: dict[str, bytes]) -> dict[str, bytes]:
    """Checksums and digest re-made, as an attacker who knows the format would; the signature
    is kept (it cannot be re-made without the key)."""
    manifest = json.loads(members["manifest.json"])
    listed = {n: d for n, d in members.items() if n not in ("manifest.json", "integrity.json")}
    manifest["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in listed.items()}
    manifest["sizes"] = {n: len(d) for n, d in listed.items()}
    raw = json.dumps(manifest).encode()
    sig = json.loads(members["integrity.json"]).get("signature")
    return {**members, "manifest.json": raw,
            "integrity.json": json.dumps({"digest": hashlib.sha256(raw).hexdigest(),
                                          "signature": sig}).encode()}


def _edit(members: dict[str, bytes], change: Callable[[dict], None]) -> dict[str, bytes]:
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    return {**members, "manifest.json": json.dumps(manifest).encode()}


def evil_library(directory: Path, marker: Path) -> bytes:
    """A shared object whose ELF constructor creates `marker` when it is mapped."""
    source = directory / "evil.c"
    source.write_text("#include <stdio.h>\n__attribute__((constructor)) static void run(void)"
                      f' {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    lib = directory / "evil.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return lib.read_bytes()


def artifact_cases(path: Path, signed: Path, evil: bytes, n: int,
                   seed: int) -> Iterator[tuple[str, list[tuple[str, bytes]] | bytes, bool]]:
    """(label, the damaged file (zip members, or raw bytes), load with the key?)."""
    rng = random.Random(seed)
    plain, sealed = _members(path), _members(signed)
    raw = path.read_bytes()
    yield "zip slip ../", list(_reseal({**plain, "lib/../../x.so": b"x"}).items()), False
    yield "absolute member", list({**plain, "/tmp/x.so": b"x"}.items()), False
    yield "duplicate member", [*plain.items(), ("lib/kernels.so", evil)], False
    yield "zip bomb", [*_reseal({**plain, "lib/z.so": bytes(256 * 2**20)}).items()], False
    yield "ELF constructor, stale checksum", list({**plain, "lib/kernels.so": evil}.items()), \
        False
    yield "ELF constructor, resealed, signed", list(_reseal({**sealed, "lib/kernels.so": evil})
                                                    .items()), True
    yield "steps reversed", list(_edit(plain, lambda m: m["plan"]["steps"].reverse()).items()), \
        False
    yield "steps reversed, resealed", list(_reseal(_edit(
        plain, lambda m: m["plan"]["steps"].reverse())).items()), False

    def swap(m: dict) -> None:
        names = m["plan"]["weights"]
        a, b = sorted(names)[:2]
        names[a], names[b] = names[b], names[a]
    yield "weights swapped", list(_edit(plain, swap).items()), False
    yield "weights swapped, resealed, signed", list(_reseal(_edit(sealed, swap)).items()), True
    weights = bytearray(sealed["weights.safetensors"])
    weights[-4:] = b"\x00\x00\x80\x7f"
    yield "weight edited, resealed, signed", list(_reseal(
        {**sealed, "weights.safetensors": bytes(weights)}).items()), True
    yield "not a zip", b"PK\x03\x04" + bytes(100), False
    yield "empty file", b"", False
    doc = json.loads(plain["manifest.json"])
    paths = [p for p in _json_paths(doc) if p]
    junk = [None, "", -1, 2**70, 1e308, [], {}, "B", "../x", True, [[[[[]]]]], "(B*", 0]
    for i in range(n):
        kind = i % 4
        if kind == 0:
            where = rng.randrange(len(raw))
            yield "byte flip", raw[:where] + bytes([raw[where] ^ 0x10]) + raw[where + 1:], False
        elif kind == 1:
            yield "truncated", raw[:rng.randrange(len(raw))], False
        else:
            where = rng.choice(paths)

            def change(m: dict, where: tuple = where) -> None:
                parent = m
                for step in where[:-1]:
                    parent = parent[step]
                if isinstance(parent, dict) and rng.random() < 0.3:
                    del parent[where[-1]]
                else:
                    parent[where[-1]] = rng.choice(junk)
            edited = _edit(plain, change)
            yield ("manifest field, resealed" if kind == 2 else "manifest field, stale digest",
                   list((_reseal(edited) if kind == 2 else edited).items()), False)


def artifact_campaign(artifact: Path, n: int, seed: int, workdir: Path) -> Tally:
    tally = Tally("artifacts")
    x = np.random.default_rng(seed).standard_normal((3, 64)).astype(np.float32)
    original = bitsmith.load(artifact)
    want = original(x)
    signed = workdir / "signed.bsm"
    original.save(signed, key=KEY)
    marker = workdir / "constructor-ran"
    evil = evil_library(workdir, marker)
    bad = workdir / "bad.bsm"
    for label, content, keyed in artifact_cases(artifact, signed, evil, n, seed):
        if isinstance(content, bytes):
            bad.write_bytes(content)
        else:
            _write(bad, content, zipfile.ZIP_DEFLATED if label == "zip bomb" else
                   zipfile.ZIP_STORED)
        start = time.perf_counter()
        try:
            got = bitsmith.load(bad, key=KEY if keyed else None)(x)
            outcome = "accepted" if np.array_equal(got, want) else "wrong"
        except ArtifactError:
            outcome = "refused"
        except Exception as exc:  # noqa: BLE001 - the campaign counts these
            outcome, label = "crash", f"{label}: {type(exc).__name__}: {exc}"
        if time.perf_counter() - start > 30:
            outcome = "hang"
        if marker.exists():
            outcome = "code ran"
            marker.unlink()
        tally.add(outcome, label)
    return tally


# ------------------------------------------------------------------ IR text

PAYLOADS = ["(__import__('os').system('touch /tmp/" + MARKER_NAME + "'))",
            "(9**9**9)", "(lambda: 1)()", "(().__class__.__base__)", "(" * 5000 + "B" + ")" * 5000,
            "(" + "9" * 5000 + ")", "(B" + "*B" * 5000 + ")", "1e999", "-1", "(B/0)"]


def parser_campaign(n: int, seed: int) -> Tally:
    """Printed modules, mutated (characters, tokens, spans, injected dim payloads)."""
    import torch  # noqa: PLC0415 - only to print real modules

    from bitsmith.frontend import from_torch  # noqa: PLC0415
    from bitsmith.ir import parse, print_module  # noqa: PLC0415

    tally = Tally("IR text")
    texts = []
    for dims in (False, True):
        net = torch.nn.Sequential(torch.nn.Linear(9, 5), torch.nn.GELU(), torch.nn.LayerNorm(5))
        texts.append(print_module(from_torch(net, (torch.randn(3, 9),), dynamic_batch=dims)))
    rng = random.Random(seed)
    marker = Path(tempfile.gettempdir()) / MARKER_NAME
    marker.unlink(missing_ok=True)
    for i in range(n):
        text = rng.choice(texts)
        if i % 5 == 0:
            mutated = text.replace("x", "x" + rng.choice(PAYLOADS) + "x", 1)
        else:
            mutated = mutate_bytes(text.encode(), rng, b"<>(){}[]x%:=,\"'0123456789-+*/BS \n",
                                   edits=5, span=60).decode(errors="replace")
        start = time.perf_counter()
        try:
            parse(mutated)
            outcome = "accepted"
        except ParseError:
            outcome = "refused"
        except Exception as exc:  # noqa: BLE001 - the campaign counts these
            outcome = "crash"
            mutated = f"{type(exc).__name__}: {exc}: {mutated[:100]}"
        if time.perf_counter() - start > 5:
            outcome = "hang"
        tally.add(outcome, mutated)
    if marker.exists():
        tally.add("code ran", str(marker))
    return tally


# ------------------------------------------------------------------ load run with SIGTERM

async def _client(port: int, cid: int, inputs: np.ndarray, wants: np.ndarray, end: float,
                  counts: collections.Counter, answered: set[str], invalid_every: int) -> None:
    """One keep-alive client: requests back to back, reconnecting when the server closes."""
    rng = random.Random(cid)
    reader = writer = None
    n = 0
    while time.monotonic() < end:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["connection refused (not sent)"] += 1
                await asyncio.sleep(0.05)
                continue
        assert reader is not None
        n += 1
        rid = f"c{cid}-{n}"
        row = rng.randrange(len(inputs))
        invalid = rng.randrange(invalid_every) == 0
        shape = [1, 63] if invalid else [1, 64]
        data = inputs[row].reshape(-1)[:63] if invalid else inputs[row].reshape(-1)
        body = orjson.dumps({"id": rid, "inputs": [{"name": "x", "shape": shape,
                                                    "datatype": "FP32", "data": data.tolist()}]})
        counts["sent"] += 1
        try:
            writer.write(http_request(body, headers={"Connection": "keep-alive"}))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            answer = orjson.loads(await asyncio.wait_for(reader.readexactly(length), 30))
            close = b"connection: close" in head.lower()
        except TimeoutError:
            counts["lost (no answer in 30 s)"] += 1
            writer.close()
            reader = writer = None
            continue
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            counts["lost (connection dropped)"] += 1
            writer.close()
            reader = writer = None
            continue
        if status == 200:
            got_id = answer.get("id")
            if got_id in answered:
                counts["duplicated"] += 1
            answered.add(str(got_id))
            got = np.asarray(answer["outputs"][0]["data"], np.float32)
            right = (got_id == rid and not invalid
                     and np.allclose(got, wants[row].reshape(-1), rtol=1e-4, atol=1e-5))
            counts["200 right" if right else "200 wrong"] += 1
        elif 400 <= status < 500:
            counts["4xx (invalid sent)" if invalid else "4xx (valid sent!)"] += 1
        elif status == 503:  # no Retry-After wait: reconnecting at once is the harder case
            counts["503"] += 1
        else:
            counts[f"{status}"] += 1
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def load_run(artifact: Path, seconds: float, clients: int, seed: int) -> dict[str, Any]:
    """`clients` keep-alive clients for `seconds`, a tenth of requests invalid, SIGTERM to the
    server half way through; the counts, and the server's exit code."""
    model = bitsmith.load(artifact)
    inputs = np.random.default_rng(seed).standard_normal((256, 1, 64)).astype(np.float32)
    wants = np.stack([model(x) for x in inputs])
    counts: collections.Counter[str] = collections.Counter()
    answered: set[str] = set()
    server = Server(artifact).__enter__()

    async def main() -> None:
        end = time.monotonic() + seconds
        tasks = [asyncio.create_task(_client(server.port, c, inputs, wants, end, counts,
                                             answered, 10)) for c in range(clients)]
        await asyncio.sleep(seconds / 2)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
    asyncio.run(main())
    code = server.proc.wait(60)
    return {"counts": dict(counts), "server_exit": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="mutated request bodies")
    parser.add_argument("--artifacts", type=int, default=400, help="damaged artifacts")
    parser.add_argument("--parser", type=int, default=3000, help="mutated IR texts")
    parser.add_argument("--load-seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        artifact = compile_model("mlp", workdir)
        tallies = [request_campaign(artifact, args.requests, args.seed),
                   artifact_campaign(artifact, args.artifacts, args.seed, workdir),
                   parser_campaign(args.parser, args.seed)]
        load = load_run(artifact, args.load_seconds, args.clients, args.seed)
    print(f"hostile input, seed {args.seed}, {os.cpu_count()} cores\n")
    print("| campaign | cases | " + " | ".join(CLASSES) + " |")
    print("|---" * (len(CLASSES) + 2) + "|")
    for tally in tallies:
        print(tally.row())
    for tally in tallies:
        for outcome, examples in tally.examples.items():
            print(f"\n{tally.name}, {outcome}:", *examples, sep="\n  ")
    print(f"\nload run: {args.clients} clients, {args.load_seconds:g} s, a tenth invalid, "
          f"SIGTERM at {args.load_seconds / 2:g} s; server exit code {load['server_exit']}\n")
    print("| outcome | requests |\n|---|---|")
    for outcome, count in sorted(load["counts"].items()):
        print(f"| {outcome} | {count} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "campaigns": {t.name: dict(t.counts) for t in tallies},
            "examples": {t.name: t.examples for t in tallies}, "load": load}, indent=1))


if __name__ == "__main__":
    main()
