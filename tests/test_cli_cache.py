"""`bitsmith cache`: ls, show by prefix, prune, clear, export/import, one-line errors."""
import time

import pytest

from bitsmith.autotune.cache import ArtifactCache, CacheEntry, cache_key
from bitsmith.autotune.fingerprint import fingerprint_hash
from bitsmith.cli import main

FINGERPRINT = {"arch": "x86_64", "isa": ["avx2"]}


def put(cache: ArtifactCache, version: int, age_s: float = 60.0) -> str:
    key = cache_key("kernel.dense", "dense", version, "{}", FINGERPRINT)
    cache.put(CacheEntry(key, "dense", '{"TILE_N":16}', 2.5e-5, (2.5e-5, 2.7e-5), b"\x7fELF",
                         {"fingerprint_hash": fingerprint_hash(FINGERPRINT),
                          "kernel": f"dense_{version}", "created": time.time() - age_s}))
    return key


@pytest.fixture
def cache(tmp_path, monkeypatch) -> ArtifactCache:
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    return ArtifactCache()


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["cache", *argv])
    return code, capsys.readouterr().err


def test_ls_empty_and_with_two_entries(cache, capsys) -> None:
    code, err = run(capsys, "ls")
    assert code == 0 and err.strip() == f"the cache at {cache.root} is empty"
    keys = [put(cache, 1, age_s=3 * 86400), put(cache, 2)]
    code, err = run(capsys, "ls")
    assert code == 0 and "2 cached kernels" in err
    assert all(key[:12] in err for key in keys)
    assert err.count("dense") == 2 and "25.0" in err and "3d" in err


def test_show_by_prefix(cache, capsys) -> None:
    key = put(cache, 1)
    code, err = run(capsys, "show", key[:8])
    assert code == 0
    assert f"key {key}" in err and '{"TILE_N":16}' in err and "meta.kernel" in err
    assert "dense_1" in err and "4 bytes" in err


@pytest.mark.parametrize("prefix, message", [
    ("abc", "key prefix expected >= 6 characters, got 'abc'"),
    ("ffffffffff", "no cache entry matches 'ffffffffff'"),
])
def test_unknown_or_short_key_is_one_line_and_exit_2(cache, capsys, prefix, message) -> None:
    put(cache, 1)
    code, err = run(capsys, "show", prefix)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {message}") and "bitsmith cache ls" in err


def test_ambiguous_prefix_is_refused(cache, capsys) -> None:
    for digit in "01":
        cache.put(CacheEntry("abcdef" + digit * 58, "dense", "{}", None, (), b"",
                             {"fingerprint_hash": "fp"}))
    code, err = run(capsys, "show", "abcdef")
    assert code == 2 and err.count("\n") == 1
    assert "key prefix 'abcdef' is ambiguous: it matches 2 entries (abcdef000000, abcdef111111)" \
        in err
    code, err = run(capsys, "show", "abcdef1")
    assert code == 0 and f"key abcdef{'1' * 58}" in err


def test_prune_then_clear(cache, capsys) -> None:
    put(cache, 1, age_s=40 * 86400)
    kept = put(cache, 2, age_s=3600)
    code, err = run(capsys, "prune", "--older", "30d")
    assert code == 0 and "pruned 1 entries and 0 compiled libraries older than 30d" in err
    assert cache.keys() == [kept]
    code, err = run(capsys, "prune", "--older", "30 days")
    assert code == 2 and err.startswith("error: --older: age expected a number and a unit")
    code, err = run(capsys, "clear")
    assert code == 0 and "removed 1 entries" in err and cache.keys() == []


def test_export_then_import_elsewhere(cache, capsys, tmp_path, monkeypatch) -> None:
    keys = sorted([put(cache, 1), put(cache, 2)])
    archive = tmp_path / "tuned.tar"
    code, err = run(capsys, "export", str(archive))
    assert code == 0 and "exported 2 entries" in err and archive.is_file()
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "other"))
    ours = fingerprint_hash(FINGERPRINT)
    code, err = run(capsys, "import", str(archive), "--fingerprint", "0" * 16)
    assert code == 2 and f"fingerprint hash expected {'0' * 16}, got {ours}" in err
    assert ArtifactCache().keys() == []
    code, err = run(capsys, "import", str(archive), "--fingerprint", ours)
    assert code == 0 and "imported 2 entries" in err
    assert ArtifactCache().keys() == keys


def test_import_of_a_missing_file_is_one_line(cache, capsys, tmp_path) -> None:
    code, err = run(capsys, "import", str(tmp_path / "nope.tar"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: cannot import")
