"""What this host offers kernels: machine, instruction-set extensions, cores (no compiler deps)."""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def code_isa(flags: set[str] | list[str] | tuple[str, ...]) -> list[str]:
    """The flags a library built for a CPU with `flags` may need: every extension LLVM can
    emit on its own for that CPU, so all but AMX (reached only through explicit intrinsics: a
    library with AMX kernels adds their flags itself, `TvmKernel.isa`)."""
    return sorted(f for f in flags if f in ISA_FLAGS and not f.startswith("amx"))


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


SLOW_SUBNORMALS = 4.0
"""A subnormal penalty above this means subnormal floats cost a microcode assist here (Intel
cores: 30-50x); CPUs without one (AMD Zen) measure about 1. The margin keeps a busy machine's
noise from flipping the verdict."""


@functools.cache
def subnormal_penalty() -> float:
    """How much slower this CPU multiplies subnormal floats than normal ones (median of
    interleaved timings of 32K-element numpy products; a few milliseconds, once a process)."""
    n = 1 << 15
    normal = np.full(n, 1.5, np.float32)
    tiny = np.full(n, 1e-40, np.float32)  # below f32's smallest normal, 1.18e-38
    out = np.empty(n, np.float32)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(15):
        for which, values in enumerate((normal, tiny)):
            start = time.perf_counter()
            np.multiply(values, np.float32(1.25), out=out)
            times[which].append(time.perf_counter() - start)
    return statistics.median(times[1]) / max(statistics.median(times[0]), 1e-9)


def slow_subnormals() -> bool:
    """Whether subnormal floats are slow on this CPU (`subnormal_penalty` > SLOW_SUBNORMALS)."""
    return subnormal_penalty() > SLOW_SUBNORMALS


ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64


@functools.cache
def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this process (as oneDNN does): without it the
    first tile instruction kills the process with SIGILL. True when granted; False on a CPU
    without AMX, another OS or architecture, or a kernel that refuses (older than 5.16)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if "amx_tile" not in cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace")):
        return False
    import ctypes  # noqa: PLC0415 - only on this path

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
