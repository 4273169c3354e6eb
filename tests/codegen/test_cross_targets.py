"""The GEMM templates for CPUs other than this one, cross-compiled (they cannot run here):
AArch64 NEON and x86-64 with AVX2 only. The register tile follows the target's vector width
and the code uses its vector FMA."""
from __future__ import annotations

import numpy as np
import pytest

from bitsmith import ir, passes
from bitsmith.codegen.template import Target
from bitsmith.codegen.tvm.lower import compile_funcs
from bitsmith.codegen.tvm.templates import register_tile_shape, select

from .tvm_checks import func

RNG = np.random.default_rng(5)

TARGETS = {
    "aarch64-neon": (Target(kind="llvm", mcpu="cortex-a76", isa=("asimd",), cores=4,
                            attrs={"vector_lanes_f32": 4}),
                     {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                      "num-cores": 4}, "fmla\tv"),
    "x86-avx2": (Target(kind="llvm", mcpu="haswell", isa=("avx", "avx2", "fma"), cores=4,
                        attrs={"vector_lanes_f32": 8}),
                 {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell",
                  "num-cores": 4}, "vfmadd231ps\t%ymm"),
}


def _kernel(conv: bool) -> object:
    if conv:
        x, w, o = "tensor<1x9x8x5xf32>", "tensor<3x3x5x40xf32>", "tensor<1x9x8x40xf32>"
        body = f"""
            %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
            %1 = "graph.conv2d"(%x, %0) {{dilation = [1, 1], groups = 1, layout = "NHWC",
                padding = [1, 1], stride = [1, 1]}} : ({x}, {w}) -> {o}
            %2 = "graph.relu"(%1) : ({o}) -> {o}
            "func.return"(%2) : ({o}) -> ()"""
        weights = {"w": RNG.standard_normal((3, 3, 5, 40)).astype(np.float32)}
    else:
        x, w, o = "tensor<37x150xf32>", "tensor<70x150xf32>", "tensor<37x70xf32>"
        body = f"""
            %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
            %1 = "graph.linear"(%x, %0) : ({x}, {w}) -> {o}
            %2 = "graph.gelu"(%1) {{approximate = "none"}} : ({o}) -> {o}
            "func.return"(%2) : ({o}) -> ()"""
        weights = {"w": RNG.standard_normal((70, 150)).astype(np.float32)}
    module = ir.parse(func(f"%x: {x}", o, body), weights=weights)
    passes.run(module, "canonicalize,fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    return kernel


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv_gemm"])
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_gemm_templates_cross_compile_with_the_targets_vector_fma(name: str,
                                                                  conv: bool) -> None:
    target, tvm_target, fma = TARGETS[name]
    kernel = _kernel(conv)
    template, problem = select(kernel, target)
    assert template.name == ("conv_gemm" if conv else "dense")
    config = template.default_config(problem, target)
    mr, nr = register_tile_shape(int(target.attrs["vector_lanes_f32"]))
    assert (config["TILE_M"], config["TILE_N"]) == (mr, nr)
    built = template.build(problem, config, target)
    executable = compile_funcs({"main": built.func}, kernel.kernel_name, tvm_target)
    asm = executable.mod.inspect_source("asm")
    assert fma in asm, f"no {fma!r} in the {name} code"
