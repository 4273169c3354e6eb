"""The compiled artifact: one `.bsm` file (a zip) holding a manifest, kernel libraries and weights.

An artifact holds native code (the kernel libraries are shared objects the loader maps into the
process, and a shared object can run code as it is mapped). Like a pickle, load only artifacts
you trust, or sign them (`save_artifact(..., key=)`) and load with the key.

Layout inside the zip:
- `manifest.json`: format version, the model's input/output signature (symbolic dims by name),
  what the host must provide (machine, instruction sets), toolchain versions, the execution plan
  (opaque here: the executor reads it), and the sha256 and size of every other member;
- `integrity.json`: the sha256 of the manifest's bytes (which lists every member's sha256, so
  it covers them all) and, for a signed artifact, an HMAC-SHA256 of those bytes under the
  user's key;
- `weights.safetensors`: the weights, in their storage dtypes;
- `lib/<name>`: compiled kernel libraries.

Writing is atomic (a temporary file renamed into place). Reading never extracts by the paths
members carry: it reads members by name, bounds every size (and the compression ratio) before
it reads, checks the digest (and the signature) before it parses the manifest, and the
checksum of every member before anything is built from it. Every failure is `ArtifactError`
with the reason: not a zip, an unexpected or missing member, a size or ratio over the limits,
an unknown format version, a digest, signature or checksum mismatch, a malformed field, a host
lacking what the kernels were compiled for.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ..errors import ArtifactError, InputError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
INTEGRITY = "integrity.json"
WEIGHTS = "weights.safetensors"
LIB_DIR = "lib/"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
MAX_MANIFEST_BYTES = 64 * 2**20
"""The manifest (plan included) of the largest model is a few MiB."""
MAX_INTEGRITY_BYTES = 4096
MAX_RATIO = 20
"""bitsmith stores members uncompressed; a deflated member may shrink at most this much (weights
and code deflate 1.1-3x; a zip bomb, 1000x)."""
MIN_KEY_BYTES = 16
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: a name, dims (ints, or symbol names such as "B") and a dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """The manifest form."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Any) -> TensorSpec:
        """Read the manifest form back (ArtifactError on anything malformed)."""
        fields = _fields(data, "a tensor spec", ("name", "shape", "dtype"))
        name, shape, dtype = fields["name"], fields["shape"], fields["dtype"]
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
            raise ArtifactError(f"tensor spec {_brief(data)}: expected name (str), shape (list) "
                                "and dtype (str)")
        if len(shape) > 64 or not all(_dim_ok(d) for d in shape):
            raise ArtifactError(f"tensor spec {name!r}: shape {_brief(shape)} must be at most 64 "
                                "dims, each an int >= 0 or a symbol name")
        return cls(name, tuple(shape), dtype)

    def __str__(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.name}: tensor<{dims}{'x' if dims else ''}{self.dtype}>"


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` holds."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    plan: dict[str, Any] = field(default_factory=dict)
    requires: dict[str, Any] = field(default_factory=dict)  # machine, isa: [...]
    toolchain: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # member -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # member -> bytes
    weight_dtypes: dict[str, str] = field(default_factory=dict)  # stored as bits, see _as_bits
    format_version: int = FORMAT_VERSION
    bitsmith_version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. the quantization report

    def to_json(self) -> dict[str, Any]:
        """The JSON document."""
        return {"format_version": self.format_version, "bitsmith_version": self.bitsmith_version,
                "name": self.name, "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs], "requires": self.requires,
                "toolchain": self.toolchain, "plan": self.plan, "files": self.files,
                "sizes": self.sizes,
                "weight_dtypes": self.weight_dtypes, "metadata": self.metadata}

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Read the JSON document back (the format version is checked by the caller); every
        field is checked for its type: ArtifactError names the first that is wrong."""
        fields = _fields(data, MANIFEST, ("name", "inputs", "outputs", "files", "sizes",
                                           "format_version"))
        kinds = {"name": str, "inputs": list, "outputs": list, "files": dict, "sizes": dict,
                 "plan": dict,
                 "requires": dict, "toolchain": dict, "weight_dtypes": dict, "metadata": dict,
                 "bitsmith_version": str, "format_version": int}
        for key, kind in kinds.items():
            if key in fields and not isinstance(fields[key], kind):
                raise ArtifactError(f"{MANIFEST}: field {key!r} should be a {kind.__name__}, "
                                    f"got {type(fields[key]).__name__}")
        files, sizes, views = fields["files"], fields["sizes"], fields.get("weight_dtypes", {})
        if set(sizes) != set(files) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**62
                for n in sizes.values()):
            raise ArtifactError(f"{MANIFEST}: 'sizes' should give every member's size in bytes")
        for member, digest in files.items():
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise ArtifactError(f"{MANIFEST}: the checksum of {member!r} should be a sha256 "
                                    f"hex digest, got {_brief(digest)}")
            if member != WEIGHTS and not (member.startswith(LIB_DIR)
                                          and _NAME.match(member[len(LIB_DIR):])):
                raise ArtifactError(f"{MANIFEST}: member {_brief(member)} is neither "
                                    f"{WEIGHTS} nor {LIB_DIR}<plain file name>")
        if not all(isinstance(v, str) for v in views.values()):
            raise ArtifactError(f"{MANIFEST}: weight_dtypes should map names to dtype names")
        return cls(name=fields["name"],
                   inputs=tuple(TensorSpec.from_json(s) for s in fields["inputs"]),
                   outputs=tuple(TensorSpec.from_json(s) for s in fields["outputs"]),
                   plan=fields.get("plan", {}), requires=fields.get("requires", {}),
                   toolchain=fields.get("toolchain", {}), files=files, sizes=sizes,
                   weight_dtypes=views,
                   format_version=fields["format_version"],
                   bitsmith_version=fields.get("bitsmith_version", ""),
                   metadata=fields.get("metadata", {}))


def _fields(data: Any, what: str, required: Sequence[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ArtifactError(f"{what}: expected a JSON object, got {type(data).__name__}")
    missing = [key for key in required if key not in data]
    if missing:
        raise ArtifactError(f"{what}: lacks field(s) {', '.join(missing)}; recompile the model")
    return data


def _dim_ok(dim: Any) -> bool:
    return ((isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim < 2**62)
            or (isinstance(dim, str) and 0 < len(dim) <= 256))


def _brief(value: Any, limit: int = 60) -> str:
    """A value as a short repr for an error message (never recursing without bound)."""
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else (
        type(value).__name__)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its manifest, weights and kernel libraries (bytes by name); `signed`
    when its signature was checked against a key."""

    manifest: Manifest
    weights: dict[str, np.ndarray]
    libraries: dict[str, bytes]
    signed: bool = False

    def extract_libraries(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write the libraries into `directory` (loaders such as TVM's want a path), each under
        its plain file name (checked again here: nothing is written outside `directory`)."""
        out = {}
        for name, data in self.libraries.items():
            if not _NAME.match(name):
                raise ArtifactError(f"library name {_brief(name)} must be a plain file name")
            path = Path(directory) / name
            path.write_bytes(data)
            out[name] = path
        return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signing_key(key: bytes | str) -> bytes:
    """A signing key as bytes (a str is taken as UTF-8), refused when too short to be secret."""
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise ArtifactError(f"a signing key must be at least {MIN_KEY_BYTES} bytes, got "
                            f"{len(raw)}; make one with `head -c 32 /dev/urandom > bitsmith.key`")
    return raw


def _signature(key: bytes, manifest: bytes) -> str:
    return hmac.new(key, manifest, hashlib.sha256).hexdigest()


def _check_specs(specs: Sequence[TensorSpec], what: str) -> None:
    for spec in specs:
        for dim in spec.shape:
            if not _dim_ok(dim):
                raise ArtifactError(f"{what} '{spec.name}': dim {dim!r} must be an int >= 0 or "
                                    "a symbol name")


def save_artifact(path: str | os.PathLike, manifest: Manifest, *,
                  weights: Mapping[str, np.ndarray],
                  libraries: Mapping[str, bytes] | None = None,
                  key: bytes | str | None = None) -> Manifest:
    """Write an artifact atomically, signed with `key` if given; return the manifest as
    written (with file checksums)."""
    _check_specs(manifest.inputs, "input")
    _check_specs(manifest.outputs, "output")
    members: dict[str, bytes] = {}
    stored, views = _as_bits(weights)
    members[WEIGHTS] = save_safetensors(stored) if stored else b""
    for name, data in (libraries or {}).items():
        if not _NAME.match(name):
            raise ArtifactError(f"library name {name!r} must be a plain file name")
        members[LIB_DIR + name] = bytes(data)
    final = Manifest(**{**manifest.__dict__,
                        "files": {k: _sha256(v) for k, v in members.items()},
                        "sizes": {k: len(v) for k, v in members.items()},
                        "weight_dtypes": views,
                        "format_version": FORMAT_VERSION})
    raw = json.dumps(final.to_json(), indent=1, sort_keys=True).encode()
    integrity = {"digest": _sha256(raw),
                 "signature": _signature(signing_key(key), raw) if key is not None else None}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(MANIFEST, raw)
            zf.writestr(INTEGRITY, json.dumps(integrity, sort_keys=True))
            for name, data in members.items():
                zf.writestr(name, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def load_artifact(path: str | os.PathLike, *, host: Mapping[str, Any] | None = None,
                  key: bytes | str | None = None) -> Artifact:
    """Read and check an artifact; with `host`, also check the host can run its kernels; with
    `key`, refuse it unless it is signed with that key."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no such artifact: {path}")
    secret = signing_key(key) if key is not None else None
    try:
        with zipfile.ZipFile(path) as zf:
            infos = _members(zf)
            raw = _read(zf, infos, MANIFEST, MAX_MANIFEST_BYTES)
            signed = _check_integrity(_read(zf, infos, INTEGRITY, MAX_INTEGRITY_BYTES), raw,
                                      secret)
            manifest = _read_manifest(raw)
            extra = sorted(set(infos) - {MANIFEST, INTEGRITY} - set(manifest.files))
            if extra:
                raise ArtifactError(f"member {_brief(extra[0])} is not listed in the manifest")
            on_disk = path.stat().st_size
            for name in manifest.files:
                info = infos.get(name)
                if info is not None and (info.file_size != manifest.sizes[name]
                                         or info.compress_size > on_disk):
                    raise ArtifactError(f"member {name} claims {info.file_size} bytes "
                                        f"({info.compress_size} compressed, in a file of "
                                        f"{on_disk}), the manifest says {manifest.sizes[name]}")
            members = {name: _read(zf, infos, name, None, digest)
                       for name, digest in manifest.files.items()}
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    except _ZIP_ERRORS as exc:
        raise ArtifactError(f"{path}: not a readable bitsmith artifact ({type(exc).__name__}: "
                            f"{_brief(str(exc), 200)})") from None
    if host is not None:
        check_host(manifest.requires, host, str(path))
    blob = members.get(WEIGHTS, b"")
    try:
        weights = dict(load_safetensors(blob)) if blob else {}
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type is not exported
        raise ArtifactError(f"{path}: {WEIGHTS} is not readable ({_brief(str(exc), 200)}); "
                            "recompile the model") from None
    weights = _from_bits(weights, manifest.weight_dtypes)
    libraries = {k[len(LIB_DIR):]: v for k, v in members.items() if k.startswith(LIB_DIR)}
    return Artifact(manifest, weights, libraries, signed)


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
               zlib.error, OSError, RuntimeError, ValueError)  # what zipfile raises


def read_manifest(path: str | os.PathLike) -> Manifest:
    """An artifact's manifest alone (what it is and needs), without reading or checking the
    rest: `load_artifact` checks it all before anything runs."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_manifest(_read(zf, _members(zf), MANIFEST, MAX_MANIFEST_BYTES))
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    except _ZIP_ERRORS as exc:
        raise ArtifactError(f"{path}: not a readable bitsmith artifact ({type(exc).__name__}: "
                            f"{_brief(str(exc), 200)})") from None


def _members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The members by name; refuses duplicate names, encrypted members and a compression ratio
    over MAX_RATIO, before anything is read."""
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.filename in infos:
            raise ArtifactError(f"member {_brief(info.filename)} appears twice")
        if info.flag_bits & 0x1:
            raise ArtifactError(f"member {_brief(info.filename)} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArtifactError(f"member {_brief(info.filename)} uses compression method "
                                f"{info.compress_type}; bitsmith stores members uncompressed")
        if info.file_size > MAX_RATIO * max(info.compress_size, 1024):
            raise ArtifactError(f"member {_brief(info.filename)} inflates {info.compress_size} "
                                f"bytes to {info.file_size} (more than {MAX_RATIO}x): refused as "
                                "a zip bomb")
        infos[info.filename] = info
    return infos


def _read(zf: zipfile.ZipFile, infos: Mapping[str, zipfile.ZipInfo], name: str,
          limit: int | None, digest: str | None = None) -> bytes:
    """A member's bytes, by name, never more than its declared size (or `limit`), read in
    chunks (never one allocation of what a header claims); with `digest`, checked."""
    info = infos.get(name)
    if info is None:
        what = "not a bitsmith artifact" if name == MANIFEST else "listed in the manifest"
        raise ArtifactError(f"missing member {name} ({what})")
    if limit is not None and info.file_size > limit:
        raise ArtifactError(f"member {name} is {info.file_size} bytes, over the limit of {limit}")
    hasher, chunks, size = hashlib.sha256(), [], 0
    with zf.open(info) as fh:
        while chunk := fh.read(min(_CHUNK, info.file_size + 1 - size)):
            size += len(chunk)
            if size > info.file_size:
                break
            hasher.update(chunk)
            chunks.append(chunk)
    if size != info.file_size:
        raise ArtifactError(f"member {name} holds {'more than ' if size > info.file_size else ''}"
                            f"{size} bytes, its header says {info.file_size}")
    if digest is not None and hasher.hexdigest() != digest:
        raise ArtifactError(f"checksum mismatch for {name} (the file is corrupt or was "
                            "modified); recompile the model")
    return b"".join(chunks)


def _check_integrity(raw: bytes, manifest: bytes, key: bytes | None) -> bool:
    """Check the manifest's digest, and with `key` its signature; whether it was signed and
    checked."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("digest"), str) or not _SHA256.match(
            doc["digest"]):
        raise ArtifactError(f"{INTEGRITY} is malformed (expected a sha256 hex digest); "
                            "recompile the model")
    if not hmac.compare_digest(doc["digest"], _sha256(manifest)):
        raise ArtifactError(f"{MANIFEST} does not match its digest in {INTEGRITY} (the file is "
                            "corrupt or was modified); recompile the model")
    if key is None:
        return False
    signature = doc.get("signature")
    if not isinstance(signature, str) or not _SHA256.match(signature):
        raise ArtifactError("the artifact is not signed, and a key was given: refusing it; sign "
                            "it with `bitsmith compile --sign KEYFILE`")
    if not hmac.compare_digest(signature, _signature(key, manifest)):
        raise ArtifactError("the artifact's signature does not match the key: it was signed "
                            "with another key or modified since; refusing it")
    return True


_SAFETENSORS_NATIVE = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                       "uint64", "float16", "float32", "float64"}


def _as_bits(weights: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Contiguous arrays safetensors can read back; others (bf16, fp8) as raw unsigned bits."""
    stored, views = {}, {}
    for name, array in weights.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in _SAFETENSORS_NATIVE:
            views[name] = array.dtype.name
            array = array.view(f"uint{array.dtype.itemsize * 8}")
        stored[name] = array
    return stored, views


_ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
              "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu",
              "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn", "int2", "int4", "uint2", "uint4"}


def _from_bits(weights: dict[str, np.ndarray], views: Mapping[str, str]) -> dict[str, np.ndarray]:
    for name, dtype_name in views.items():
        if name not in weights or dtype_name not in _ML_DTYPES or not hasattr(ml_dtypes,
                                                                               dtype_name):
            raise ArtifactError(f"weight {_brief(name)} stored as {_brief(dtype_name)}, which "
                                "this runtime cannot read back")
        dtype = np.dtype(getattr(ml_dtypes, dtype_name))
        if dtype.itemsize != weights[name].dtype.itemsize:
            raise ArtifactError(f"weight {_brief(name)}: stored as {weights[name].dtype.name}, "
                                f"which cannot hold {dtype_name}")
        weights[name] = weights[name].view(dtype)
    return weights


def _read_manifest(raw: bytes) -> Manifest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{MANIFEST} is not valid JSON ({_brief(str(exc), 200)})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {_brief(version)}, this bitsmith reads "
                            f"version {FORMAT_VERSION}; recompile the model with this version")
    return Manifest.from_json(data)


def check_host(requires: Mapping[str, Any], host: Mapping[str, Any], where: str = "") -> None:
    """Raise ArtifactError when `host` lacks the machine or instruction sets `requires` names
    (the kernels would die of an illegal instruction there)."""
    prefix = f"{where}: " if where else ""
    want_machine, got_machine = requires.get("machine"), host.get("machine")
    wanted = requires.get("isa", [])
    if not isinstance(wanted, list) or not all(isinstance(f, str) for f in wanted):
        raise ArtifactError(f"{prefix}requires.isa should be a list of CPU flags, got "
                            f"{_brief(wanted)}")
    if want_machine and got_machine and want_machine != got_machine:
        raise ArtifactError(f"{prefix}compiled for {want_machine}, this host is {got_machine}; "
                            "recompile on (or for) this host")
    missing = sorted(set(wanted) - set(host.get("isa", ())))
    if missing:
        cpu = f" (-mcpu={requires['mcpu']})" if isinstance(requires.get("mcpu"), str) else ""
        raise ArtifactError(f"{prefix}the kernels were compiled for a CPU with "
                            f"{', '.join(missing)}{cpu}, which this host lacks (it has "
                            f"{', '.join(sorted(host.get('isa', ()))) or 'none of them'}); "
                            "recompile on (or for) this host")


def bind_inputs(specs: Sequence[TensorSpec], arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Check arrays against the input signature; return the symbol bindings (e.g. B=8).

    Raises ValueError saying expected vs got: count, rank, a dim, a symbol bound twice
    differently, or the dtype.
    """
    if len(arrays) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InputError(f"expected {len(specs)} input(s) ({names}), got {len(arrays)}")
    bindings: dict[str, int] = {}
    for spec, array in zip(specs, arrays, strict=True):
        shape = tuple(np.shape(array))
        if len(shape) != len(spec.shape):
            raise InputError(f"input '{spec.name}': expected rank {len(spec.shape)} ({spec}), "
                             f"got shape {list(shape)}")
        for axis, (dim, got) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(dim, int):
                if dim != got:
                    raise InputError(f"input '{spec.name}': expected {spec}, got shape "
                                     f"{list(shape)} (dim {axis} should be {dim})")
                continue
            bound = bindings.setdefault(dim, got)
            if bound != got:
                raise InputError(f"input '{spec.name}': dim {axis} is {dim} = {bound} from an "
                                 f"earlier input, got {got}")
        got_dtype = np.asarray(array).dtype
        if _ir_name(got_dtype) != spec.dtype and got_dtype.name != spec.dtype:
            raise InputError(f"input '{spec.name}': expected dtype {spec.dtype}, got "
                             f"{got_dtype.name}")
    return bindings


NUMPY_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "bool": "bool",
                "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8",
                "u16": "uint16", "u32": "uint32", "u64": "uint64"}
"""IR element type -> numpy/TVM dtype name, for the types a kernel may take or return."""
_NUMPY_TO_IR = {v: k for k, v in NUMPY_DTYPES.items()}


_IR_BY_DTYPE: dict[np.dtype, str] = {}
"""dtype -> IR name, filled as dtypes are seen (numpy's `dtype.name` costs a microsecond: the
per-call input check of a small model must not)."""


def _ir_name(dtype: np.dtype) -> str:
    name = _IR_BY_DTYPE.get(dtype)
    if name is None:
        name = _IR_BY_DTYPE[dtype] = _NUMPY_TO_IR.get(dtype.name, dtype.name)
    return name


__all__ = ["FORMAT_VERSION", "NUMPY_DTYPES", "ArtifactError", "TensorSpec", "Manifest", "Artifact",
           "save_artifact", "load_artifact", "check_host", "bind_inputs", "signing_key"]
