"""What a tuning result depends on besides the kernel: the device and the toolchain.

A fingerprint is a plain JSON-able dict (CPU model, ISA flags, cores, cache sizes; for CUDA the
GPU's name, compute capability and driver; TVM/LLVM, bitsmith and template versions). Its hash
keys saved tunings and cost models; `device_descriptors` turns it into numeric cost-model
features. Memory size is left out on purpose: no kernel's speed depends on it.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, cast

try:  # first: it loads TVM with torch masked out
    from ..runtime.tvm_runtime import tvm
except ImportError:  # a GPU machine with Triton only: cuda fingerprints need no TVM
    tvm = None

from .. import __version__
from ..codegen.template import TEMPLATES, Target
from ..codegen.triton import templates as _gpu_templates  # noqa: F401  (registers them)
from ..errors import TuningError

if tvm is not None:
    from ..codegen.tvm import templates as _cpu_templates  # noqa: F401  (registers them)
from ..runtime.host import host_description

CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")
"""Where Linux describes the caches cpu0 sees (index*/level, type, size)."""

NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=name,compute_cap,driver_version",
                    "--format=csv,noheader")

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int:
    """'32K' / '1024K' / '2M' / '512' -> bytes; 0 when unreadable."""
    text = text.strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    number = text[:len(text) - len(unit)]
    return int(number) * _SIZE_UNITS[unit] if number.isdigit() else 0


def cache_sizes(root: Path = CACHE_ROOT) -> dict[str, int]:
    """Bytes of the L1 data, L2 and L3 caches under `root` (sysfs layout); 0 when unknown."""
    out = {"l1d": 0, "l2": 0, "l3": 0}
    for index in sorted(root.glob("index*")) if root.is_dir() else ():
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except OSError:
            continue
        name = {"1": "l1d", "2": "l2", "3": "l3"}.get(level)
        if name is None or kind == "Instruction":
            continue
        out[name] = max(out[name], size)
    return out


def _gpu_description() -> dict[str, str]:
    """name, compute_cap and driver of the first GPU from nvidia-smi; {} without one."""
    if shutil.which(NVIDIA_SMI_QUERY[0]) is None:
        return {}
    try:
        proc = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
    fields = [f.strip() for f in lines[0].split(",")] if lines else []
    if len(fields) != 3:
        return {}
    return dict(zip(("name", "compute_cap", "driver"), fields, strict=True))


def _toolchain(kind: str) -> dict[str, Any]:
    """Versions of what generates the code."""
    out: dict[str, Any] = {"bitsmith": __version__}
    if kind != "cuda":
        if tvm is None:
            raise TuningError(f"a {kind!r} target is compiled by TVM, which is not installed")
        # unannotated in TVM, so inferred as maybe None: that is only with allow_none=True
        llvm = cast(int, tvm.target.codegen.llvm_version_major())
        out |= {"tvm": str(tvm.__version__), "llvm": int(llvm)}
    else:
        try:
            out["triton"] = metadata.version("triton")
        except metadata.PackageNotFoundError:
            out["triton"] = ""
    return out


def device_fingerprint(target: Target) -> dict[str, Any]:
    """The JSON-able description of `target` on this host and of the toolchain."""
    host = host_description()
    return {
        "kind": target.kind,
        "cpu": str(host["cpu"]),
        "machine": str(host["machine"]),
        "mcpu": target.mcpu,
        "isa": sorted(target.isa),
        "cores": int(target.cores),
        "cache": cache_sizes(),
        "subnormals": ("slow" if target.attrs.get("slow_subnormals") else "fast")
                      if target.kind == "llvm" else "",
        "gpu": ({**_gpu_description(), **{k: str(v) for k, v in target.attrs.items()}}
                if target.kind == "cuda" else {}),
        "toolchain": _toolchain(target.kind),
        "templates": {name: int(t.version) for name, t in sorted(TEMPLATES.items())
                      if name.startswith("triton.") == (target.kind == "cuda")},
    }


def fingerprint_hash(fp: Mapping[str, Any]) -> str:
    """First 16 hex digits of the sha256 of the fingerprint's canonical JSON."""
    text = json.dumps(fp, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _log2_bytes(size: int) -> float:
    return math.log2(size) if size > 0 else 0.0


def device_descriptors(fp: Mapping[str, Any]) -> dict[str, float]:
    """Numeric device features for the cost model (cache sizes as log2 bytes, 0 if unknown)."""
    isa = set(fp.get("isa", ()))
    cache = fp.get("cache", {})
    lanes = 16 if "avx512f" in isa else 8 if "avx2" in isa else 4
    out = {
        "device.cores": float(fp.get("cores", 1)),
        "device.l1d_log2": _log2_bytes(int(cache.get("l1d", 0))),
        "device.l2_log2": _log2_bytes(int(cache.get("l2", 0))),
        "device.l3_log2": _log2_bytes(int(cache.get("l3", 0))),
        "device.lanes_f32": float(lanes),
        "device.has_vnni": float(bool(isa & {"avx512_vnni", "amx_int8", "asimddp"})),
        "device.has_bf16": float(bool(isa & {"avx512_bf16", "amx_bf16"})),
    }
    gpu = fp.get("gpu", {})
    cap = str(gpu.get("compute_cap", gpu.get("capability", "")))
    if cap.replace(".", "", 1).isdigit():
        out["device.compute_capability"] = float(cap)
    if str(gpu.get("memory", "")).isdigit():
        out["device.gpu_memory_log2"] = _log2_bytes(int(gpu["memory"]))
    return out
