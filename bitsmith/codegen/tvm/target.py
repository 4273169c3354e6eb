"""The TVM target for this host: LLVM tuned for the CPU it runs on (`mcpu` from LLVM's own host
detection, so AVX-512 / AVX2 / NEON code is generated as the CPU offers), with its core count."""
from __future__ import annotations

import functools

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


def tvm_target(target: Target) -> tvm.target.Target:
    """The TVM target object of a codegen Target."""
    spec = {"kind": target.kind, "num-cores": target.cores}
    if target.mcpu:
        spec["mcpu"] = target.mcpu
    return tvm.target.Target(spec)


def vector_lanes(target: Target) -> int:
    """f32 lanes of the widest vector unit the target has."""
    return int(target.attrs.get("vector_lanes_f32", 4))
