"""Hostile and careless clients: every malformed request is a 4xx saying why, never a 500 or a
crash; responses are bounded; slow or silent clients are timed out; large bodies are decoded
off the event loop; refusals say which limit refused; SIGTERM answers every request that
reached an open connection.

Most tests drive the ASGI app in this process (no sockets); those about the protocol
(timeouts, bad Content-Length, SIGTERM) use a live server on loopback and raw sockets."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from bitsmith.errors import ServingError
from bitsmith.runtime.artifact import NUMPY_DTYPES, TensorSpec
from bitsmith.serving import connections
from bitsmith.serving.batcher import StandingQueue
from bitsmith.serving.kserve import (
    decode_response,
    encode_request,
    encode_response,
    response_bytes_bound,
)
from bitsmith.serving.served import ServedModel
from bitsmith.serving.server import OFFLOAD_BYTES, ServeOptions, ServerState, create_app

from .fakes import expected, fake_model
from .live import Answer, LiveServer, metric, post, wait_for

LONG = ServeOptions(timeout_ms=30_000)


def int_model() -> ServedModel:
    """i: (B, 2) i32 -> o = i + 1."""
    return ServedModel("ints", [TensorSpec("i", ("B", 2), "i32")],
                       [TensorSpec("o", ("B", 2), "i32")], lambda i: [i + 1], max_batch=4)


def wide_model() -> ServedModel:
    """x: (B, N) f32 -> y = 2x, any N: as large a request and response as a test wants."""
    return ServedModel("wide", [TensorSpec("x", ("B", "N"), "f32")],
                       [TensorSpec("y", ("B", "N"), "f32")], lambda x: [x * 2], max_batch=2)


@contextlib.asynccontextmanager
async def serving(models: Sequence[ServedModel],
                  options: ServeOptions = LONG) -> AsyncIterator[tuple[Any, ServerState]]:
    """The app with its batchers started and warmed up, in this event loop."""
    app = create_app(models, options)
    state: ServerState = app.state.bitsmith
    async with state.lifespan(app):
        while not state.ready:
            await asyncio.sleep(0.01)
        yield app, state


async def call(app: Any, path: str, body: bytes | None = None) -> Answer:
    """One request straight to the ASGI app: POST `body`, or GET when None."""
    content = body or b""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET" if body is None else "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-length", str(len(content)).encode())]}
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": content, "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return Answer(sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:]))


def count(state: ServerState, model: str, code: int, reason: str) -> float:
    value = state.metrics.registry.get_sample_value(
        "bitsmith_requests_total", {"model": model, "code": str(code), "reason": reason})
    return value or 0.0


def tensor(**fields: Any) -> dict:
    """A valid input x of the fake model (one row), with `fields` replaced."""
    return {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3], **fields}


def request(**fields: Any) -> bytes:
    """A valid request to the fake model, with top-level `fields` replaced."""
    return orjson.dumps({"inputs": [tensor()], **fields})


def deep(levels: int, leaf: bytes = b"1", key: bytes | None = None) -> bytes:
    """`levels` nested lists (or objects under `key`) around `leaf`."""
    if key is None:
        return b"[" * levels + leaf + b"]" * levels
    return b'{"' + key + b'": ' * levels + leaf + b"}" * levels


VALID = request()
X = b'{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": '
MALFORMED: list[tuple[str, str, bytes]] = [
    # deep nesting, past orjson's limit of 1024 and just under it (where repr would recurse)
    ("deep lists outside data", "fake", b'{"inputs": ' + deep(100_000) + b"}"),
    ("deep lists inside data", "fake", b'{"inputs": [' + X + deep(100_000) + b"}]}"),
    ("deep objects", "fake", deep(100_000, key=b"inputs")),
    ("unclosed deep lists", "fake", b"[" * 100_000),
    ("1000-deep inputs", "fake", b'{"inputs": ' + deep(1000) + b"}"),
    ("1000-deep tensor", "fake", b'{"inputs": [' + deep(999) + b"]}"),
    ("1000-deep name", "fake", b'{"inputs": [{"name": ' + deep(998) + b"}]}"),
    ("1000-deep id", "fake", VALID[:-1] + b', "id": ' + deep(999) + b"}"),
    ("1000-deep outputs", "fake", VALID[:-1] + b', "outputs": ' + deep(999) + b"}"),
    ("1000-deep parameters", "fake", VALID[:-1] + b', "parameters": ' + deep(999) + b"}"),
    ("1000-deep shape", "fake", b'{"inputs": [{"name": "x", "shape": ' + deep(997) + b"}]}"),
    ("1000-deep data", "fake", b'{"inputs": [' + X + deep(997) + b"}]}"),
    ("1000-deep object in data", "fake",
     b'{"inputs": [' + X + b"[" + deep(995, key=b"a") + b", 2, 3]}]}"),
    # not JSON, or not an object
    ("empty body", "fake", b""),
    ("whitespace", "fake", b"  \n"),
    ("truncated", "fake", VALID[:-5]),
    ("trailing garbage", "fake", VALID + b" x"),
    ("non-UTF-8", "fake", b"\xff\xfe\x00{"),
    ("non-UTF-8 name", "fake", b'{"inputs": [{"name": "\xff\xfe"}]}'),
    ("NaN", "fake", b'{"inputs": [' + X + b"[NaN, 1, 2]}]}"),
    ("Infinity", "fake", b'{"inputs": [' + X + b"[Infinity, 1, 2]}]}"),
    ("-Infinity", "fake", b'{"inputs": [' + X + b"[-Infinity, 1, 2]}]}"),
    ("1e400", "fake", b'{"inputs": [' + X + b"[1e400, 1, 2]}]}"),
    ("a number", "fake", b"5"),
    ("a string", "fake", b'"inputs"'),
    ("null", "fake", b"null"),
    ("a list", "fake", b"[" + VALID + b"]"),
    ("duplicate keys, the last bad", "fake", VALID[:-1] + b', "inputs": 5}'),
    # wrong types everywhere
    ("inputs an object", "fake", orjson.dumps({"inputs": tensor()})),
    ("inputs a string", "fake", orjson.dumps({"inputs": "x"})),
    ("inputs null", "fake", orjson.dumps({"inputs": None})),
    ("inputs of numbers", "fake", orjson.dumps({"inputs": [1]})),
    ("name a number", "fake", orjson.dumps({"inputs": [tensor(name=1)]})),
    ("name a list", "fake", orjson.dumps({"inputs": [tensor(name=["x"])]})),
    ("a 1 MB name", "fake", orjson.dumps({"inputs": [tensor(name="n" * 2**20)]})),
    ("10k unknown names", "fake", orjson.dumps({"inputs": [tensor(name=f"n{i}")
                                                           for i in range(10_000)]})),
    ("datatype a number", "fake", orjson.dumps({"inputs": [tensor(datatype=32)]})),
    ("datatype a list", "fake", orjson.dumps({"inputs": [tensor(datatype=["FP32"])]})),
    ("datatype lower case", "fake", orjson.dumps({"inputs": [tensor(datatype="fp32")]})),
    ("shape a string", "fake", orjson.dumps({"inputs": [tensor(shape="1,3")]})),
    ("shape of floats", "fake", orjson.dumps({"inputs": [tensor(shape=[1.0, 3])]})),
    ("shape of bools", "fake", orjson.dumps({"inputs": [tensor(shape=[True, 3])]})),
    ("shape nested", "fake", orjson.dumps({"inputs": [tensor(shape=[[1], 3])]})),
    ("shape null", "fake", orjson.dumps({"inputs": [tensor(shape=None)]})),
    ("negative shape", "fake", orjson.dumps({"inputs": [tensor(shape=[-1, 3])]})),
    ("shape of rank 100k", "fake", orjson.dumps({"inputs": [tensor(shape=[1] * 100_000)]})),
    ("shape 2**70", "fake", b'{"inputs": [{"name": "x", "shape": [1180591620717411303424, 3], '
                            b'"datatype": "FP32", "data": [1, 2, 3]}]}'),
    ("shape over int64", "fake", orjson.dumps({"inputs": [tensor(shape=[2**64 - 1, 3])]})),
    ("shape product over int64", "wide",
     orjson.dumps({"inputs": [{"name": "x", "shape": [2**62, 2**62], "datatype": "FP32",
                               "data": [1, 2, 3]}]})),
    # empty data, where numpy would reshape to any dims a 0 dim makes hold no values
    *((f"empty data, shape {shape}", "wide",
       orjson.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}))
      for shape in ([0, 2**64 - 1], [0, 2**62], [0, 2**31 - 1], [0, 2**31], [1, 0], [0, 0],
                    [0, 3])),
    ("a 0 dim past the batch", "wide",
     orjson.dumps({"inputs": [{"name": "x", "shape": [2, 0], "datatype": "FP32",
                               "data": [[], []]}]})),
    ("too few values", "fake", orjson.dumps({"inputs": [tensor(data=[1, 2])]})),
    ("too many values", "fake", orjson.dumps({"inputs": [tensor(data=[1, 2, 3, 4])]})),
    ("data an object", "fake", orjson.dumps({"inputs": [tensor(data={"a": 1})]})),
    ("data a number", "fake", orjson.dumps({"inputs": [tensor(data=1)]})),
    ("data null", "fake", orjson.dumps({"inputs": [tensor(data=None)]})),
    ("data of strings", "fake", orjson.dumps({"inputs": [tensor(data=["1", "2", "3"])]})),
    ("data with null", "fake", orjson.dumps({"inputs": [tensor(data=[None, 2, 3])]})),
    ("data of bools", "fake", orjson.dumps({"inputs": [tensor(data=[True, False, True])]})),
    ("data of objects", "fake", orjson.dumps({"inputs": [tensor(data=[{}, {}, {}])]})),
    ("data ragged", "fake", orjson.dumps({"inputs": [tensor(data=[[1, 2], [3]])]})),
    ("data mixed depth", "fake", orjson.dumps({"inputs": [tensor(data=[1, [2, 3]])]})),
    ("2**70 for INT32", "ints", b'{"inputs": [{"name": "i", "shape": [1, 2], "datatype": '
                                b'"INT32", "data": [1180591620717411303424, 1]}]}'),
    ("2**64-1 for INT32", "ints", b'{"inputs": [{"name": "i", "shape": [1, 2], "datatype": '
                                  b'"INT32", "data": [18446744073709551615, 1]}]}'),
    ("2**31 for INT32", "ints", b'{"inputs": [{"name": "i", "shape": [1, 2], "datatype": '
                                b'"INT32", "data": [2147483648, 1]}]}'),
    ("1e10 for INT32", "ints", b'{"inputs": [{"name": "i", "shape": [1, 2], "datatype": '
                               b'"INT32", "data": [1e10, 1]}]}'),
    ("1.5 for INT32", "ints", b'{"inputs": [{"name": "i", "shape": [1, 2], "datatype": '
                              b'"INT32", "data": [1.5, 1]}]}'),
    ("id a number", "fake", request(id=7)),
    ("id an object", "fake", request(id={"a": 1})),
    # outputs
    ("outputs an object", "fake", request(outputs={"name": "y"})),
    ("outputs a string", "fake", request(outputs="y")),
    ("outputs of strings", "fake", request(outputs=["y"])),
    ("outputs of numbers", "fake", request(outputs=[1])),
    ("output name a number", "fake", request(outputs=[{"name": 1}])),
    ("output without a name", "fake", request(outputs=[{}])),
    ("unknown output", "fake", request(outputs=[{"name": "w"}])),
    ("output twice", "fake", request(outputs=[{"name": "y"}, {"name": "y"}])),
    ("an output 10k times", "fake", request(outputs=[{"name": "s"}] * 10_000)),
    # parameters
    ("parameters a number", "fake", request(parameters=5)),
    ("parameters a string", "fake", request(parameters="binary")),
    ("parameters a list", "fake", request(parameters=[{"a": 1}])),
    ("input parameters a list", "fake",
     orjson.dumps({"inputs": [tensor(parameters=[1])]})),
    ("output parameters a bool", "fake",
     request(outputs=[{"name": "y", "parameters": True}])),
]


def test_every_malformed_request_is_a_4xx_saying_why_and_never_reaches_the_model() -> None:
    model, recorder = fake_model()

    async def scenario() -> tuple[list[Answer], Answer, ServerState, int]:
        async with serving([model, int_model(), wide_model()]) as (app, state):
            warm = len(recorder.calls)
            answers = [await call(app, f"/v2/models/{m}/infer", body)
                       for _, m, body in MALFORMED]
            runs = len(recorder.calls) - warm
            after = await call(app, "/v2/models/fake/infer", VALID)
            return answers, after, state, runs

    answers, after, state, runs = asyncio.run(scenario())
    for (what, _, _), answer in zip(MALFORMED, answers, strict=True):
        assert 400 <= answer.status < 500, (what, answer.status, answer.body[:300])
        error = answer.json()["error"]
        assert error and len(error) < 1000, (what, error[:300])  # says why, briefly
    assert runs == 0, "a malformed request reached the model"
    assert after.status == 200, after.body
    invalid = sum(count(state, m, 400, "invalid") for m in ("fake", "ints", "wide"))
    assert invalid == len(MALFORMED)


def test_deep_nesting_is_refused_by_orjson_itself() -> None:
    """The server relies on orjson >= 3.9.15 refusing nesting past 1024 (older versions crash
    the process) and refuses to start with an older one."""
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(deep(1025))
    assert orjson.loads(deep(1024)) is not None


def test_an_orjson_that_crashes_on_deep_nesting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = fake_model()
    monkeypatch.setattr(orjson, "__version__", "3.8.3")
    with pytest.raises(ServingError, match=r"CVE-2024-27454.*orjson>=3\.9\.15"):
        create_app([model])


def test_outputs_are_answered_once_each() -> None:
    model, _ = fake_model()

    async def scenario() -> tuple[Answer, Answer]:
        async with serving([model]) as (app, _state):
            twice = await call(app, "/v2/models/fake/infer",
                               request(outputs=[{"name": "s"}, {"name": "y"}, {"name": "s"}]))
            both = await call(app, "/v2/models/fake/infer",
                              request(outputs=[{"name": "s"}, {"name": "y"}]))
            return twice, both

    twice, both = asyncio.run(scenario())
    assert twice.status == 400
    assert "output 's' is asked for twice in 'outputs'" in twice.json()["error"]
    assert both.status == 200
    assert [o["name"] for o in both.json()["outputs"]] == ["s", "y"]


def extreme_outputs() -> tuple[list[TensorSpec], list[np.ndarray]]:
    """One output per dtype, holding the values with the longest JSON text."""
    specs, arrays = [], []
    for dtype in ("bool", "u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64"):
        np_dtype = np.dtype(NUMPY_DTYPES[dtype])
        values = [False, True] if dtype == "bool" else [np.iinfo(np_dtype).min,
                                                        np.iinfo(np_dtype).max]
        specs.append(TensorSpec(f"o_{dtype}", (2,), dtype))
        arrays.append(np.array(values, np_dtype))
    f32 = np.array([-1.00000005e-38, -3.4028235e38, -1.4e-45, np.nan, -np.inf], np.float32)
    f64 = np.array([-2.2250738585072014e-308, -1.7976931348623157e308, 5e-324])
    bits = np.random.default_rng(0).integers(0, 2**32, 100_000, dtype=np.uint64)
    random32 = bits.astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore"):  # f32 extremes are inf in f16: written as null
        halves = (("f16", f32.astype(np.float16)), ("r16", random32.astype(np.float16)))
    for name, array in (("f32", f32), ("f64", f64), ("r32", random32), *halves):
        dtype = {"r32": "f32", "r16": "f16"}.get(name, name)
        specs.append(TensorSpec(f"o_{name}", (len(array),), dtype))
        arrays.append(array)
    return specs, arrays


def test_the_response_bound_holds_for_the_widest_values_of_every_dtype() -> None:
    specs, arrays = extreme_outputs()
    rid = "\x00\x01" * 50  # escaped as \u0000: six bytes each
    for spec, array in zip(specs, arrays, strict=True):
        body = encode_response("m" * 70, rid, [spec], [array])
        assert len(body) <= response_bytes_bound("m" * 70, rid, [spec], [array]), spec
    body = encode_response("m", rid, specs, arrays)
    assert len(body) <= response_bytes_bound("m", rid, specs, arrays)


def test_a_response_over_the_limit_is_refused_before_encoding() -> None:
    model, _ = fake_model()
    one = [np.zeros((1, 3), np.float32), np.zeros(1, np.float32)]
    specs = list(model.outputs)
    limit = response_bytes_bound("fake", None, specs, one)

    async def scenario() -> tuple[Answer, Answer, Answer, ServerState]:
        async with serving([model], ServeOptions(max_response_bytes=limit,
                                                 timeout_ms=30_000)) as (app, state):
            fits = await call(app, "/v2/models/fake/infer", request())
            over = await call(app, "/v2/models/fake/infer",
                              encode_request(["x"], [np.ones((2, 3), np.float32)]))
            fewer = await call(app, "/v2/models/fake/infer",
                               encode_request(["x"], [np.ones((2, 3), np.float32)])[:-1]
                               + b', "outputs": [{"name": "s"}]}')
            return fits, over, fewer, state

    fits, over, fewer, state = asyncio.run(scenario())
    assert fits.status == 200, fits.body
    assert over.status == 413
    error = over.json()["error"]
    assert f"over the limit of {limit} bytes (--max-response-mb)" in error
    assert count(state, "fake", 413, "response_too_large") == 1
    assert fewer.status == 200 and decode_response(fewer.body)["s"].tolist() == [3.0, 3.0]


def test_each_refusal_says_which_limit_refused() -> None:
    model, _ = fake_model()

    async def scenario() -> tuple[list[Answer], Answer, ServerState]:
        async with serving([model]) as (app, state):
            batcher = state.batchers["fake"]
            overloaded = StandingQueue("model fake is overloaded: ...", 2)
            batcher.refusal = lambda rows=1: overloaded  # type: ignore[method-assign]
            answers = [await call(app, "/v2/models/fake/infer", VALID)]
            batcher.ready = False
            answers.append(await call(app, "/v2/models/fake/infer", VALID))
            batcher.ready = True
            live = await call(app, "/v2/health/live")
            state.draining = True
            answers.append(await call(app, "/v2/models/fake/infer", VALID))
            answers.append(await call(app, "/v2/health/live"))
            return answers, live, state

    (standing, warming, draining, health), live, state = asyncio.run(scenario())
    assert standing.status == 503 and standing.headers["retry-after"] == "2"
    assert count(state, "fake", 503, "standing_queue") == 1
    assert count(state, "fake", 503, "queue_full") == 0
    assert warming.status == 503 and "warming up" in warming.json()["error"]
    assert count(state, "fake", 503, "warming") == 1
    assert draining.status == 503 and "shutting down" in draining.json()["error"]
    assert count(state, "fake", 503, "draining") == 1
    assert "connection" not in live.headers
    # draining, every response closes its connection: clients reconnect elsewhere
    assert draining.headers["connection"] == "close" and health.headers["connection"] == "close"
    assert health.status == 200


def test_large_bodies_are_decoded_off_the_event_loop() -> None:
    """While a 16 MiB body is decoded, the loop answers a small request; were it decoded on
    the loop, the small one would wait for it. (On a thread it would wait less, but still
    for seconds: orjson and numpy keep the GIL for a whole parse. No clock is read here.)"""
    n = 8 * 2**20
    big = (b'{"inputs": [{"name": "x", "shape": [1, ' + str(n).encode()
           + b'], "datatype": "FP32", "data": [' + b"0," * (n - 1) + b"0]}]}")
    assert len(big) > OFFLOAD_BYTES

    async def scenario() -> tuple[Answer, bool, Answer, list[Answer], ServerState]:
        async with serving([wide_model()]) as (app, state):
            large = asyncio.create_task(call(app, "/v2/models/wide/infer", big))
            await asyncio.sleep(0)  # it reads its body and hands it to a worker
            small = await call(app, "/v2/models/wide/infer",
                               encode_request(["x"], [np.ones((1, 4), np.float32)]))
            overtaken = not large.done()
            wide = np.arange(300_000, dtype=np.float32).reshape(1, -1)
            offloaded = [await call(app, "/v2/models/wide/infer", body) for body in (
                encode_request(["x"], [wide]),  # decoded and encoded by the worker
                encode_request(["x"], [wide])[:-3] + b"]}",  # and refused there
            )]
            return await large, overtaken, small, offloaded, state

    large, overtaken, small, (wide_ok, wide_bad), state = asyncio.run(scenario())
    assert small.status == 200 and overtaken, "the small request waited for the large one"
    # 8M floats could take 136 MB of JSON: refused before encoding
    assert large.status == 413 and "--max-response-mb" in large.json()["error"]
    assert wide_ok.status == 200, wide_ok.body[:300]
    np.testing.assert_array_equal(decode_response(wide_ok.body)["y"],
                                  np.arange(300_000, dtype=np.float32).reshape(1, -1) * 2)
    assert wide_bad.status == 400 and "malformed JSON" in wide_bad.json()["error"]
    assert count(state, "wide", 400, "invalid") == 1


# --- live: the protocol ---------------------------------------------------------------------

HEAD = (b"POST /v2/models/fake/infer HTTP/1.1\r\nhost: test\r\n"
        b"content-type: application/json\r\n")
REQUEST = HEAD + f"content-length: {len(VALID)}\r\n\r\n".encode() + VALID


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])),
                                    timeout=30)
    return sock


def read_answer(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a socket's file; ConnectionError at EOF."""
    status_line = stream.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection without an answer")
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, body


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_stalled_clients_are_timed_out_and_slow_ones_are_not() -> None:
    model, _ = fake_model()
    options = ServeOptions(body_timeout_s=0.3, header_timeout_s=0.3, timeout_ms=30_000)
    with LiveServer([model], options) as server:
        silent = [connect(server) for _ in range(20)]
        half_headers = [connect(server) for _ in range(20)]
        short_bodies = [connect(server) for _ in range(20)]
        for sock in half_headers:
            sock.sendall(HEAD)  # no blank line: the headers never end
        kept = [connect(server) for _ in range(5)]  # the same, after a first request
        for sock in kept:
            sock.sendall(REQUEST)
            assert read_answer(sock.makefile("rb"))[0] == 200
            sock.sendall(HEAD)
        for sock in short_bodies:
            sock.sendall(HEAD + b"content-length: 100\r\n\r\n" + VALID[:10])
        # a client sending at 10x the minimum rate, for longer than body_timeout_s
        slow = connect(server)
        body = VALID + b" " * (256 * 1024)
        slow.sendall(HEAD + f"content-length: {len(body)}\r\n\r\n".encode())
        for start in range(0, len(body), 64 * 1024):
            slow.sendall(body[start:start + 64 * 1024])
            time.sleep(0.1)
        slow_answer = read_answer(slow.makefile("rb"))
        for sock in silent:
            assert read_to_eof(sock) == b"", "a silent connection got an answer"
        for sock in half_headers + kept:
            answer = read_to_eof(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"--header-timeout-s" in answer
        for sock in short_bodies:
            status, headers, error = read_answer(sock.makefile("rb"))
            assert status == 408, (status, headers)
            assert "expected 100 bytes within 0.3 s" in orjson.loads(error)["error"]
            assert read_to_eof(sock) == b""
        assert metric(server, "bitsmith_requests_total", model="fake", code="408",
                      reason="body_timeout") == len(short_bodies)
        after = post(server.infer_url("fake"), VALID)
        for sock in [*silent, *half_headers, *kept, *short_bodies, slow]:
            sock.close()
    assert slow_answer[0] == 200, slow_answer
    assert after.status == 200


@pytest.mark.parametrize("header", [b"content-length: abc\r\n", b"content-length: -5\r\n",
                                    b"content-length: 5\r\ncontent-length: 7\r\n"])
def test_a_bad_content_length_is_a_400(header: bytes) -> None:
    model, _ = fake_model()
    with LiveServer([model], LONG) as server:
        sock = connect(server)
        sock.sendall(HEAD + header + b"\r\n" + VALID)
        status, _, _ = read_answer(sock.makefile("rb"))
        sock.close()
        assert status == 400
        assert post(server.infer_url("fake"), VALID).status == 200


def test_headers_past_the_limit_are_a_431_and_the_server_goes_on() -> None:
    """Header lines without end: httptools would keep them all; the protocol answers 431 once
    they pass MAX_HEADER_BYTES, whether they come at once or a line at a time."""
    model, _ = fake_model()
    with LiveServer([model], LONG) as server:
        line = b"x-filler: " + b"a" * 1000 + b"\r\n"
        at_once, by_line = connect(server), connect(server)
        at_once.sendall(HEAD + line * 100)
        by_line.sendall(HEAD)
        for _ in range(100):
            try:
                by_line.sendall(line)
            except OSError:  # closed by the server once past the limit
                break
        for sock in (at_once, by_line):
            answer = read_to_eof(sock)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
            assert b"over 65536 bytes" in answer
            sock.close()
        sock = connect(server)
        sock.sendall(HEAD + line * 20 + b"content-length: " + str(len(VALID)).encode()
                     + b"\r\n\r\n" + VALID)  # 20 KB of headers: within the limit
        assert read_answer(sock.makefile("rb"))[0] == 200
        sock.close()


def test_a_body_refused_while_it_is_sent_still_gets_its_answer() -> None:
    """413 from the Content-Length while the client keeps sending the body: the client reads
    its answer, and the server goes on."""
    model, _ = fake_model()
    with LiveServer([model], ServeOptions(max_body_bytes=4096, max_pending_body_bytes=4096,
                                          timeout_ms=30_000)) as server:
        for _ in range(3):
            sock = connect(server)
            sock.sendall(HEAD + b"content-length: 8000000\r\n\r\n")
            time.sleep(0.2)  # answered by now: the body arrives after the answer
            try:
                for _ in range(64):
                    sock.sendall(b" " * 65536)
            except OSError:  # the server stopped reading: the answer is there regardless
                pass
            status, _, error = read_answer(sock.makefile("rb"))
            assert status == 413 and "over the limit of 4096 bytes" in error.decode()
            sock.close()
        assert post(server.infer_url("fake"), VALID).status == 200


def test_a_content_length_shorter_than_the_body_is_a_400() -> None:
    """The body is cut short (malformed JSON) and the rest is not HTTP: whichever the server
    sees first, the answer is a 400."""
    model, _ = fake_model()
    with LiveServer([model], LONG) as server:
        sock = connect(server)
        sock.sendall(HEAD + b"content-length: 10\r\n\r\n" + VALID)
        status, _, _ = read_answer(sock.makefile("rb"))
        sock.close()
        assert status == 400
        assert post(server.infer_url("fake"), VALID).status == 200


def test_an_answer_sent_before_the_body_is_read_ends_the_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Routes that answer without reading the body (a GET, an unknown model) leave it
    outstanding: uvicorn's keep-alive timer, cancelled by its next byte, would never come back,
    and a client stalling there would hold the socket forever. The answer arrives, then EOF,
    and the socket is closed; a client that sends whole requests keeps its connection."""
    monkeypatch.setattr(connections, "REFUSED_LINGER_SECONDS", 0.05)
    model, _ = fake_model()
    with LiveServer([model], ServeOptions(header_timeout_s=60, timeout_ms=30_000)) as server:
        triggers = [(b"GET /v2/health/live HTTP/1.1\r\nhost: test\r\ncontent-length: 1000\r\n"
                     b"\r\n", 200),
                    (b"POST /v2/models/nope/infer HTTP/1.1\r\nhost: test\r\ncontent-length: "
                     b"1000000\r\n\r\n" + VALID, 404)]
        for head, status in triggers:
            sock = connect(server)
            sock.settimeout(10)  # a server that keeps it open fails here, not hangs
            stream = sock.makefile("rb")
            sock.sendall(head)
            assert read_answer(stream)[0] == status
            sock.sendall(b"x")  # one byte more of the body, then silence
            assert stream.read() == b"", "more than one answer"
            wait_for(lambda: not server.server.server_state.connections,
                     "the server closed the stalled connection")
            sock.close()
        kept = connect(server)
        stream = kept.makefile("rb")
        unknown = (b"POST /v2/models/nope/infer HTTP/1.1\r\nhost: test\r\ncontent-length: "
                   + str(len(VALID)).encode() + b"\r\n\r\n" + VALID)
        answers = []
        for whole in (b"GET /v2/health/live HTTP/1.1\r\nhost: test\r\n\r\n", REQUEST, unknown,
                      REQUEST):
            kept.sendall(whole)
            status, headers, _ = read_answer(stream)
            answers.append((status, headers.get("connection")))
        kept.close()
    assert answers == [(200, None), (200, None), (404, None), (200, None)]


def test_the_bodies_being_read_are_bounded_together() -> None:
    """A body counts against --max-pending-body-mb from its Content-Length (before any byte
    is read) or, chunked, as it arrives; over the budget it is refused 503 with Retry-After,
    and the budget is released when the read ends."""
    model, _ = fake_model()
    size = 100_000
    options = ServeOptions(max_body_bytes=150_000, max_pending_body_bytes=150_000,
                           timeout_ms=30_000)
    body = VALID + b" " * (size - len(VALID))
    whole = HEAD + f"content-length: {size}\r\n\r\n".encode()
    with LiveServer([model], options) as server:
        state = server.state
        first = connect(server)
        first.sendall(whole + body[:1000])
        wait_for(lambda: state.pending_body == size, "the first body was counted")
        declared, chunked = connect(server), connect(server)
        declared.sendall(whole)  # refused before its body is sent
        chunked.sendall(HEAD + b"transfer-encoding: chunked\r\n\r\n"
                        + f"{60_000:x}\r\n".encode() + b" " * 60_000 + b"\r\n")
        refused = [read_answer(sock.makefile("rb")) for sock in (declared, chunked)]
        first.sendall(body[1000:])
        first_answer = read_answer(first.makefile("rb"))
        wait_for(lambda: state.pending_body == 0, "the budget was released")
        third = connect(server)
        third.sendall(whole + body)
        third_answer = read_answer(third.makefile("rb"))
        budget = metric(server, "bitsmith_requests_total", model="fake", code="503",
                        reason="body_budget")
        for sock in (first, declared, chunked, third):
            sock.close()
    for status, headers, error in refused:
        assert status == 503 and int(headers["retry-after"]) >= 1, (status, headers)
        assert "expected at most 150000 (--max-pending-body-mb)" in orjson.loads(error)["error"]
    assert first_answer[0] == 200 and third_answer[0] == 200, (first_answer, third_answer)
    assert budget == 2


@pytest.mark.parametrize("sent", [
    REQUEST,
    HEAD + b"expect: 100-continue\r\ncontent-length: 5000000\r\n\r\n",  # waits for a 100
    HEAD + b"content-length: " + b"9" * 5000 + b"\r\n\r\n",
    HEAD + b"x-filler: " + b"a" * 70_000 + b"\r\n\r\n",  # over the reader's limit
    b"",  # silent
], ids=["whole", "expect-100-continue", "huge-content-length", "huge-headers", "silent"])
def test_the_drain_answers_every_backlog_connection_503(sent: bytes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "BACKLOG_READ_SECONDS", 0.2)
    monkeypatch.setattr(connections, "REFUSED_LINGER_SECONDS", 0.05)
    client, accepted = socket.socketpair()
    with client:
        client.sendall(sent)
        asyncio.run(connections._refuse_one(accepted))
        client.settimeout(10)
        answer = read_to_eof(client)
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
    assert b"retry-after: 1" in answer and answer.endswith(b"send to another replica\"}")


def test_during_the_grace_an_idle_keep_alive_connection_is_answered() -> None:
    """A client idle on a keep-alive connection at SIGTERM sends once the server has ticked
    (when uvicorn alone would have closed the connection): during the grace it gets a 503 and
    `Connection: close`, as does a new connection. A second signal ends the grace."""
    model, _ = fake_model()
    with LiveServer([model], ServeOptions(drain_grace_ms=600_000, timeout_ms=30_000)) as server:
        ticks: list[int] = []
        tick = server.server.on_tick

        async def counted(counter: int) -> bool:
            ticks.append(counter)
            return await tick(counter)

        server.server.on_tick = counted  # type: ignore[method-assign]
        idle = connect(server)
        stream = idle.makefile("rb")
        idle.sendall(REQUEST)
        status, headers, _ = read_answer(stream)
        assert status == 200 and "connection" not in headers
        server.server.handle_exit(signal.SIGTERM, None)
        seen = len(ticks)
        wait_for(lambda: len(ticks) >= seen + 3 or not server.thread.is_alive(),
                 "the server ticked")
        idle.sendall(REQUEST)
        status, headers, body = read_answer(stream)
        assert status == 503 and headers["connection"] == "close", (status, headers)
        assert b"shutting down" in body
        assert read_to_eof(idle) == b""
        fresh = connect(server)
        fresh.sendall(REQUEST)
        status, headers, _ = read_answer(fresh.makefile("rb"))
        assert status == 503 and headers["connection"] == "close", (status, headers)
        idle.close()
        fresh.close()
        server.server.handle_exit(signal.SIGTERM, None)
        server.thread.join(60)
        assert not server.thread.is_alive(), "a second signal did not end the grace"


def keep_alive_client(port: int, log: list, stop: threading.Event) -> None:
    """Send on one keep-alive connection until told `Connection: close`, then reconnect;
    log each answer and whether its connection was fresh; stop when refused or lost."""
    request = REQUEST
    sock = stream = None
    fresh = True
    while not stop.is_set():
        if sock is None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            except OSError:
                log.append(("refused", True))
                return
            stream, fresh = sock.makefile("rb"), True
        try:
            sock.sendall(request)
            status, headers, body = read_answer(stream)
        except OSError:
            log.append(("lost", fresh))
            return
        log.append((status, headers.get("connection"), body, fresh))
        fresh = False
        if headers.get("connection") == "close":
            sock.close()
            sock = None
    if sock is not None:
        sock.close()


def test_sigterm_answers_every_request_on_an_open_connection() -> None:
    """Clients send continuously on keep-alive connections through a SIGTERM: each request
    written to an open connection gets 200 or 503, none a closed connection. A fresh
    connection may be refused (or lost, if it crossed the listener's close: it never reached
    the server) once the grace is over."""
    model, _ = fake_model()
    options = ServeOptions(drain_grace_ms=1500, timeout_ms=30_000)
    logs: list[list] = [[] for _ in range(4)]
    stop = threading.Event()
    with LiveServer([model], options) as server:
        port = int(server.url.rsplit(":", 1)[1])
        clients = [threading.Thread(target=keep_alive_client, args=(port, log, stop))
                   for log in logs]
        for client in clients:
            client.start()
        wait_for(lambda: all(len(log) >= 3 for log in logs), "every client was answered")
        server.server.handle_exit(signal.SIGTERM, None)
        server.thread.join(60)
        assert not server.thread.is_alive(), "the server did not exit after the grace"
        stop.set()
        for client in clients:
            client.join(60)
    answers = [entry for log in logs for entry in log]
    lost = [entry for entry in answers if entry[0] == "lost" and not entry[1]]
    assert not lost, f"{len(lost)} request(s) on an open keep-alive connection got no answer"
    statuses = {entry[0] for entry in answers if entry[0] not in ("lost", "refused")}
    assert statuses == {200, 503}, statuses
    for _, connection, body, _ in (e for e in answers if e[0] == 503):
        assert connection == "close" and b"shutting down" in body


def test_the_options_refuse_nonsense() -> None:
    for field, value in (("body_timeout_s", 0), ("header_timeout_s", -1), ("min_body_rate", 0),
                         ("max_response_bytes", 0), ("drain_grace_ms", -1),
                         ("max_pending_body_bytes", 0)):
        with pytest.raises(ServingError, match=field):
            ServeOptions(**{field: value})
    with pytest.raises(ServingError, match=r"max_pending_body_bytes must be >= max_body_bytes"):
        ServeOptions(max_body_bytes=2**20, max_pending_body_bytes=2**20 - 1)


def test_fixtures_answer_as_the_fake_model() -> None:
    """The in-process driver sees what a client would: the fake model's outputs."""
    model, _ = fake_model()

    async def scenario() -> Answer:
        async with serving([model]) as (app, _state):
            return await call(app, "/v2/models/fake/infer", VALID)

    answer = asyncio.run(scenario())
    assert answer.status == 200
    np.testing.assert_array_equal(decode_response(answer.body)["y"],
                                  expected(np.array([[1, 2, 3]], np.float32))[0])
