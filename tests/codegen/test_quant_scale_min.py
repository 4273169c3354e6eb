"""`zero_point=min` (a scale and a minimum per group, w = q * s + m: llama.cpp's Q4_1), in the
interpreter, the fused CPU template under every decode, the generic CPU path and Triton."""
import numpy as np
import pytest

from bitsmith.codegen.template import Config
from bitsmith.codegen.tvm.target import host_target
from bitsmith.ir.dialects import quant
from bitsmith.ir.dtypes import IntType, f16
from bitsmith.ir.types import GroupAxis, QuantType, ZeroPoint

from .test_tvm_quant import qlinear_module
from .tvm_checks import check_module

Q4_1 = QuantType(IntType(4, False), 32, GroupAxis.OUT, f16, ZeroPoint.MIN)


def test_dequantize_is_q_times_s_plus_m_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (5, 96)).astype(np.uint8)
    scale = (rng.random((5, 3)) * 0.1).astype(np.float16)
    minimum = (rng.standard_normal((5, 3)) * 0.3).astype(np.float16)
    got = quant.dequantize(codes, scale, minimum, Q4_1)
    want = (codes.astype(np.float32) * np.repeat(scale.astype(np.float32), 32, axis=1)
            + np.repeat(minimum.astype(np.float32), 32, axis=1))
    assert got.dtype == np.float32 and np.array_equal(got, want)
    again = quant.dequantize(quant.quantize(got, scale, minimum, Q4_1), scale, minimum, Q4_1)
    assert np.array_equal(again, want)  # values on the grid quantize back to themselves


@pytest.mark.parametrize("decode", ["magic", "subnormal", "convert"])
@pytest.mark.parametrize("m, n, k", [(1, 37, 576), (3, 20, 300)])
def test_fused_template_every_decode(decode: str, m: int, n: int, k: int) -> None:
    module = qlinear_module(Q4_1, m, n, k, seed=k)
    assert check_module(module, pipeline="fuse", template="qdense",
                        config=_with_decode(module, decode)) == 1


@pytest.mark.parametrize("qt", [
    QuantType(IntType(4, False), 16, GroupAxis.IN, f16, ZeroPoint.MIN),
    QuantType(IntType(3, False), 100, GroupAxis.OUT, f16, ZeroPoint.MIN),
])
def test_generic_path(qt: QuantType) -> None:
    check_module(qlinear_module(qt, 2, 21, 230), pipeline="fuse")


def test_triton_kernels() -> None:
    from ..triton_backend.triton_checks import check_module as check_triton
    check_triton(qlinear_module(Q4_1, 2, 24, 160), pipeline="fuse")


def _with_decode(module, decode: str) -> Config:
    from bitsmith import passes
    from bitsmith.codegen.tvm.templates import select

    probe = qlinear_module(Q4_1, *_shape(module))
    passes.run(probe, "fuse")
    (kernel,) = [op for op in probe.ops if op.name == "kernel.fused"]
    template, problem = select(kernel, host_target())
    return Config({**template.default_config(problem, host_target()), "DECODE": decode})


def _shape(module) -> tuple[int, int, int]:
    m, k = module.inputs[0].type.shape
    n = module.weights["w"].shape[0]
    return int(m), int(n), int(k)
