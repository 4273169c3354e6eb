"""Lists of different lengths from hostile IR or inputs give our own errors, not a raw
ValueError from zip(strict=True)."""
import numpy as np
import pytest

from bitsmith import ir
from bitsmith.errors import InputError
from bitsmith.ir import TensorType, dtypes
from bitsmith.ir.interpreter import EvalContext, interpret_block, kernel_calls


def _quantize_module(x_shape: tuple[int, ...]) -> ir.Module:
    qtype = ir.QuantType(dtypes.parse_dtype("u4"), group_size=32)
    m = ir.Module("t", [TensorType(x_shape, dtypes.f32), TensorType((4, 1), dtypes.f16)])
    b = ir.Builder.at_end(m.body)
    op = b.create(ir.OP_REGISTRY["quant.quantize"], *m.inputs,
                  result_types=[TensorType((4, 32), qtype)])
    b.create(ir.OP_REGISTRY["func.return"], *op.results)
    return m


@pytest.mark.parametrize("x_shape", [(4, 32, 7), (4,), (4, 32, 1)])
def test_quantize_of_an_x_of_another_rank_is_a_verify_error(x_shape: tuple[int, ...]) -> None:
    m = _quantize_module(x_shape)
    match = r"x and the result must be 2-d \[N, K\] of one shape"
    with pytest.raises(ir.VerifyError, match=match):
        ir.verify(m)
    with pytest.raises(ir.VerifyError, match=match):  # the same, from IR text
        ir.parse(str(m))


def test_quantize_of_a_2d_x_still_verifies() -> None:
    ir.verify(_quantize_module((4, 32)))


def _neg_module() -> ir.Module:
    m = ir.Module("t", [TensorType((2,), dtypes.f32)])
    b = ir.Builder.at_end(m.body)
    y = b.create(ir.OP_REGISTRY["graph.neg"], *m.inputs)
    b.create(ir.OP_REGISTRY["func.return"], *y.results)
    return m


def test_kernel_calls_and_interpret_block_check_the_input_count() -> None:
    m = _neg_module()
    x = np.ones(2, np.float32)
    with pytest.raises(InputError, match=r"module @t takes 1 input\(s\) \(arg0\), got 2"):
        list(kernel_calls(m, [x, x]))
    with pytest.raises(InputError, match=r"takes 1 argument\(s\), got 0"):
        interpret_block(m.body, [], EvalContext({}))
    np.testing.assert_array_equal(interpret_block(m.body, [x], EvalContext({}))[0], -x)
