"""Verifier negatives: each broken rule is reported with what and where."""
import numpy as np
import pytest

from bitsmith import ir
from bitsmith.ir import dtypes, graph
from bitsmith.ir.dialects.func import ReturnOp
from bitsmith.ir.types import TensorType

F32 = dtypes.f32


def _module(*shapes: tuple) -> tuple[ir.Module, ir.Builder]:
    module = ir.Module("v", [TensorType(s, F32) for s in shapes])
    return module, ir.Builder.at_end(module.body)


def test_use_before_definition_is_a_dominance_error() -> None:
    module, b = _module((2, 3))
    neg = b.create(graph.UNARY_OPS["neg"], module.inputs[0])
    exp = b.create(graph.UNARY_OPS["exp"], neg.result)
    b.create(ReturnOp, exp.result)
    module.body.ops.remove(neg)
    module.body.ops.insert(1, neg)  # now neg comes after its user
    with pytest.raises(ir.VerifyError, match="'graph.exp' op: operand #0 does not dominate"):
        ir.verify(module)


def test_wrong_attribute_kind_and_unknown_attribute() -> None:
    module, b = _module((2, 3))
    op = b.create(graph.SoftmaxOp, module.inputs[0], axis=1)
    b.create(ReturnOp, op.result)
    op.attributes["axis"] = "last"
    with pytest.raises(ir.VerifyError, match="attribute 'axis' expected int, got 'last'"):
        ir.verify(module)
    op.attributes["axis"] = 1
    op.attributes["dim"] = 1
    with pytest.raises(ir.VerifyError, match=r"unknown attribute\(s\) \['dim'\]"):
        ir.verify(module)


def test_operand_count_and_element_types() -> None:
    module, b = _module((2, 3), (2, 3))
    with pytest.raises(ir.VerifyError, match=r"expected 2..3 operand\(s\) \(x, weight, bias\?\), "
                                             "got 1"):
        b.create(graph.LinearOp, module.inputs[0])
    x, y = module.inputs
    as_int = b.value(graph.CastOp, y, dtype=dtypes.i32)
    add = graph.BINARY_OPS["add"]([x, as_int], [TensorType((2, 3), F32)], {})
    b.insert(add)
    b.create(ReturnOp, add.result)
    with pytest.raises(ir.VerifyError, match="operand element types differ: f32 vs i32; "
                                             "insert a graph.cast"):
        ir.verify(module)


def test_missing_terminator_and_weight_mismatch() -> None:
    module, b = _module((2, 3))
    b.create(graph.UNARY_OPS["neg"], module.inputs[0])
    with pytest.raises(ir.VerifyError, match="must end with 'func.return', got 'graph.neg'"):
        ir.verify(module)
    module, b = _module()
    c = b.value(graph.ConstantOp, result_types=[TensorType((4,), F32)], weight="w", loc="c")
    b.create(ReturnOp, c)
    module.weights["w"] = np.zeros((5,), np.float32)
    with pytest.raises(ir.VerifyError, match=r"weight 'w' is float32\[5\], the constant's "
                                             r"type says tensor<4xf32>"):
        ir.verify(module)


def test_constant_needs_exactly_one_source() -> None:
    module, b = _module()
    c = b.value(graph.ConstantOp, result_types=[TensorType((4,), F32)])
    b.create(ReturnOp, c)
    with pytest.raises(ir.VerifyError, match="needs exactly one of 'weight'"):
        ir.verify(module)


@pytest.mark.parametrize("build, message", [
    (lambda b, x: b.create(graph.ReduceSumOp, b.value(graph.CastOp, x, dtype=dtypes.boolean)),
     "cannot sum bool values"),
    (lambda b, x: b.create(graph.ReduceMeanOp, b.value(graph.CastOp, x, dtype=dtypes.i32)),
     "cannot mean i32 values"),
    (lambda b, x: b.create(graph.UNARY_OPS["neg"], b.value(graph.CastOp, x,
                                                          dtype=dtypes.boolean)),
     "expected a numeric operand, got bool"),
    (lambda b, x: b.create(graph.LinearOp, *(2 * [b.value(graph.CastOp, x,
                                                             dtype=dtypes.i32)])),
     "expected float operands, got i32"),
])
def test_dtype_rules_refuse_what_torch_refuses(build, message: str) -> None:
    module, b = _module((3, 3))
    with pytest.raises(ir.VerifyError, match=message):
        build(b, module.inputs[0]).verify()


def test_embedding_refuses_negative_indices_like_torch() -> None:
    module = ir.Module("e", [TensorType((2,), dtypes.i64)], weights={
        "table": np.arange(12, dtype=np.float32).reshape(4, 3)})
    b = ir.Builder.at_end(module.body)
    table = b.value(graph.ConstantOp, result_types=[TensorType((4, 3), F32)], weight="table")
    b.create(ReturnOp, b.value(graph.EmbeddingOp, table, module.inputs[0]))
    np.testing.assert_array_equal(ir.interpret(module, np.array([3, 0]))[0][0], [9, 10, 11])
    with pytest.raises(IndexError, match=r"index -1 out of range \[0, 4\)"):
        ir.interpret(module, np.array([-1, 0]))
