"""The artifact cache: the best config, timings and compiled kernel of every tuned kernel.

One file per entry, `ROOT/kernels/<key[:2]>/<key>`:

    MAGIC (8 bytes) | header length (8 bytes, big-endian) | header JSON | library bytes

The header holds the entry's fields, the sha256 and size of the library bytes, and `checksum`:
the sha256 of the header's own canonical JSON without that field. An entry is written to a
temporary file in its directory, fsynced and renamed into place, so a reader sees the old entry
or the new one, never a mix; of concurrent writers of one key the last rename wins. A file that
fails a check is deleted with a `CacheCorruptWarning` and reported as a miss: the caller rebuilds.
The root is `$BITSMITH_CACHE_DIR` (a documented override) or `~/.cache/bitsmith`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import struct
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CacheError, TuningError

ENV_CACHE_DIR = "BITSMITH_CACHE_DIR"
FORMAT_VERSION = 1  # bump when the entry layout or the key's inputs change: old keys then miss
MAGIC = b"BSMCACH1"
LIBRARY_MAGIC = b"BSMLIB02"  # a library file; version 1 held only the library's sha256
EXPORT_FORMAT = "bitsmith-cache-export"
EXPORT_MANIFEST = "manifest.json"
_LENGTH = struct.Struct(">Q")
_PREFIX = len(MAGIC) + _LENGTH.size
_LIBRARY_HEADER = len(LIBRARY_MAGIC) + 64 + 32  # magic, key (hex), sha256 of the library
_KEY = re.compile(r"[0-9a-f]{64}\Z")
_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([dhms])\s*\Z")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
# a writer holds its temporary file for milliseconds; older ones were left by a crash
_STALE_TMP_SECONDS = 3600.0


def cache_dir() -> Path:
    """The cache root: `$BITSMITH_CACHE_DIR` if set, else `~/.cache/bitsmith`."""
    override = os.environ.get(ENV_CACHE_DIR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "bitsmith"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces, so that equal values give equal strings."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TuningError(f"cannot write a {type(value).__name__} as canonical JSON: {exc}"
                          ) from None


def cache_key(kernel_ir: str, template: str, version: int, space_json: str,
              fingerprint: Mapping[str, Any], timing: str = "cold") -> str:
    """sha256 hex naming one tuned kernel: IR, template and version, knob space, device, and
    whether it was timed on a hot or a cold cache."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise CacheError(f"template '{template}': version expected an int, got {version!r}")
    try:
        space = json.loads(space_json)
    except (TypeError, json.JSONDecodeError) as exc:
        raise CacheError(f"template '{template}': knob space expected JSON, got "
                         f"{str(space_json)[:60]!r} ({exc})") from None
    payload = {"format": FORMAT_VERSION, "kernel_ir": kernel_ir, "template": template,
               "version": version, "space": space, "fingerprint": dict(fingerprint),
               "timing": timing}
    return _sha256(canonical_json(payload).encode())


def parse_age(text: str) -> float:
    """Seconds in an age written as a number and a unit: "30d", "12h", "45m" or "90s"."""
    match = _AGE.match(text)
    if match is None:
        raise CacheError(f"age expected a number and a unit d, h, m or s (e.g. '30d', '12h'), "
                         f"got {text!r}")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


class CacheCorruptWarning(UserWarning):
    """A cache entry failed its checksum: it was deleted and will be rebuilt."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One tuned kernel: its best config (canonical JSON), timings, library and metadata."""

    key: str
    template: str
    config: str
    median: float | None
    times: tuple[float, ...]
    library: bytes
    meta: Mapping[str, Any]

    def __post_init__(self) -> None:
        _check_key(self.key)
        object.__setattr__(self, "times", tuple(float(t) for t in self.times))
        object.__setattr__(self, "library", bytes(self.library))
        object.__setattr__(self, "meta", dict(self.meta))
        where = f"cache entry {self.key[:12]} ({self.template})"
        if not all(math.isfinite(t) for t in self.times) or (
                self.median is not None and not math.isfinite(self.median)):
            raise CacheError(f"{where}: times and median expected finite, got median "
                             f"{self.median}, times {self.times}")
        try:
            canonical = canonical_json(json.loads(self.config))
        except (TypeError, ValueError, TuningError):
            canonical = None
        if canonical != self.config:
            raise CacheError(f"{where}: config expected canonical JSON ({canonical}), got "
                             f"{self.config!r}")
        if not isinstance(self.meta.get("fingerprint_hash"), str):
            raise CacheError(f"{where}: meta['fingerprint_hash'] expected a str (see "
                             "autotune.fingerprint.fingerprint_hash), got "
                             f"{self.meta.get('fingerprint_hash')!r}")


class _Corrupt(Exception):
    """Internal: why an entry file failed its checks."""


@dataclass(frozen=True, slots=True)
class _Loaded:
    """An entry file read and checked: the entry, its header, its bytes and file identity."""

    entry: CacheEntry | None  # None when only the header was read
    header: Mapping[str, Any]
    blob: bytes  # what was read: the whole file, or its prefix and header
    identity: tuple[int, ...]

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self.identity[2]


class ArtifactCache:
    """Tuned kernels on disk, one file per key, safe under concurrent processes."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else cache_dir()
        self.kernels = self.root / "kernels"

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file that holds (or would hold) the entry of `key`."""
        _check_key(key)
        return self.kernels / key[:2] / key

    def get(self, key: str) -> CacheEntry | None:
        """The entry of `key`, checksums verified; None if absent or corrupt (then deleted)."""
        loaded = self._load(key, full=True)
        return None if loaded is None else loaded.entry

    def put(self, entry: CacheEntry) -> None:
        """Store `entry` atomically (a concurrent writer of the same key may win instead)."""
        created = entry.meta.get("created")
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            created = time.time()
        _write_atomic(self.path(entry.key), _encode(entry, float(created)))

    def keys(self) -> list[str]:
        """Every key with an entry file, sorted (not verified: see `get`)."""
        if not self.kernels.is_dir():
            return []
        return sorted(p.name for p in self.kernels.glob("*/*")
                      if _KEY.match(p.name) and p.parent.name == p.name[:2] and p.is_file())

    def ls(self) -> list[dict[str, Any]]:
        """One row per entry: key, template, median, size (bytes) and created time."""
        rows = []
        for key in self.keys():
            loaded = self._load(key, full=False)
            if loaded is not None:
                rows.append({"key": key, "template": loaded.header["template"],
                             "median": loaded.header["median"],
                             "size": loaded.size,
                             "created": loaded.header["created"]})
        return rows

    def show(self, key: str) -> dict[str, Any]:
        """Everything about an entry except its library bytes; CacheError if absent."""
        loaded = self._load(key, full=True)
        if loaded is None:
            raise CacheError(f"no cache entry {key} in {self.root}; run `bitsmith cache ls` "
                             "to list the keys")
        header = loaded.header
        return {"key": key, "template": header["template"], "config": header["config"],
                "median": header["median"], "times": list(header["times"]),
                "library_size": header["library_size"],
                "library_sha256": header["library_sha256"], "created": header["created"],
                "meta": dict(header["meta"]), "path": str(self.path(key))}

    def clear(self) -> int:
        """Delete every entry; returns how many were removed."""
        removed = sum(_unlink(self.path(key)) for key in self.keys())
        self._sweep()
        return removed

    def prune(self, older_than_seconds: float) -> int:
        """Delete the entries created more than `older_than_seconds` ago; returns how many."""
        if older_than_seconds < 0:
            raise CacheError(f"prune: age expected >= 0 seconds, got {older_than_seconds}")
        cutoff = time.time() - older_than_seconds
        removed = 0
        for key in self.keys():
            loaded = self._load(key, full=False)
            if loaded is not None and loaded.header["created"] < cutoff:
                removed += _discard_if_same(self.path(key), loaded.identity)
        self._sweep()
        return removed

    def export(self, path: str | os.PathLike) -> int:
        """Write every valid entry and a manifest to one tar file; returns the entry count."""
        target = Path(path)
        items = []
        mode = "w:gz" if target.name.endswith((".gz", ".tgz")) else "w"
        try:
            with _atomic_file(target) as fh, tarfile.open(fileobj=fh, mode=mode) as tar:
                for key in self.keys():
                    loaded = self._load(key, full=True)
                    if loaded is None:
                        continue
                    _add_member(tar, f"kernels/{key}", loaded.blob, loaded.header["created"])
                    items.append({"key": key, "template": loaded.header["template"],
                                  "fingerprint_hash": loaded.header["meta"]["fingerprint_hash"],
                                  "sha256": _sha256(loaded.blob)})
                manifest = {"format": EXPORT_FORMAT, "version": FORMAT_VERSION, "entries": items}
                _add_member(tar, EXPORT_MANIFEST, canonical_json(manifest).encode(), time.time())
        except OSError as exc:
            raise CacheError(f"cannot export the cache to {target}: {exc}") from None
        return len(items)

    def import_(self, path: str | os.PathLike, fingerprint_hash: str | None = None) -> int:
        """Add the entries of an export (all verified first, then all written); returns count.

        With `fingerprint_hash`, an export holding an entry tuned on another device is refused.
        """
        blobs = _read_export(Path(path), fingerprint_hash)
        for key, blob in blobs:
            _write_atomic(self.path(key), blob)
        return len(blobs)

    def _load(self, key: str, full: bool) -> _Loaded | None:
        """Read and check one entry file; a corrupt one is deleted with a warning."""
        path = self.path(key)
        try:
            with open(path, "rb") as fh:
                identity = _identity(os.fstat(fh.fileno()))
                blob = fh.read() if full else _read_header_bytes(fh)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheError(f"cannot read cache entry {path}: {exc}") from None
        try:
            header, end = _decode_header(blob)
            if header["key"] != key:
                raise _Corrupt(f"holds key {str(header['key'])[:12]}, expected {key[:12]}")
            entry = _decode_entry(header, blob[end:]) if full else None
        except _Corrupt as exc:
            _discard_if_same(path, identity)
            warnings.warn(f"artifact cache entry {path} is corrupt ({exc}): deleted, it will be "
                          "rebuilt", CacheCorruptWarning, stacklevel=3)
            return None
        return _Loaded(entry, header, blob, identity)

    def _sweep(self) -> None:
        """Remove temporary files left by crashed writers, then empty shard directories."""
        if not self.kernels.is_dir():
            return
        stale = time.time() - _STALE_TMP_SECONDS
        for tmp in self.kernels.glob("*/.*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < stale:
                    tmp.unlink()
        for shard in self.kernels.iterdir():
            with contextlib.suppress(OSError):
                shard.rmdir()  # fails, as it should, unless empty


class LibraryCache:
    """Compiled kernel libraries of whole artifacts, keyed by a hash of the scheduled TensorIR,
    the target and the TVM version (`codegen.tvm.lower.library_key`), so that compiling a
    model whose kernels were scheduled exactly as before (a warm recompile) skips LLVM.

    Each file holds `LIBRARY_MAGIC`, its key (64 hex digits), the library's sha256 (32 bytes),
    then the library. `get` checks all three against the key asked for, so a file swapped with
    another key's, planted, truncated or edited is deleted with a `CacheCorruptWarning` and
    reported as a miss, and the caller compiles again."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "libraries"

    def path(self, key: str) -> Path:
        """Where the library of `key` lives."""
        _check_key(key)
        return self.root / f"{key}.so.bsl"

    def get(self, key: str) -> bytes | None:
        """The library stored under `key`, or None (missing, or failing its checks)."""
        path = self.path(key)
        try:
            with open(path, "rb") as fh:
                identity = _identity(os.fstat(fh.fileno()))
                blob = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheError(f"cannot read cached library {path}: {exc}") from None
        problem = _library_problem(key, blob)
        if problem is not None:
            _discard_if_same(path, identity)
            warnings.warn(f"cached library {path.name} {problem}: deleted, it will be rebuilt",
                          CacheCorruptWarning, stacklevel=2)
            return None
        return blob[_LIBRARY_HEADER:]

    def put(self, key: str, library: bytes) -> None:
        """Store `library` under `key` (atomically: readers see the old file or the new)."""
        _write_atomic(self.path(key), LIBRARY_MAGIC + key.encode()
                      + hashlib.sha256(library).digest() + library)

    def prune(self, older_than_seconds: float = 0.0) -> int:
        """Delete the libraries last written more than `older_than_seconds` ago (all, at 0);
        how many were deleted."""
        cutoff = time.time() - older_than_seconds
        files = sorted(self.root.glob("*.so.bsl")) if self.root.is_dir() else []
        return sum(_unlink(f) for f in files
                   if older_than_seconds <= 0 or f.stat().st_mtime < cutoff)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _library_problem(key: str, blob: bytes) -> str | None:
    """Why a library file is not the library of `key`; None if it is."""
    if blob[:len(LIBRARY_MAGIC)] != LIBRARY_MAGIC:
        return f"is not a library file: magic expected {LIBRARY_MAGIC!r}, got {blob[:8]!r}"
    if len(blob) < _LIBRARY_HEADER:
        return f"is truncated: {len(blob)} bytes, shorter than its {_LIBRARY_HEADER}-byte header"
    stored = blob[len(LIBRARY_MAGIC):len(LIBRARY_MAGIC) + 64].decode("ascii", "replace")
    if stored != key:
        return f"holds the library of key {stored[:12]}, expected {key[:12]}"
    digest, library = blob[_LIBRARY_HEADER - 32:_LIBRARY_HEADER], blob[_LIBRARY_HEADER:]
    if hashlib.sha256(library).digest() != digest:
        return "failed its checksum: library sha256 mismatch"
    return None


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.match(key):
        raise CacheError(f"cache key expected 64 lowercase hex digits (see cache_key()), got "
                         f"{key!r}")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _encode(entry: CacheEntry, created: float) -> bytes:
    header: dict[str, Any] = {
        "format": FORMAT_VERSION, "key": entry.key, "template": entry.template,
        "config": entry.config, "median": entry.median, "times": list(entry.times),
        "meta": dict(entry.meta), "created": created, "library_size": len(entry.library),
        "library_sha256": _sha256(entry.library)}
    header["checksum"] = _sha256(canonical_json(header).encode())
    data = canonical_json(header).encode()
    return MAGIC + _LENGTH.pack(len(data)) + data + entry.library


def _read_header_bytes(fh: Any) -> bytes:
    prefix = fh.read(_PREFIX)
    if len(prefix) < _PREFIX:
        return prefix
    return prefix + fh.read(_LENGTH.unpack_from(prefix, len(MAGIC))[0])


def _decode_header(blob: bytes) -> tuple[dict[str, Any], int]:
    """The verified header of an entry file, and where its library bytes start."""
    if blob[:len(MAGIC)] != MAGIC:
        raise _Corrupt(f"magic expected {MAGIC!r}, got {blob[:len(MAGIC)]!r}")
    if len(blob) < _PREFIX:
        raise _Corrupt(f"file of {len(blob)} bytes is shorter than its prefix")
    end = _PREFIX + _LENGTH.unpack_from(blob, len(MAGIC))[0]
    if end > len(blob):
        raise _Corrupt(f"header expected {end - _PREFIX} bytes, got {len(blob) - _PREFIX}")
    try:
        header = json.loads(blob[_PREFIX:end])
        checksum = header.pop("checksum")
        expected = _sha256(canonical_json(header).encode())
    except (ValueError, TypeError, KeyError, AttributeError, TuningError) as exc:
        raise _Corrupt(f"unreadable header: {exc}") from None
    if checksum != expected:
        raise _Corrupt(f"header sha256 expected {expected[:12]}, got {str(checksum)[:12]}")
    if header.get("format") != FORMAT_VERSION:
        raise _Corrupt(f"format expected {FORMAT_VERSION}, got {header.get('format')}")
    return header, end


def _decode_entry(header: Mapping[str, Any], library: bytes) -> CacheEntry:
    if len(library) != header["library_size"]:
        raise _Corrupt(f"library expected {header['library_size']} bytes, got {len(library)}")
    if _sha256(library) != header["library_sha256"]:
        raise _Corrupt("library sha256 mismatch")
    try:
        return CacheEntry(header["key"], header["template"], header["config"], header["median"],
                          tuple(header["times"]), library, header["meta"])
    except (CacheError, TypeError, ValueError) as exc:
        raise _Corrupt(f"invalid fields: {exc}") from None


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Any]:
    """A temporary file beside `path`, fsynced and renamed onto it if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:16]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        with _atomic_file(path) as fh:
            fh.write(data)
    except OSError as exc:
        raise CacheError(f"cannot write cache entry {path}: {exc}") from None


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; some filesystems cannot fsync a directory, which is harmless."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def _discard_if_same(path: Path, identity: tuple[int, ...]) -> int:
    """Delete `path` unless a writer has replaced it since it was read (that one may be good)."""
    try:
        if _identity(os.stat(path)) != identity:
            return 0
    except FileNotFoundError:
        return 0
    return _unlink(path)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def _read_export(path: Path, fingerprint: str | None) -> list[tuple[str, bytes]]:
    """Every (key, entry file bytes) of an export, each verified; CacheError on the first bad."""
    try:
        with tarfile.open(path, "r:*") as tar:
            manifest = json.loads(_member(tar, EXPORT_MANIFEST, path) or b"null")
            if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
                raise CacheError(f"cannot import {path}: manifest format expected "
                                 f"{EXPORT_FORMAT!r}, got {type(manifest).__name__}")
            if manifest.get("version") != FORMAT_VERSION:
                raise CacheError(f"cannot import {path}: cache format expected "
                                 f"{FORMAT_VERSION}, got {manifest.get('version')}; export it "
                                 "again with this version of bitsmith")
            entries = manifest.get("entries", [])
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise CacheError(f"cannot import {path}: manifest 'entries' expected a list of "
                                 f"objects, got {type(entries).__name__}")
            return [_verify_member(tar, path, item, fingerprint) for item in entries]
    except (OSError, EOFError, ValueError, RecursionError, tarfile.TarError) as exc:
        raise CacheError(f"cannot import {path}: expected a file written by `bitsmith cache "
                         f"export`, got an unreadable one ({exc})") from None


def _verify_member(tar: tarfile.TarFile, path: Path, item: Mapping[str, Any],
                   fingerprint: str | None) -> tuple[str, bytes]:
    key = str(item.get("key"))
    _check_key(key)
    blob = _member(tar, f"kernels/{key}", path)
    if blob is None:
        raise CacheError(f"cannot import {path}: entry {key[:12]} is in the manifest but not "
                         "in the file")
    if _sha256(blob) != item.get("sha256"):
        raise CacheError(f"cannot import {path}: entry {key[:12]} sha256 expected "
                         f"{str(item.get('sha256'))[:12]}, got {_sha256(blob)[:12]}")
    try:
        header, end = _decode_header(blob)
        entry = _decode_entry(header, blob[end:])
    except _Corrupt as exc:
        raise CacheError(f"cannot import {path}: entry {key[:12]} is corrupt ({exc})") from None
    if entry.key != key:
        raise CacheError(f"cannot import {path}: entry {key[:12]} holds key {entry.key[:12]}")
    got = entry.meta["fingerprint_hash"]
    if fingerprint is not None and got != fingerprint:
        raise CacheError(f"cannot import {path}: entry {key[:12]} ({entry.template}) was tuned "
                         f"on another device: fingerprint hash expected {fingerprint}, got "
                         f"{got}; tune on this machine instead")
    return key, blob


MAX_EXPORT_MEMBER_BYTES = 256 * 2**20
"""A kernel library or an export's manifest is far smaller; bounds what a crafted export makes
an import read."""


def _member(tar: tarfile.TarFile, name: str, path: Path) -> bytes | None:
    try:
        info = tar.getmember(name)
    except KeyError:
        return None
    fh = tar.extractfile(info) if info.isfile() else None
    if fh is None:
        raise CacheError(f"cannot import {path}: member {name} expected a regular file")
    if info.size > MAX_EXPORT_MEMBER_BYTES:
        raise CacheError(f"cannot import {path}: member {name} is {info.size} bytes, over the "
                         f"limit of {MAX_EXPORT_MEMBER_BYTES}")
    return fh.read(MAX_EXPORT_MEMBER_BYTES)
