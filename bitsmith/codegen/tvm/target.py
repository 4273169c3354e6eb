"""The TVM target for this host: LLVM tuned for the CPU it runs on (`mcpu` from LLVM's own host
detection, so AVX-512 / AVX2 / NEON code is generated as the CPU offers), with its core count."""
from __future__ import annotations

import functools
import json

from ...runtime.host import host_description, slow_subnormals
from ...runtime.tvm_runtime import tvm
from ..template import Target


@functools.cache
def host_target() -> Target:
    """The codegen target of this machine."""
    host = host_description()
    mcpu = str(tvm.target.codegen.llvm_get_system_cpu())
    lanes = 16 if "avx512f" in host["isa"] else 8 if "avx2" in host["isa"] else 4
    return Target(kind="llvm", mcpu=mcpu, isa=tuple(host["isa"]), cores=host["cores"],
                  attrs={"vector_lanes_f32": lanes, "slow_subnormals": slow_subnormals()})


AVX2_ONLY = ("avx512", "amx", "avx_vnni")
"""Flags an AVX2-only x86 CPU lacks (prefixes)."""


def avx2_target(of: Target | None = None) -> Target:
    """`of` (the host's target by default) as an AVX2 + FMA CPU would see it: code for LLVM's
    "haswell", 8 f32 lanes. It runs on any x86-64 with AVX2, so one machine can tune for
    two devices (the tuner's cross-device transfer is measured this way)."""
    of = of or host_target()
    if "avx2" not in of.isa:
        raise ValueError(f"an AVX2 target needs an x86-64 CPU with AVX2; this one has "
                         f"{', '.join(of.isa) or 'no extensions'}")
    isa = tuple(f for f in of.isa if not f.startswith(AVX2_ONLY))
    return Target(kind="llvm", mcpu="haswell", isa=isa, cores=of.cores,
                  attrs={**of.attrs, "vector_lanes_f32": 8})


def target_json(target: Target) -> str:
    """A CPU target as canonical JSON (what a measurement worker rebuilds it from)."""
    return json.dumps({"kind": target.kind, "mcpu": target.mcpu, "isa": list(target.isa),
                       "cores": target.cores, "attrs": dict(target.attrs)}, sort_keys=True)


def target_from_json(text: str) -> Target:
    """`target_json`'s inverse; an empty text is the host's target."""
    if not text:
        return host_target()
    spec = json.loads(text)
    return Target(kind=str(spec["kind"]), mcpu=str(spec["mcpu"]),
                  isa=tuple(str(f) for f in spec["isa"]), cores=int(spec["cores"]),
                  attrs=dict(spec["attrs"]))


def tvm_target(target: Target) -> tvm.target.Target:
    """The TVM target object of a codegen Target."""
    spec = {"kind": target.kind, "num-cores": target.cores}
    if target.mcpu:
        spec["mcpu"] = target.mcpu
    return tvm.target.Target(spec)


def vector_lanes(target: Target) -> int:
    """f32 lanes of the widest vector unit the target has."""
    return int(target.attrs.get("vector_lanes_f32", 4))
