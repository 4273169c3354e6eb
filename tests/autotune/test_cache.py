"""The artifact cache: round trip, keys, corruption, concurrency, prune, export/import; the
library cache: a library file is checked against the key it is read for."""
import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import warnings

import numpy as np
import pytest
import torch

from bitsmith import passes
from bitsmith.autotune.cache import (
    ArtifactCache,
    CacheCorruptWarning,
    CacheEntry,
    LibraryCache,
    cache_dir,
    cache_key,
    parse_age,
)
from bitsmith.autotune.fingerprint import fingerprint_hash
from bitsmith.codegen.tvm.build import TvmBackend
from bitsmith.errors import ArtifactError, CacheError
from bitsmith.frontend import from_torch
from bitsmith.runtime.executor import Executor

FINGERPRINT = {"arch": "x86_64", "isa": ["avx2", "fma"], "cores": 16, "llvm": "19.1"}
SPACE = json.dumps({"TILE_N": [8, 16, 32], "UNROLL_K": [1, 2, 4]})
IR = "kernel.dense(%x: tensor<64x128xf32>, %w: tensor<128x256xi4>)"


def key_of(ir: str = IR, template: str = "dense", version: int = 2, space: str = SPACE,
           fingerprint: dict = FINGERPRINT) -> str:
    return cache_key(ir, template, version, space, fingerprint)


def entry(key: str, library: bytes = b"\x7fELF" + bytes(range(256)) * 4, median: float = 1e-3,
          created: float | None = None, fingerprint: dict = FINGERPRINT) -> CacheEntry:
    meta = {"kernel": "dense_0", "fingerprint_hash": fingerprint_hash(fingerprint)}
    if created is not None:
        meta["created"] = created
    return CacheEntry(key, "dense", '{"TILE_N":16,"UNROLL_K":2}', median,
                      (median, median * 1.1), library, meta)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> ArtifactCache:
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    return ArtifactCache()


def test_root_honours_the_override(cache, tmp_path, monkeypatch) -> None:
    assert cache.root == cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("BITSMITH_CACHE_DIR")
    assert cache_dir().parts[-2:] == (".cache", "bitsmith")


def test_put_get_round_trip(cache) -> None:
    key = key_of()
    assert cache.get(key) is None
    stored = entry(key)
    cache.put(stored)
    assert cache.get(key) == stored
    assert cache.keys() == [key]
    assert cache.path(key) == cache.root / "kernels" / key[:2] / key
    (row,) = cache.ls()
    assert row["key"] == key and row["template"] == "dense" and row["median"] == 1e-3
    assert row["size"] == cache.path(key).stat().st_size > len(stored.library)
    info = cache.show(key)
    assert info["config"] == stored.config and info["meta"]["kernel"] == "dense_0"
    assert info["library_size"] == len(stored.library) and "library" not in info


def test_key_changes_with_each_input() -> None:
    base = key_of()
    assert base == key_of() and len(base) == 64
    # the space is canonicalised: the same knobs written differently are the same key
    assert key_of(space=json.dumps(json.loads(SPACE), indent=2, sort_keys=True)) == base
    others = [key_of(ir=IR.replace("i4", "i3")), key_of(template="dense_vnni"),
              key_of(version=3), key_of(space=json.dumps({"TILE_N": [8, 16, 32, 64]})),
              key_of(fingerprint={**FINGERPRINT, "llvm": "19.2"}),
              key_of(fingerprint={**FINGERPRINT, "isa": ["avx2"]})]
    assert len({base, *others}) == len(others) + 1


def test_bad_key_inputs_are_refused() -> None:
    with pytest.raises(CacheError, match="knob space expected JSON"):
        key_of(space="{TILE_N: 8}")
    with pytest.raises(CacheError, match="version expected an int, got '2'"):
        key_of(version="2")
    with pytest.raises(CacheError, match="cache key expected 64 lowercase hex digits"):
        entry("../../etc/passwd")
    with pytest.raises(CacheError, match="fingerprint_hash'\\] expected a str"):
        CacheEntry(key_of(), "dense", "{}", 1.0, (1.0,), b"", {})


def test_corrupt_library_is_deleted_with_a_warning(cache) -> None:
    key = key_of()
    cache.put(entry(key))
    path = cache.path(key)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(CacheCorruptWarning, match=f"{key}.*library sha256 mismatch"):
        assert cache.get(key) is None
    assert not path.exists() and cache.keys() == []
    cache.put(entry(key))  # the caller rebuilds it
    assert cache.get(key) == entry(key)


@pytest.mark.parametrize("cut", [3, 20, 100])
def test_truncated_metadata_is_deleted_with_a_warning(cache, cut) -> None:
    key = key_of()
    cache.put(entry(key))
    path = cache.path(key)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.warns(CacheCorruptWarning, match="is corrupt"):
        assert cache.get(key) is None
    assert not path.exists()


def test_edited_metadata_fails_its_checksum(cache) -> None:
    key = key_of()
    cache.put(entry(key, median=1e-3))
    path = cache.path(key)
    path.write_bytes(path.read_bytes().replace(b'"median":0.001', b'"median":0.002'))
    with pytest.warns(CacheCorruptWarning, match="header sha256 expected"):
        assert cache.ls() == []
    assert not path.exists()


WRITER = """
import sys
from bitsmith.autotune.cache import ArtifactCache, CacheEntry
from bitsmith.errors import CacheError
root, key, worker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cache = ArtifactCache(root)
for i in range(rounds):
    library = bytes([worker]) * (50_000 + 1000 * i)
    cache.put(CacheEntry(key, "dense", '{"W":%d}' % worker, 1e-3, (1e-3,), library,
                         {"fingerprint_hash": "fp", "round": i}))
"""


def test_concurrent_writers_of_one_key_leave_one_valid_entry(tmp_path) -> None:
    root, key, workers, rounds = str(tmp_path / "cache"), key_of(), 4, 25
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, root, key, str(w), str(rounds)],
                              stderr=subprocess.PIPE, text=True) for w in range(workers)]
    cache = ArtifactCache(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheCorruptWarning)  # a reader never sees a partial one
        while any(proc.poll() is None for proc in procs):
            got = cache.get(key)
            assert got is None or got.library == bytes([json.loads(got.config)["W"]]) * len(
                got.library)
        for proc in procs:
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
        final = cache.get(key)
    # the last rename wins: whoever it was, its entry is whole and is its last round
    assert final is not None and final.meta["round"] == rounds - 1
    assert final.library == bytes([json.loads(final.config)["W"]]) * (50_000 + 1000 * 24)
    assert cache.keys() == [key]
    assert list(cache.path(key).parent.iterdir()) == [cache.path(key)]  # no temp files left


def test_prune_by_age_and_clear(cache) -> None:
    now = time.time()
    old, new = key_of(version=1), key_of(version=2)
    cache.put(entry(old, created=now - 40 * 86400))
    cache.put(entry(new, created=now - 3600))
    assert cache.prune(parse_age("30d")) == 1
    assert cache.keys() == [new]
    assert cache.prune(parse_age("30d")) == 0
    assert cache.clear() == 1 and cache.keys() == [] and cache.ls() == []
    assert not any((cache.root / "kernels").iterdir())  # empty shard directories swept too


def test_export_import_round_trip_into_an_empty_cache(cache, tmp_path) -> None:
    keys = [key_of(version=v) for v in (1, 2, 3)]
    for key in keys:
        cache.put(entry(key))
    archive = tmp_path / "tuned.tar"
    assert cache.export(archive) == 3
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert sorted(item["key"] for item in manifest["entries"]) == sorted(keys)
    assert {item["fingerprint_hash"] for item in manifest["entries"]} == {
        fingerprint_hash(FINGERPRINT)}
    other = ArtifactCache(tmp_path / "elsewhere")
    assert other.import_(archive, fingerprint_hash=fingerprint_hash(FINGERPRINT)) == 3
    assert other.keys() == sorted(keys)
    assert [other.get(k) for k in keys] == [cache.get(k) for k in keys]
    assert other.show(keys[0])["created"] == cache.show(keys[0])["created"]


def test_import_refuses_another_fingerprint(cache, tmp_path) -> None:
    theirs = {**FINGERPRINT, "isa": ["avx512f"]}
    cache.put(entry(key_of(fingerprint=theirs), fingerprint=theirs))
    archive = tmp_path / "tuned.tar"
    cache.export(archive)
    other = ArtifactCache(tmp_path / "elsewhere")
    ours = fingerprint_hash(FINGERPRINT)
    with pytest.raises(CacheError, match=f"fingerprint hash expected {ours}, got "
                                         f"{fingerprint_hash(theirs)}"):
        other.import_(archive, fingerprint_hash=ours)
    assert other.keys() == []


def write_tar(path, members: dict) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def manifest(key: str, sha256: str) -> bytes:
    return json.dumps({"format": "bitsmith-cache-export", "version": 1, "entries": [
        {"key": key, "fingerprint_hash": "x", "sha256": sha256}]}).encode()


def test_import_verifies_checksums(cache, tmp_path) -> None:
    key = key_of()
    cache.put(entry(key))
    good = cache.path(key).read_bytes()
    bad = good[:-1] + bytes([good[-1] ^ 1])
    other = ArtifactCache(tmp_path / "elsewhere")
    write_tar(tmp_path / "a.tar", {f"kernels/{key}": bad, "manifest.json": manifest(key, "0" * 64)})
    with pytest.raises(CacheError, match=f"entry {key[:12]} sha256 expected 000000000000"):
        other.import_(tmp_path / "a.tar")
    # a manifest rewritten to match the tampered bytes: the entry's own checksum still fails
    write_tar(tmp_path / "b.tar", {f"kernels/{key}": bad,
                                   "manifest.json": manifest(key, sha256_hex(bad))})
    with pytest.raises(CacheError, match=f"entry {key[:12]} is corrupt .library sha256 mismatch"):
        other.import_(tmp_path / "b.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar file")
    with pytest.raises(CacheError, match="expected a file written by `bitsmith cache export`"):
        other.import_(tmp_path / "junk.tar")
    assert other.keys() == []


@pytest.mark.parametrize("manifest_bytes", [
    b'{"format": "bitsmith-cache-export", "version": 1, "entries": 5}',
    b'{"format": "bitsmith-cache-export", "version": 1, "entries": ["x"]}',
    b"[" * 100_000 + b"]" * 100_000, b'{"format": 1e999}', b"\xff\xfe"])
def test_a_crafted_export_manifest_is_a_cache_error(tmp_path, manifest_bytes: bytes) -> None:
    write_tar(tmp_path / "c.tar", {"manifest.json": manifest_bytes})
    with pytest.raises(CacheError, match="cannot import"):
        ArtifactCache(tmp_path / "elsewhere").import_(tmp_path / "c.tar")


def test_show_of_a_missing_key_says_how_to_list(cache) -> None:
    with pytest.raises(CacheError, match="no cache entry .* run `bitsmith cache ls`"):
        cache.show(key_of())


def test_parse_age() -> None:
    assert parse_age("30d") == 30 * 86400
    assert parse_age("12h") == 12 * 3600
    assert parse_age("45m") == 45 * 60
    assert parse_age("90s") == 90
    assert parse_age("1.5h") == 5400
    for bad in ("30", "d", "30 days", "-1d", "1w"):
        with pytest.raises(CacheError, match="age expected a number and a unit d, h, m or s"):
            parse_age(bad)


LIBRARY_A, LIBRARY_B = b"\x7fELF" + bytes(range(256)) * 4, b"\x7fELF" + bytes(1000)


def test_library_round_trip_and_a_swapped_pair_misses(tmp_path) -> None:
    store = LibraryCache(tmp_path / "libraries")
    key_a, key_b = key_of(version=1), key_of(version=2)
    assert store.get(key_a) is None
    store.put(key_a, LIBRARY_A)
    store.put(key_b, LIBRARY_B)
    assert (store.get(key_a), store.get(key_b)) == (LIBRARY_A, LIBRARY_B)
    path_a, path_b = store.path(key_a), store.path(key_b)
    blob_a, blob_b = path_a.read_bytes(), path_b.read_bytes()
    path_a.write_bytes(blob_b)  # each file whole and self-consistent, under the other's key
    path_b.write_bytes(blob_a)
    with pytest.warns(CacheCorruptWarning, match=f"holds the library of key {key_b[:12]}, "
                                                 f"expected {key_a[:12]}"):
        assert store.get(key_a) is None
    with pytest.warns(CacheCorruptWarning, match="holds the library of key"):
        assert store.get(key_b) is None
    assert not path_a.exists() and not path_b.exists()  # the bad entries are gone


@pytest.mark.parametrize("planted", [
    b"garbage, not a library",
    b"",
    hashlib.sha256(LIBRARY_A).digest() + LIBRARY_A,  # a library file of the old layout
    LIBRARY_A,  # a bare shared object dropped in
], ids=["garbage", "empty", "old-layout", "bare-library"])
def test_a_planted_library_file_misses(tmp_path, planted) -> None:
    store = LibraryCache(tmp_path / "libraries")
    key = key_of()
    store.path(key).parent.mkdir(parents=True)
    store.path(key).write_bytes(planted)
    with pytest.warns(CacheCorruptWarning, match="is not a library file"):
        assert store.get(key) is None
    assert not store.path(key).exists()


@pytest.mark.parametrize("keep", [10, 8 + 64 + 16, 8 + 64 + 32, -1])
def test_a_truncated_library_file_misses(tmp_path, keep) -> None:
    store = LibraryCache(tmp_path / "libraries")
    key = key_of()
    store.put(key, LIBRARY_A)
    store.path(key).write_bytes(store.path(key).read_bytes()[:keep])
    with pytest.warns(CacheCorruptWarning, match="truncated|checksum|key"):
        assert store.get(key) is None
    assert not store.path(key).exists()


def tiny_model(relu: bool) -> tuple:
    """A one-layer torch model, its example input, and its fused module."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), *([torch.nn.ReLU()] if relu else []))
    x = torch.randn(2, 16)
    module = from_torch(model.eval(), (x,), name="tiny_relu" if relu else "tiny")
    passes.run(module, passes.default_pipeline("cpu"))
    return model, x, module


def assert_runs_like_torch(artifact, model, x) -> None:
    (got,) = Executor(artifact).run(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_a_build_over_swapped_libraries_compiles_again(tmp_path) -> None:
    store = LibraryCache(tmp_path / "libraries")
    backend = TvmBackend(store)
    models = [tiny_model(relu) for relu in (False, True)]
    for model, x, module in models:
        assert_runs_like_torch(backend.build(module), model, x)
    files = sorted(store.root.glob("*.so.bsl"))
    assert len(files) == 2
    blobs = [f.read_bytes() for f in files]
    files[0].write_bytes(blobs[1])
    files[1].write_bytes(blobs[0])
    for model, x, module in models:
        with pytest.warns(CacheCorruptWarning, match="holds the library of key"):
            artifact = backend.build(module)
        assert_runs_like_torch(artifact, model, x)
    assert sorted(f.read_bytes() for f in files) == sorted(blobs)  # rebuilt, rightly keyed


def test_a_plan_naming_a_kernel_the_library_lacks_is_refused_at_load(tmp_path) -> None:
    model, x, module = tiny_model(relu=False)
    artifact = TvmBackend(LibraryCache(tmp_path / "libraries")).build(module)
    assert_runs_like_torch(artifact, model, x)
    plan = json.loads(json.dumps(artifact.manifest.plan))
    plan["steps"][0]["kernel"] = plan["steps"][0]["function"] = "k99_missing"
    bad = dataclasses.replace(artifact,
                              manifest=dataclasses.replace(artifact.manifest, plan=plan))
    with pytest.raises(ArtifactError, match="'k99_missing' names a kernel that library "
                                            "kernels.so lacks"):
        Executor(bad)
