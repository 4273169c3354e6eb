"""What this host offers kernels: machine, instruction-set extensions, cores (no compiler deps)."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8", "asimd", "asimddp", "sve", "sve2")
"""The CPU flags (as /proc/cpuinfo spells them) that code generation may rely on."""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ISA_FLAGS this CPU reports (from /proc/cpuinfo; empty where there is none)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags & set(ISA_FLAGS)


def host_description() -> dict[str, Any]:
    """machine, isa (sorted flags), cores and cpu model name of this host."""
    model = ""
    path = Path("/proc/cpuinfo")
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {"machine": platform.machine(), "isa": sorted(cpu_flags(text)),
            "cores": os.cpu_count() or 1, "cpu": model or platform.processor()}
