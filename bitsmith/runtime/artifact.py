"""The compiled artifact: one `.bsm` file (a zip) holding a manifest, kernel libraries and weights.

Layout inside the zip:
- `manifest.json`: format version, the model's input/output signature (symbolic dims by name),
  what the host must provide (machine, instruction sets), toolchain versions, the execution plan
  (opaque here: the executor reads it), and a sha256 of every other member;
- `weights.safetensors`: the weights, in their storage dtypes;
- `lib/<name>`: compiled kernel libraries.

Writing is atomic (a temporary file renamed into place). Reading checks everything it can and
raises `ArtifactError` with the reason: not a zip, missing member, unknown format version,
checksum mismatch, a host lacking what the kernels were compiled for.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ..errors import ArtifactError, InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
LIB_DIR = "lib/"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")




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
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Read the manifest form back."""
        return cls(str(data["name"]), tuple(data["shape"]), str(data["dtype"]))

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
                "weight_dtypes": self.weight_dtypes, "metadata": self.metadata}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """Read the JSON document back (the format version is checked by the caller)."""
        return cls(name=str(data["name"]),
                   inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
                   outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
                   plan=dict(data.get("plan", {})), requires=dict(data.get("requires", {})),
                   toolchain=dict(data.get("toolchain", {})), files=dict(data["files"]),
                   weight_dtypes=dict(data.get("weight_dtypes", {})),
                   format_version=int(data["format_version"]),
                   bitsmith_version=str(data.get("bitsmith_version", "")),
                   metadata=dict(data.get("metadata", {})))


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its manifest, weights and kernel libraries (bytes by name)."""

    manifest: Manifest
    weights: dict[str, np.ndarray]
    libraries: dict[str, bytes]

    def extract_libraries(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write the libraries into `directory` (loaders such as TVM's want a path)."""
        out = {}
        for name, data in self.libraries.items():
            path = Path(directory) / name
            path.write_bytes(data)
            out[name] = path
        return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_specs(specs: Sequence[TensorSpec], what: str) -> None:
    for spec in specs:
        for dim in spec.shape:
            ok = (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0) or (
                isinstance(dim, str) and bool(dim))
            if not ok:
                raise ArtifactError(f"{what} '{spec.name}': dim {dim!r} must be an int >= 0 or "
                                    "a symbol name")


def save_artifact(path: str | os.PathLike, manifest: Manifest, *,
                  weights: Mapping[str, np.ndarray],
                  libraries: Mapping[str, bytes] | None = None) -> Manifest:
    """Write an artifact atomically; return the manifest as written (with file checksums)."""
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
                        "weight_dtypes": views,
                        "format_version": FORMAT_VERSION})
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(MANIFEST, json.dumps(final.to_json(), indent=1, sort_keys=True))
            for name, data in members.items():
                zf.writestr(name, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def load_artifact(path: str | os.PathLike, *,
                  host: Mapping[str, Any] | None = None) -> Artifact:
    """Read and check an artifact; with `host`, also check the host can run its kernels."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no such artifact: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if MANIFEST not in names:
                raise ArtifactError(f"{path}: missing {MANIFEST}; not a bitsmith artifact")
            manifest = _read_manifest(path, zf.read(MANIFEST))
            members = {}
            for name, digest in manifest.files.items():
                if name not in names:
                    raise ArtifactError(f"{path}: missing member {name} listed in the manifest")
                data = zf.read(name)
                if _sha256(data) != digest:
                    raise ArtifactError(f"{path}: checksum mismatch for {name} (the file is "
                                        "corrupt or was modified); recompile the model")
                members[name] = data
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"{path}: not a bitsmith artifact (bad zip: {exc})") from None
    if host is not None:
        check_host(manifest.requires, host, str(path))
    blob = members.get(WEIGHTS, b"")
    weights = _from_bits(dict(load_safetensors(blob)) if blob else {}, manifest.weight_dtypes)
    libraries = {k[len(LIB_DIR):]: v for k, v in members.items() if k.startswith(LIB_DIR)}
    return Artifact(manifest, weights, libraries)


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


def _from_bits(weights: dict[str, np.ndarray], views: Mapping[str, str]) -> dict[str, np.ndarray]:
    for name, dtype_name in views.items():
        if name not in weights or not hasattr(ml_dtypes, dtype_name):
            raise ArtifactError(f"weight {name!r} stored as {dtype_name}, which this runtime "
                                "cannot read back")
        weights[name] = weights[name].view(np.dtype(getattr(ml_dtypes, dtype_name)))
    return weights


def _read_manifest(path: Path, raw: bytes) -> Manifest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON ({exc})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version!r}, this bitsmith reads "
                            f"version {FORMAT_VERSION}; recompile the model with this version")
    try:
        return Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: {MANIFEST} lacks or mangles a field ({exc!r})") from None


def check_host(requires: Mapping[str, Any], host: Mapping[str, Any], where: str = "") -> None:
    """Raise ArtifactError when `host` lacks the machine or instruction sets `requires` names."""
    prefix = f"{where}: " if where else ""
    want_machine, got_machine = requires.get("machine"), host.get("machine")
    if want_machine and got_machine and want_machine != got_machine:
        raise ArtifactError(f"{prefix}compiled for {want_machine}, this host is {got_machine}; "
                            "recompile on (or for) this host")
    missing = sorted(set(requires.get("isa", ())) - set(host.get("isa", ())))
    if missing:
        raise ArtifactError(f"{prefix}the kernels use {', '.join(missing)}, which this host "
                            "lacks; recompile on (or for) this host")


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
        if got_dtype.name != spec.dtype and _ir_name(got_dtype) != spec.dtype:
            raise InputError(f"input '{spec.name}': expected dtype {spec.dtype}, got "
                             f"{got_dtype.name}")
    return bindings


NUMPY_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "bool": "bool",
                "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8",
                "u16": "uint16", "u32": "uint32", "u64": "uint64"}
"""IR element type -> numpy/TVM dtype name, for the types a kernel may take or return."""
_NUMPY_TO_IR = {v: k for k, v in NUMPY_DTYPES.items()}


def _ir_name(dtype: np.dtype) -> str:
    return _NUMPY_TO_IR.get(dtype.name, dtype.name)


__all__ = ["FORMAT_VERSION", "NUMPY_DTYPES", "ArtifactError", "TensorSpec", "Manifest", "Artifact",
           "save_artifact", "load_artifact", "check_host", "bind_inputs"]
