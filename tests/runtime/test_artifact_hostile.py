"""Crafted and damaged artifacts: refused with ArtifactError before any of their native code is
loaded, never written outside their folder, never loaded into wrong answers.

A real artifact (a small MLP compiled here) is taken apart and put back together the way an
attacker or a careless tool would: members renamed, duplicated, compressed into bombs, the
manifest edited with and without its digest re-sealed, libraries swapped for ones with ELF
constructors, steps reordered, weights swapped, the host's instruction sets taken away.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import bitsmith
from bitsmith.runtime import model as runtime_model
from bitsmith.runtime.artifact import Artifact, ArtifactError, load_artifact

KEY = b"k" * 32


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(12, 20)
        self.b = torch.nn.Linear(20, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.softmax(self.a(x), dim=-1)) * 3.0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A saved artifact (unsigned), an input and the right answer."""
    torch.manual_seed(0)
    x = torch.randn(3, 12)
    cm = bitsmith.compile(Net().eval(), (x,))
    path = tmp_path_factory.mktemp("art") / "net.bsm"
    cm.save(path)
    return path, x.numpy(), cm(x.numpy())


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write(path: Path, members: dict[str, bytes] | list[tuple[str, bytes]],
           compress: int = zipfile.ZIP_STORED) -> None:
    items = members.items() if isinstance(members, dict) else members
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in items:
            zf.writestr(name, data)


def _reseal(members: dict[str, bytes]) -> None:
    """Re-write the member checksums and the manifest's digest, as an attacker who knows the
    format would; the signature stays as it was (it cannot be remade without the key)."""
    manifest = json.loads(members["manifest.json"])
    listed = {n: d for n, d in members.items() if n not in ("manifest.json", "integrity.json")}
    manifest["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in listed.items()}
    manifest["sizes"] = {n: len(d) for n, d in listed.items()}
    raw = json.dumps(manifest).encode()
    members["manifest.json"] = raw
    sig = json.loads(members["integrity.json"])["signature"]
    members["integrity.json"] = json.dumps({"digest": hashlib.sha256(raw).hexdigest(),
                                            "signature": sig}).encode()


def _edit_manifest(members: dict[str, bytes], change: Callable[[dict], None]) -> None:
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()


def test_member_paths_never_leave_the_folder(built, tmp_path: Path) -> None:
    path, _, _ = built
    for evil in ("lib/../../escaped.so", "lib//tmp/escaped.so", "/tmp/escaped.so",
                 "lib/sub/dir.so"):
        members = _members(path)
        members[evil] = b"\x7fELF"
        bad = tmp_path / "bad.bsm"
        _write(bad, members)
        with pytest.raises(ArtifactError, match="not listed in the manifest"):
            bitsmith.load(bad)
        _reseal(members)  # listed now: the name itself is refused
        _write(bad, members)
        with pytest.raises(ArtifactError, match="neither weights.safetensors nor lib/"):
            bitsmith.load(bad)
    art = Artifact(load_artifact(path).manifest, {}, {"../escaped.so": b"x"})
    inner = tmp_path / "inner"
    inner.mkdir()
    with pytest.raises(ArtifactError, match="must be a plain file name"):
        art.extract_libraries(inner)
    assert not (tmp_path / "escaped.so").exists() and not Path("/tmp/escaped.so").exists()


def test_duplicate_members_and_bombs_are_refused_before_reading(built, tmp_path: Path) -> None:
    path, _, _ = built
    members = _members(path)
    bad = tmp_path / "dup.bsm"
    _write(bad, [*members.items(), ("lib/kernels.so", b"second copy")])
    with pytest.raises(ArtifactError, match="appears twice"):
        bitsmith.load(bad)
    members["lib/zeros.so"] = bytes(64 * 2**20)  # 64 MiB of zeros deflate to ~64 KiB
    _reseal(members)
    _write(bad, members, zipfile.ZIP_DEFLATED)
    with pytest.raises(ArtifactError, match="zip bomb"):
        bitsmith.load(bad)


def test_a_size_a_zip_header_lies_about_is_refused_before_reading(built, tmp_path) -> None:
    """The weights' central-directory entry claims 4 GiB (stored, so 4 GiB compressed too):
    refused against the manifest's size (and the file's) before any of it is read or
    allocated, signed or not."""
    path, _, _ = built
    data = bytearray(path.read_bytes())
    name = b"weights.safetensors"
    at = data.index(b"PK\x01\x02")  # the central directory's entries, after the members
    while data[at + 46:at + 46 + len(name)] != name:
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + 20:at + 28] = (0xF0000000).to_bytes(4, "little") * 2  # compressed, file size
    bad = tmp_path / "liar.bsm"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors claims 4026531840 bytes"):
        bitsmith.load(bad)


def test_manifest_edits_fail_the_digest_and_plan_edits_fail_the_plan(built, tmp_path) -> None:
    path, x, want = built
    bad = tmp_path / "edit.bsm"
    members = _members(path)
    _edit_manifest(members, lambda m: m["plan"]["steps"].reverse())
    _write(bad, members)
    with pytest.raises(ArtifactError, match="does not match its digest"):
        bitsmith.load(bad)
    _reseal(members)  # a careless tool re-seals: the plan check still refuses it
    _write(bad, members)
    with pytest.raises(ArtifactError, match="before any step computes it"):
        bitsmith.load(bad)
    members = _members(path)
    del members["integrity.json"]
    _write(bad, members)
    with pytest.raises(ArtifactError, match="missing member integrity.json"):
        bitsmith.load(bad)

    def swap_weights(m: dict) -> None:
        names = m["plan"]["weights"]
        first, second = sorted(names)[:2]
        names[first], names[second] = names[second], names[first]
    members = _members(path)
    _edit_manifest(members, swap_weights)
    _reseal(members)
    _write(bad, members)
    with pytest.raises(ArtifactError, match=r"weight .* holds \d+ element\(s\), the plan"):
        bitsmith.load(bad)
    np.testing.assert_array_equal(bitsmith.load(path)(x), want)  # the original still runs


def test_a_malformed_integrity_member_is_refused(built, tmp_path: Path) -> None:
    path, _, _ = built
    bad = tmp_path / "integrity.bsm"
    for doc in ({"digest": "\u00e9" * 64}, {"digest": 5}, [], {"digest": "ab" * 32 + "\u00e9"}):
        _write(bad, list({**_members(path), "integrity.json": json.dumps(doc).encode()}.items()))
        with pytest.raises(ArtifactError, match="integrity.json is malformed"):
            bitsmith.load(bad)
    members = _members(path)
    digest = json.loads(members["integrity.json"])["digest"]
    members["integrity.json"] = json.dumps({"digest": digest, "signature": "\u00e9"}).encode()
    _write(bad, list(members.items()))
    with pytest.raises(ArtifactError, match="not signed"):
        bitsmith.load(bad, key=KEY)


def test_signed_artifacts_refuse_any_change_and_any_other_key(built, tmp_path: Path) -> None:
    path, x, want = built
    signed = tmp_path / "signed.bsm"
    bitsmith.load(path).save(signed, key=KEY)
    loaded = bitsmith.load(signed, key=KEY)
    assert loaded.artifact.signed
    np.testing.assert_array_equal(loaded(x), want)
    with pytest.raises(ArtifactError, match="signature does not match the key"):
        bitsmith.load(signed, key=b"x" * 32)
    with pytest.raises(ArtifactError, match="not signed, and a key was given"):
        bitsmith.load(path, key=KEY)
    with pytest.raises(ArtifactError, match="at least 16 bytes"):
        bitsmith.load(signed, key=b"short")
    members = _members(signed)
    weights = bytearray(members["weights.safetensors"])
    weights[-4:] = b"\x00\x00\x80\x7f"  # the last f32 becomes inf
    members["weights.safetensors"] = bytes(weights)
    _reseal(members)  # every checksum and the digest right: only the signature can tell
    _write(signed, members)
    with pytest.raises(ArtifactError, match="signature does not match the key"):
        bitsmith.load(signed, key=KEY)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_library_with_a_constructor_never_runs(built, tmp_path: Path) -> None:
    """An ELF constructor runs as the library is mapped: the checks must refuse the artifact
    before that, when its checksum or signature is wrong."""
    path, _, _ = built
    marker = tmp_path / "ran"
    source = tmp_path / "evil.c"
    source.write_text("#include <stdio.h>\n__attribute__((constructor)) static void run(void)"
                      f' {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    lib = tmp_path / "evil.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True,
                   timeout=60)
    bad = tmp_path / "evil.bsm"
    members = _members(path)
    members["lib/kernels.so"] = lib.read_bytes()
    _write(bad, members)
    with pytest.raises(ArtifactError, match=r"member lib/kernels\.so claims \d+ bytes .*the "
                                            r"manifest says \d+"):
        bitsmith.load(bad)
    members["lib/kernels.so"] += bytes(len(_members(path)["lib/kernels.so"]) - lib.stat().st_size)
    _write(bad, members)  # the size the manifest says: the checksum refuses it
    with pytest.raises(ArtifactError, match="checksum mismatch for lib/kernels.so"):
        bitsmith.load(bad)
    signed = tmp_path / "signed.bsm"
    bitsmith.load(path).save(signed, key=KEY)
    members = _members(signed)
    members["lib/kernels.so"] = lib.read_bytes()
    _reseal(members)
    _write(bad, members)
    with pytest.raises(ArtifactError, match="signature does not match"):
        bitsmith.load(bad, key=KEY)
    assert not marker.exists()


def test_an_artifact_records_and_checks_the_instruction_sets(built, monkeypatch) -> None:
    path, _, _ = built
    requires = load_artifact(path).manifest.requires
    host = runtime_model.host_description()
    assert requires["isa"] and set(requires["isa"]) <= set(host["isa"])
    assert not any(flag.startswith("amx") for flag in requires["isa"])
    lacking = {**host, "isa": [f for f in host["isa"] if f != requires["isa"][-1]]}
    monkeypatch.setattr(runtime_model, "host_description", lambda: lacking)
    with pytest.raises(ArtifactError, match=f"compiled for a CPU with {requires['isa'][-1]}"):
        bitsmith.load(path)


def test_random_damage_is_refused_or_harmless(built, tmp_path: Path) -> None:
    """Byte flips, truncations and dropped bytes anywhere in the file: each is refused with
    ArtifactError, or (when it hit nothing that matters, such as zip padding) loads and gives
    the right answer. Never another exception, never a wrong answer."""
    path, x, want = built
    data = path.read_bytes()
    rng = random.Random(22)
    bad = tmp_path / "damaged.bsm"
    outcomes = {"refused": 0, "harmless": 0}
    for _ in range(40):
        where = rng.randrange(len(data))
        kind = rng.choice(("flip", "truncate", "drop"))
        damaged = (data[:where] + bytes([data[where] ^ (1 << rng.randrange(8))])
                   + data[where + 1:] if kind == "flip" else
                   data[:where] if kind == "truncate" else data[:where] + data[where + 1:])
        bad.write_bytes(damaged)
        try:
            got = bitsmith.load(bad)(x)
        except ArtifactError:
            outcomes["refused"] += 1
            continue
        np.testing.assert_array_equal(got, want, err_msg=f"{kind} at byte {where}")
        outcomes["harmless"] += 1
    assert outcomes["refused"] > 0


JUNK = [None, "", -1, 2**70, 1e308, [], {}, "B", "../x", True, [[[[[]]]]], "(B*", 0]


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON document (keys and list indices)."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def test_malformed_manifest_fields_are_refused_or_harmless(built, tmp_path: Path) -> None:
    """Any field of the manifest deleted or replaced by junk of another type, the digest
    re-sealed: refused with ArtifactError, or harmless (a name, a note) and still right."""
    path, x, want = built
    original = _members(path)
    doc = json.loads(original["manifest.json"])
    paths = [p for p in _paths(doc) if p]
    rng = random.Random(7)
    bad = tmp_path / "fuzzed.bsm"
    refused = 0
    for _ in range(80):
        where = rng.choice(paths)
        members = dict(original)

        def change(m: dict, where: tuple = where) -> None:
            parent = m
            for step in where[:-1]:
                parent = parent[step]
            if rng.random() < 0.3 and isinstance(parent, dict):
                del parent[where[-1]]
            else:
                parent[where[-1]] = rng.choice(JUNK)
        _edit_manifest(members, change)
        _reseal(members)
        _write(bad, members)
        try:
            got = bitsmith.load(bad)(x)
        except ArtifactError:
            refused += 1
            continue
        np.testing.assert_array_equal(got, want, err_msg=f"{where} changed")
    assert refused > 0


def test_malformed_index_checks_are_refused_at_load(tmp_path: Path) -> None:
    """An embedding's index check, each field replaced by junk (JSON Infinity included):
    refused when the artifact loads, not as a raw error at the first request."""
    table = torch.nn.Embedding(11, 4)
    ids = torch.tensor([[1, 2, 10]])
    path = tmp_path / "emb.bsm"
    bitsmith.compile(table, (ids,)).save(path)
    doc = json.loads(_members(path)["manifest.json"])
    (step,) = [s for s in doc["plan"]["steps"] if s.get("index_checks")]
    assert bitsmith.load(path)(ids.numpy()).shape == (1, 3, 4)
    bad = tmp_path / "bad.bsm"
    for field in step["index_checks"][0]:
        for junk in (None, "x", 1e999, [1], True, -(2**70)):
            members = _members(path)

            def change(m: dict, field: str = field, junk: object = junk) -> None:
                (s,) = [s for s in m["plan"]["steps"] if s.get("index_checks")]
                s["index_checks"][0][field] = junk
            _edit_manifest(members, change)
            _reseal(members)
            _write(bad, members)
            try:
                bitsmith.load(bad)(ids.numpy())
            except ArtifactError:
                continue
            harmless = (field == "what" and isinstance(junk, str)) or (
                field == "negative" and isinstance(junk, bool))  # a message, a wider range
            assert harmless, (field, junk)
