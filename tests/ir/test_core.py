"""Use-def chains, builder and rewriter, erase rules, structural hash."""
import numpy as np
import pytest

from bitsmith import ir
from bitsmith.ir import dtypes, graph
from bitsmith.ir.dialects.func import ReturnOp
from bitsmith.ir.types import TensorType

from .helpers import mlp_module


def test_uses_are_tracked_and_replaced() -> None:
    module = mlp_module()
    linear = next(op for op in module.ops if op.name == "graph.linear")
    relu = linear.result.users[0]
    assert relu.name == "graph.relu" and len(linear.result.uses) == 1
    rw = ir.Rewriter(module.body)
    rw.set_insertion_before(relu)
    neg = rw.value(graph.UNARY_OPS["neg"], linear.result)
    rw.replace_op(relu, neg)
    assert [u.name for u in neg.users] == ["graph.split", "func.return"]
    assert relu.parent is None and relu not in module.ops
    assert all((user, idx) in neg.uses for user, idx in neg.uses)
    ir.verify(module)
    assert rw.changed


def test_set_operand_moves_the_use() -> None:
    module = mlp_module()
    split = next(op for op in module.ops if op.name == "graph.split")
    old = split.operands[0]
    linear = next(op for op in module.ops if op.name == "graph.linear")
    split.set_operand(0, linear.result)
    assert (split, 0) not in old.uses and (split, 0) in linear.result.uses


def test_erase_refuses_while_used() -> None:
    module = mlp_module()
    linear = next(op for op in module.ops if op.name == "graph.linear")
    with pytest.raises(ir.IRError, match="still used by graph.relu"):
        linear.erase()


def test_replace_requires_matching_result_count() -> None:
    module = mlp_module()
    split = next(op for op in module.ops if op.name == "graph.split")
    with pytest.raises(ir.IRError, match="with 1 value"):
        ir.Rewriter(module.body).replace_op(split, module.inputs[0])


def test_builder_infers_types_and_fills_defaults() -> None:
    module = ir.Module("m", [TensorType((2, 3), dtypes.f32)])
    b = ir.Builder.at_end(module.body)
    op = b.create(graph.ReduceSumOp, module.inputs[0], axes=(1,))
    assert op.keepdim is False and str(op.result.type) == "tensor<2xf32>"
    with pytest.raises(ir.IRError, match="has no attribute"):
        b.create(graph.ReduceSumOp, module.inputs[0], axis=1)
    with pytest.raises(ir.IRError, match="needs attribute 'perm'"):
        b.create(graph.PermuteOp, module.inputs[0])


def test_structural_hash_ignores_names_and_locations() -> None:
    a, b = mlp_module(), mlp_module()
    b.body.args[0].name_hint = "other"
    for op in b.ops:
        op.loc = "somewhere.else"
    assert ir.structural_hash(a) == ir.structural_hash(b)
    reduce = next(op for op in b.ops if op.name == "graph.split")
    reduce.attributes["sizes"] = (2, 1)
    assert ir.structural_hash(a) != ir.structural_hash(b)


def test_structural_hash_of_an_op_depends_on_types_not_values() -> None:
    a, b = mlp_module(), mlp_module()
    relu_a = next(op for op in a.ops if op.name == "graph.relu")
    relu_b = next(op for op in b.ops if op.name == "graph.relu")
    assert ir.structural_hash(relu_a) == ir.structural_hash(relu_b)
    linear = next(op for op in a.ops if op.name == "graph.linear")
    assert ir.structural_hash(linear) != ir.structural_hash(relu_a)


def test_interpreter_binds_symbols_and_checks_inputs() -> None:
    module = mlp_module()
    x = np.ones((5, 4), np.float32)
    flat, full = ir.interpret(module, x)
    assert flat.shape == (10,) and full.shape == (5, 3)
    with pytest.raises(ValueError, match=r"expected tensor<Bx4xf32>, got shape \[5, 3\]"):
        ir.interpret(module, np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="takes 1 input"):
        ir.interpret(module, x, x)
    with pytest.raises(ValueError, match="expected element type f32, got numpy int64"):
        ir.interpret(module, np.ones((5, 4), np.int64))


def test_interpreter_reports_missing_weights() -> None:
    module = ir.parse(str(mlp_module()))
    with pytest.raises(ir.InterpretError, match="weight 'fc.weight' is not bound"):
        ir.interpret(module, np.ones((2, 4), np.float32))


def test_return_must_be_last() -> None:
    module = ir.Module("m", [TensorType((2,), dtypes.f32)])
    b = ir.Builder.at_end(module.body)
    b.create(ReturnOp, module.inputs[0])
    b.create(graph.UNARY_OPS["neg"], module.inputs[0])
    with pytest.raises(ir.VerifyError, match="must be the last op"):
        ir.verify(module)
