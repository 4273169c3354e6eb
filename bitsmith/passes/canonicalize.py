"""Canonicalization: constant folding (through the interpreter), algebraic identities, no-op
and consecutive shape ops, transposes folded into matmul operands, batch norm into conv."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PipelineError
from ..ir import Block, DenseAttr, EvalContext, InterpretError, Module, Operation, Trait, Value
from ..ir.dialects import graph
from ..ir.dialects.graph.elementwise import plain_dtype
from ..ir.dtypes import DType, convert
from ..ir.interpreter import evaluate_op
from ..ir.types import Dim, TensorType, format_dim
from .cleanup import erase_dead_ops, prune_weights
from .manager import ModulePass, PassContext, register_pass
from .rewrite import PatternRewriter, apply_patterns, pattern

INLINE_ELEMENTS = 16  # folded results up to this size are printed inline, bigger become weights
FOLD_GROWTH_BYTES = 4096  # folding may not grow the constant data by more than this


def producer(value: Value) -> Operation | None:
    """The op defining `value` (None for a block argument)."""
    return getattr(value, "op", None)


def static_nbytes(value: Value) -> int | None:
    """Bytes of a statically shaped plain-dtype value, else None."""
    t = value.type
    shape = [d for d in t.shape if isinstance(d, int)]
    if not isinstance(t.dtype, DType) or len(shape) != t.rank:
        return None
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(t.dtype.numpy_dtype).itemsize


def constant_array(value: Value, module: Module) -> np.ndarray | None:
    """The array of a value made by a constant source op, else None."""
    op = producer(value)
    if op is None or not op.has(Trait.SOURCE) or static_nbytes(value) is None:
        return None
    name = op.attributes.get("weight")
    if name is not None and name not in module.weights:
        return None  # a weight not bound to the module (IR parsed without weights)
    return op.evaluate(EvalContext(module.weights))


def constant_arrays(values: Sequence[Value], module: Module) -> list[np.ndarray] | None:
    """The arrays of values all made by constant source ops, else None."""
    arrays = [constant_array(v, module) for v in values]
    present = [a for a in arrays if a is not None]
    return present if len(present) == len(arrays) else None


def splat_value(value: Value, module: Module) -> float | None:
    """The single value every element of a constant holds, else None (big weights: None)."""
    op = producer(value)
    if op is not None and op.name == "graph.full":
        return float(op.value)
    size = static_nbytes(value)
    if op is None or op.name != "graph.constant" or size is None or size > 4096:
        return None
    array = constant_array(value, module)
    if array is None or array.size == 0 or not (array == array.reshape(-1)[0]).all():
        return None
    return float(array.reshape(-1)[0])


def make_constant(rw: PatternRewriter, array: np.ndarray, value: Value, base: str) -> Value:
    """A `graph.constant` holding `array` with `value`'s type: inline if small, else a weight."""
    t = value.type
    if array.size <= INLINE_ELEMENTS:
        return rw.value(graph.ConstantOp, value=DenseAttr(t, array), result_types=[t])
    name = rw.add_weight(base, np.ascontiguousarray(array))
    return rw.value(graph.ConstantOp, weight=name, result_types=[t])


def _weight_base(op: Operation) -> str:
    for value in op.operands:
        src = producer(value)
        if src is not None and src.name == "graph.constant" and src.weight is not None:
            return f"{src.weight}.{op.name.split('.')[-1]}"
    return f"{op.loc or 'const'}.{op.name.split('.')[-1]}"


def _freed_bytes(op: Operation, arrays: list[np.ndarray]) -> int:
    """Constant data that folding `op` frees: literals and weights no other op uses."""
    return sum(array.nbytes for value, array in dict(zip(op.operands, arrays, strict=True)).items()
               if _is_made_by(value, "graph.constant") and value.users == [op])


def _is_made_by(value: Value, op_name: str) -> bool:
    src = producer(value)
    return src is not None and src.name == op_name


@pattern()
def fold_constant_op(op: Operation, rw: PatternRewriter) -> bool:
    """op(constants...) -> constant, evaluated by the interpreter."""
    if op.has(Trait.SOURCE) or op.regions or not op.operands or not op.results:
        return False
    arrays = constant_arrays(op.operands, rw.module)
    if arrays is None:
        return False
    sizes = [s for s in (static_nbytes(r) for r in op.results) if s is not None]
    if len(sizes) != len(op.results):
        return False
    # graph.full/arange store no data, and a weight with other users stays: neither frees any
    budget = max(_freed_bytes(op, arrays), FOLD_GROWTH_BYTES)
    if sum(sizes) > budget:
        return False
    try:
        outs = evaluate_op(op, EvalContext(rw.module.weights), arrays)
    except (InterpretError, ArithmeticError, IndexError, ValueError):
        return False  # e.g. an integer division by zero: leave it to fail at run time
    base = _weight_base(op)
    rw.replace_op(op, [make_constant(rw, a, r, base)
                       for a, r in zip(outs, op.results, strict=True)])
    return True


def _same_type(a: Value, b: Value) -> bool:
    return a.type.same_as(b.type)


def _identity(op: Operation, rw: PatternRewriter, keep: Value, other: Value,
              unit: float) -> bool:
    value = splat_value(other, rw.module)
    if value is None or value != unit or np.signbit(value) != np.signbit(unit) \
            or not _same_type(keep, op.result):
        return False
    rw.replace_op(op, keep)
    return True


@pattern("graph.add", "graph.mul")
def fold_unit_operand(op: Operation, rw: PatternRewriter) -> bool:
    """x + 0 -> x, 0 + x -> x, x * 1 -> x, 1 * x -> x (when no broadcast widens x).

    For floats the additive unit is -0.0, as in MLIR: x + (+0.0) turns -0.0 into +0.0.
    """
    unit = 1.0
    if op.name == "graph.add":
        unit = -0.0 if plain_dtype(op, op.result.type).is_float else 0.0
    return (_identity(op, rw, op.lhs, op.rhs, unit)
            or _identity(op, rw, op.rhs, op.lhs, unit))


@pattern("graph.sub", "graph.div", "graph.pow")
def fold_unit_rhs(op: Operation, rw: PatternRewriter) -> bool:
    """x - 0 -> x, x / 1 -> x, x ** 1 -> x."""
    unit = 0.0 if op.name == "graph.sub" else 1.0
    if op.name == "graph.div" and not op.lhs.type.dtype.is_float:
        return False
    return _identity(op, rw, op.lhs, op.rhs, unit)


@pattern("graph.reshape", "graph.permute", "graph.expand", "graph.slice", "graph.cast")
def fold_shape_op_of_full(op: Operation, rw: PatternRewriter) -> bool:
    """reshape/permute/expand/slice/cast of a fill -> a fill of the result type (no data)."""
    src = producer(op.x)
    if src is None or src.name != "graph.full":
        return False
    value = src.value
    if op.name == "graph.cast":
        value = convert(np.asarray(value), op.dtype).item()  # as graph.cast computes
    rw.replace_op(op, rw.value(graph.FullOp, value=value, result_types=[op.result.type]))
    return True


@pattern("graph.neg")
def fold_double_negation(op: Operation, rw: PatternRewriter) -> bool:
    """-(-x) -> x"""
    inner = producer(op.x)
    if inner is None or inner.name != "graph.neg":
        return False
    rw.replace_op(op, inner.x)
    return True


@pattern("graph.reshape", "graph.expand", "graph.cast", "graph.concat", "graph.pad")
def remove_noop(op: Operation, rw: PatternRewriter) -> bool:
    """A reshape/expand/cast/pad to the operand's own type, or a concat of one tensor -> x."""
    if len(op.operands) != 1 or not _same_type(op.operands[0], op.result):
        return False
    rw.replace_op(op, op.operands[0])
    return True


@pattern("graph.permute")
def remove_identity_permute(op: Operation, rw: PatternRewriter) -> bool:
    """permute(x, [0, 1, ...]) -> x"""
    if list(op.perm) != list(range(len(op.perm))):
        return False
    rw.replace_op(op, op.x)
    return True


@pattern("graph.slice")
def remove_whole_slice(op: Operation, rw: PatternRewriter) -> bool:
    """x[0:end:1] covering the whole axis -> x"""
    if op.start != 0 or op.step != 1 or not _same_type(op.x, op.result):
        return False
    rw.replace_op(op, op.x)
    return True


@pattern("graph.reshape")
def merge_reshapes(op: Operation, rw: PatternRewriter) -> bool:
    """reshape(reshape(x)) -> reshape(x)"""
    inner = producer(op.x)
    if inner is None or inner.name != "graph.reshape":
        return False
    rw.replace_op(op, rw.value(graph.ReshapeOp, inner.x, result_types=[op.result.type]))
    return True


@pattern("graph.permute")
def merge_permutes(op: Operation, rw: PatternRewriter) -> bool:
    """permute(permute(x, p), q) -> permute(x, p[q])"""
    inner = producer(op.x)
    if inner is None or inner.name != "graph.permute":
        return False
    perm = tuple(inner.perm[i] for i in op.perm)
    rw.replace_op(op, rw.value(graph.PermuteOp, inner.x, perm=perm))
    return True


@pattern("graph.permute")
def permute_of_unit_dims_to_reshape(op: Operation, rw: PatternRewriter) -> bool:
    """A permute that only moves size-1 dims is a reshape (no data moves)."""
    shape = op.x.type.shape
    moved = [p for p in op.perm if shape[p] != 1]
    if moved != sorted(moved) or list(op.perm) == list(range(len(op.perm))):
        return False
    rw.replace_op(op, rw.value(graph.ReshapeOp, op.x, result_types=[op.result.type]))
    return True


VIEW_CHAIN_ELEMENTS = 1 << 22  # chains over more elements (per batch row) are left alone


def _view_chain(op: Operation) -> list[Operation]:
    """`op` and the single-use reshapes/permutes feeding it, nearest first."""
    chain = [op]
    while True:
        value = chain[-1].x
        src = producer(value)
        if src is None or not src.has(Trait.VIEW) or len(value.users) != 1:
            return chain
        chain.append(src)


def _row_shape(op_type: TensorType, dim0: Dim) -> tuple[int, ...] | None:
    """The shape with dim 0 as 1 when it is `dim0` (a batch kept by every op), else static."""
    shape = list(op_type.shape)
    if shape and not isinstance(shape[0], int):
        if format_dim(shape[0]) != format_dim(dim0):
            return None
        shape[0] = 1
    static = [d for d in shape if isinstance(d, int)]
    return tuple(static) if len(static) == len(shape) else None


@pattern("graph.reshape", "graph.permute")
def collapse_views_to_reshape(op: Operation, rw: PatternRewriter) -> bool:
    """reshapes and permutes that leave every element in place -> one reshape

    E.g. NHWC -> permute to NCHW -> flatten HW -> permute back is a reshape of the NHWC tensor.
    Checked by running the chain on an index array; a symbolic dim 0 must be kept by every op
    (then the chain acts on each batch row alike, and one row decides).
    """
    chain = _view_chain(op)
    if len(chain) < 2 or not any(o.name == "graph.permute" for o in chain):
        return False
    source = chain[-1].x
    dim0 = source.type.shape[0] if source.type.rank else 1
    shape = _row_shape(source.type, dim0)
    if shape is None or int(np.prod(shape)) > VIEW_CHAIN_ELEMENTS:
        return False
    index = np.arange(int(np.prod(shape))).reshape(shape)
    for view in reversed(chain):
        if view.name == "graph.permute":
            if not isinstance(dim0, int) and view.perm[0] != 0:
                return False
            index = index.transpose(view.perm)
        else:
            out = _row_shape(view.result.type, dim0)
            if out is None:
                return False
            index = index.reshape(out)
    if not np.array_equal(index.reshape(-1), np.arange(index.size)):
        return False
    rw.replace_op(op, rw.value(graph.ReshapeOp, source, result_types=[op.result.type]))
    return True


def _swap_last_two(perm: tuple[int, ...]) -> tuple[int, ...]:
    return perm[:-2] + (perm[-1], perm[-2])


@pattern("graph.matmul", benefit=2)
def fold_transpose_into_matmul(op: Operation, rw: PatternRewriter) -> bool:
    """matmul(a, permute(b, p)) -> matmul{transpose_rhs}(a, permute(b, p')) (same for lhs)

    Done when p moves b's innermost (contiguous) dim into the second-to-last place: then p' keeps
    it innermost, so the matmul reads rows contiguously; p' is often the identity.
    """
    for index, flag in ((1, "transpose_rhs"), (0, "transpose_lhs")):
        perm_op = producer(op.operands[index])
        if perm_op is None or perm_op.name != "graph.permute":
            continue
        perm = tuple(perm_op.perm)
        if len(perm) < 2 or perm[-2] != len(perm) - 1:
            continue
        operand = rw.value(graph.PermuteOp, perm_op.x, perm=_swap_last_two(perm))
        operands = list(op.operands)
        operands[index] = operand
        attrs = dict(op.attributes)
        attrs[flag] = not attrs[flag]
        rw.replace_op(op, rw.value(graph.MatmulOp, *operands, **attrs))
        return True
    return False


def _conv_out_axis(conv: Operation) -> tuple[int, int]:
    """(channel axis of the conv's result, out-channel axis of its weight)."""
    return (3, 3) if conv.layout == "NHWC" else (1, 0)


@pattern("graph.batch_norm")
def fold_batch_norm_into_conv(op: Operation, rw: PatternRewriter) -> bool:
    """batch_norm(conv2d(x, w, b)) with constant statistics -> conv2d(x, w', b')"""
    conv = producer(op.x)
    if conv is None or conv.name != "graph.conv2d" or len(op.x.uses) != 1:
        return False
    out_axis, w_axis = _conv_out_axis(conv)
    if op.axis % op.x.type.rank != out_axis:
        return False
    params = constant_arrays(op.operands[1:], rw.module)
    weights = constant_arrays(conv.operands[1:], rw.module)
    if params is None or weights is None:
        return False
    mean, var, *affine = params
    gamma = affine[0] if affine else np.ones_like(mean)
    beta = affine[1] if len(affine) > 1 else np.zeros_like(mean)
    w, bias = weights[0], (weights[1] if len(weights) > 1 else np.zeros_like(mean))
    scale = (gamma / np.sqrt(var.astype(np.float32) + np.float32(op.eps))).astype(w.dtype)
    shape = [1] * w.ndim
    shape[w_axis] = -1
    weight_src = producer(conv.weight)
    base = (weight_src.attributes.get("weight") if weight_src is not None else None) or "conv"
    new_w = make_constant(rw, w * scale.reshape(shape), conv.weight, f"{base}.bn")
    new_b = make_constant(rw, ((bias - mean) * scale + beta).astype(w.dtype), op.operands[1],
                          f"{base}.bn_bias")
    rw.replace_op(op, rw.value(graph.Conv2dOp, conv.x, new_w, new_b, **conv.attributes))
    return True


CANONICAL_PATTERNS = (
    fold_constant_op, fold_shape_op_of_full, fold_unit_operand, fold_unit_rhs,
    fold_double_negation, remove_noop, remove_identity_permute, remove_whole_slice,
    merge_reshapes, merge_permutes, permute_of_unit_dims_to_reshape, collapse_views_to_reshape,
    fold_transpose_into_matmul, fold_batch_norm_into_conv)


@register_pass("canonicalize")
@dataclass(frozen=True)
class Canonicalize(ModulePass):
    """Fold constants, simplify algebra and shape ops, drop dead ops, to a fixpoint."""

    max_iterations: int = 16

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise PipelineError(f"max-iterations must be >= 1, got {self.max_iterations}")

    def run(self, module: Module, ctx: PassContext) -> None:
        def erase_dead(block: Block) -> None:
            ctx.count("ops-removed", erase_dead_ops(block))  # every sweep's erasures count

        fired = apply_patterns(module, CANONICAL_PATTERNS, max_iterations=self.max_iterations,
                               before_sweep=erase_dead)
        for name, n in fired.items():
            ctx.count(name, n)
        erase_dead(module.body)
        ctx.count("weights-removed", prune_weights(module))
