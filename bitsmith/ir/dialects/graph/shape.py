"""Shape and data-movement ops: reshape, permute, expand, slice, concat, split, gathers, pad."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ....errors import IndexOutOfRangeError, InterpretError, VerifyError
from ...core import Operation, OpResult, Trait, Value, attr, register_op
from ...dtypes import DType
from ...interpreter import EvalContext
from ...shapes import product
from ...types import Dim, TensorType, dims_equal, format_dim
from .elementwise import CastOp, checked_axis, checked_broadcast


def _index_type(op: Operation, type: TensorType, what: str) -> None:
    if not (isinstance(type.dtype, DType) and type.dtype.is_int):
        raise VerifyError(op, f"{what} must have an integer element type, got {type.dtype}")


@register_op
class ReshapeOp(Operation):
    """View the elements in another shape (the target shape is the result type)."""

    name = "graph.reshape"
    TRAITS = frozenset({Trait.INJECTIVE, Trait.VIEW})
    OPERANDS = ("x",)
    RESULT_TYPES_GIVEN = True

    def verify_(self) -> None:
        src, dst = self.x.type, self.result.type
        if src.dtype != dst.dtype:
            raise VerifyError(self, f"element type changes from {src.dtype} to {dst.dtype}")
        if not dims_equal(product(src.shape), product(dst.shape)):
            raise VerifyError(self, f"element count differs: {src} has "
                                    f"{format_dim(product(src.shape))}, {dst} has "
                                    f"{format_dim(product(dst.shape))}")

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        return x.reshape(ctx.shape(self.result.type))


@register_op
class PermuteOp(Operation):
    """Reorder axes: result dim i is input dim perm[i]."""

    name = "graph.permute"
    TRAITS = frozenset({Trait.INJECTIVE, Trait.VIEW})
    OPERANDS = ("x",)
    ATTRS = {"perm": attr("ints")}

    def infer_types(self) -> list[TensorType]:
        shape = self.x.type.shape
        if sorted(self.perm) != list(range(len(shape))):
            raise VerifyError(self, f"perm {list(self.perm)} is not a permutation of "
                                    f"0..{len(shape) - 1}")
        return [self.x.type.with_shape(tuple(shape[p] for p in self.perm))]

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.transpose(x, self.perm), order="C")


@register_op
class ExpandOp(Operation):
    """Broadcast size-1 dims (and new leading dims) to the result type's shape."""

    name = "graph.expand"
    TRAITS = frozenset({Trait.BROADCAST})
    OPERANDS = ("x",)
    RESULT_TYPES_GIVEN = True

    def verify_(self) -> None:
        src, dst = self.x.type, self.result.type
        if src.dtype != dst.dtype or src.rank > dst.rank:
            raise VerifyError(self, f"cannot expand {src} to {dst}")
        for s, d in zip(src.shape, dst.shape[dst.rank - src.rank:], strict=True):
            if s != 1 and not dims_equal(s, d):
                raise VerifyError(self, f"cannot expand {src} to {dst}: dim {format_dim(s)} "
                                        f"is neither 1 nor {format_dim(d)}")

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.broadcast_to(x, ctx.shape(self.result.type)), order="C")


@register_op
class SliceOp(Operation):
    """x[start:end:step] along one axis (torch clamping of start and end; step > 0)."""

    name = "graph.slice"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("x",)
    ATTRS = {"axis": attr("int"), "start": attr("int", 0), "end": attr("int"),
             "step": attr("int", 1)}

    def infer_types(self) -> list[TensorType]:
        shape = list(self.x.type.shape)
        axis = checked_axis(self, self.axis, len(shape))
        if self.step < 1:
            raise VerifyError(self, f"step must be >= 1, got {self.step}")
        dim = shape[axis]
        if isinstance(dim, int):
            shape[axis] = len(range(*slice(self.start, self.end, self.step).indices(dim)))
        elif not (self.start == 0 and self.end >= 2**62 and self.step == 1):
            raise VerifyError(self, f"only a whole slice of symbolic dim {format_dim(dim)} is "
                                    f"supported, got [{self.start}:{self.end}:{self.step}]")
        return [self.x.type.with_shape(tuple(shape))]

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        index = [slice(None)] * x.ndim
        index[self.axis % x.ndim] = slice(self.start, self.end, self.step)
        return np.asarray(x[tuple(index)], order="C")


@register_op
class ConcatOp(Operation):
    """Join tensors along an axis."""

    name = "graph.concat"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("*inputs",)
    ATTRS = {"axis": attr("int")}

    def infer_types(self) -> list[TensorType]:
        inputs = [v.type for v in self.variadic()]
        if not inputs:
            raise VerifyError(self, "needs at least one input")
        first = inputs[0]
        axis = checked_axis(self, self.axis, first.rank)
        for t in inputs[1:]:
            same = t.rank == first.rank and all(
                i == axis or dims_equal(a, b)
                for i, (a, b) in enumerate(zip(t.shape, first.shape, strict=True)))
            if not same or t.dtype != first.dtype:
                raise VerifyError(self, f"inputs {first} and {t} differ off axis {axis}")
        shape = list(first.shape)
        shape[axis] = _sum_dims([t.shape[axis] for t in inputs])
        return [first.with_shape(tuple(shape))]

    def evaluate(self, ctx: EvalContext, *xs: np.ndarray) -> np.ndarray:
        return np.concatenate(xs, axis=self.axis % xs[0].ndim)


def _sum_dims(dims: list[Dim]) -> Dim:
    total = dims[0]
    for d in dims[1:]:
        total = total + d
    return total


@register_op
class SplitOp(Operation):
    """Cut a tensor into pieces of the given sizes along an axis."""

    name = "graph.split"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("x",)
    ATTRS = {"axis": attr("int"), "sizes": attr("ints")}
    NUM_RESULTS = None

    def infer_types(self) -> list[TensorType]:
        shape = list(self.x.type.shape)
        axis = checked_axis(self, self.axis, len(shape))
        if not dims_equal(sum(self.sizes), shape[axis]):
            raise VerifyError(self, f"sizes {list(self.sizes)} sum to {sum(self.sizes)}, "
                                    f"dim {axis} is {format_dim(shape[axis])}")
        return [self.x.type.with_shape(tuple(shape[:axis] + [s] + shape[axis + 1:]))
                for s in self.sizes]

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> tuple[np.ndarray, ...]:
        bounds = np.cumsum(self.sizes)[:-1]
        return tuple(np.asarray(p, order="C")
                     for p in np.split(x, bounds, axis=self.axis % x.ndim))


@dataclass(frozen=True, slots=True)
class IndexBound:
    """An index operand and the values torch accepts in it: [-size, size) when `negative`
    (negatives count from the end), else [0, size); `size` is dim `axis` of the indexed
    tensor."""

    operand: int  # position among the op's operands
    name: str  # the operand's name, for messages
    axis: int
    size: Dim
    negative: bool


class IndexingOp(Operation):
    """An op that reads a tensor at positions held in integer operands (gather, embedding,
    index_select, index). An index out of range is an error: the interpreter raises
    IndexOutOfRangeError; compiled code checks these operands before the kernel runs."""

    def index_bounds(self) -> list[IndexBound]:
        """Each index operand with its valid range."""
        raise NotImplementedError

    def check_indices(self, operands: tuple[np.ndarray, ...]) -> None:
        """Raise IndexOutOfRangeError when an index operand holds a value out of range."""
        for bound in self.index_bounds():
            idx = operands[bound.operand]
            size = int(operands[0].shape[bound.axis])
            low = -size if bound.negative else 0
            if idx.size and (idx.min() < low or idx.max() >= size):
                bad = idx.min() if idx.min() < low else idx.max()
                where = f"'{self.name}'" + (f" at {self.loc}" if self.loc else "")
                raise IndexOutOfRangeError(
                    f"{where}, operand {bound.name}: index {bad} out of range [{low}, {size}) "
                    f"(dim {bound.axis} has size {size}); pass indices in that range")


def carries_indices(op: Operation) -> bool:
    """Whether every value of `op`'s result is a value of its one operand (reshape, permute,
    expand, or a cast between int types that holds every value of the source type): a range
    check of the operand then covers the result. Narrowing casts wrap and float casts
    truncate, so they do not."""
    if isinstance(op, (ReshapeOp, PermuteOp, ExpandOp)):
        return True
    if isinstance(op, CastOp):
        src, dst = op.x.type.dtype, op.dtype
        return (isinstance(src, DType) and isinstance(dst, DType) and src.is_int
                and dst.is_int and dst.min_value <= src.min_value
                and src.max_value <= dst.max_value)
    return False


def index_source(value: Value, inside: Callable[[Operation], bool]) -> Value:
    """The value whose range check covers `value`: walk back through `carries_indices` ops
    for which `inside` holds."""
    while isinstance(value, OpResult) and inside(value.op) and carries_indices(value.op):
        value = value.op.operands[0]
    return value


@register_op
class GatherOp(IndexingOp):
    """torch.gather: out[i][j] = x[index[i][j]][j] along `axis`; out has index's shape."""

    name = "graph.gather"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("x", "index")
    ATTRS = {"axis": attr("int")}

    def infer_types(self) -> list[TensorType]:
        x, index = self.x.type, self.index.type
        axis = checked_axis(self, self.axis, x.rank)
        _index_type(self, index, "index")
        too_big = index.rank == x.rank and any(
            i != axis and isinstance(a, int) and isinstance(b, int) and a > b
            for i, (a, b) in enumerate(zip(index.shape, x.shape, strict=True)))
        if index.rank != x.rank or too_big:
            raise VerifyError(self, f"index {index} must have the rank of x {x} and no "
                                    f"larger dims off axis {axis}")
        return [index.with_dtype(x.dtype)]

    def index_bounds(self) -> list[IndexBound]:
        axis = self.axis % self.x.type.rank  # torch's gather takes no negative indices
        return [IndexBound(1, "index", axis, self.x.type.shape[axis], negative=False)]

    def evaluate(self, ctx: EvalContext, x: np.ndarray, index: np.ndarray) -> np.ndarray:
        self.check_indices((x, index))
        axis = self.axis % x.ndim
        # torch reads only the leading index.shape[d] entries of x in the other dims
        x = x[tuple(slice(None) if d == axis else slice(n) for d, n in enumerate(index.shape))]
        return np.take_along_axis(x, index.astype(np.int64), axis=axis)


@register_op
class IndexSelectOp(IndexingOp):
    """Pick slices along `axis` by a 0-d or 1-d index tensor (the dim becomes index's shape)."""

    name = "graph.index_select"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("x", "index")
    ATTRS = {"axis": attr("int")}

    def infer_types(self) -> list[TensorType]:
        shape = list(self.x.type.shape)
        axis = checked_axis(self, self.axis, len(shape))
        _index_type(self, self.index.type, "index")
        new = shape[:axis] + list(self.index.type.shape) + shape[axis + 1:]
        return [self.x.type.with_shape(tuple(new))]

    def index_bounds(self) -> list[IndexBound]:
        axis = self.axis % self.x.type.rank
        return [IndexBound(1, "index", axis, self.x.type.shape[axis], negative=False)]

    def evaluate(self, ctx: EvalContext, x: np.ndarray, index: np.ndarray) -> np.ndarray:
        self.check_indices((x, index))
        axis = self.axis % x.ndim
        return np.asarray(np.take(x, index.astype(np.int64), axis=axis), order="C")


@register_op
class EmbeddingOp(IndexingOp):
    """Rows of `weight` picked by integer `indices`: result shape indices.shape + [D]."""

    name = "graph.embedding"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("weight", "indices")

    def infer_types(self) -> list[TensorType]:
        if self.weight.type.rank != 2:
            raise VerifyError(self, f"weight must be 2-d, got {self.weight.type}")
        _index_type(self, self.indices.type, "indices")
        shape = tuple(self.indices.type.shape) + (self.weight.type.shape[1],)
        return [self.weight.type.with_shape(shape)]

    def index_bounds(self) -> list[IndexBound]:
        return [IndexBound(1, "indices", 0, self.weight.type.shape[0], negative=False)]

    def evaluate(self, ctx: EvalContext, weight: np.ndarray, indices: np.ndarray) -> np.ndarray:
        self.check_indices((weight, indices))
        return np.asarray(weight[indices.astype(np.int64)], order="C")


@register_op
class IndexOp(IndexingOp):
    """Advanced indexing x[..., i0, i1, ...] at `axes` (numpy/torch rules): the index tensors
    broadcast together; their shape replaces the indexed dims in place when the axes are
    adjacent, else it goes first."""

    name = "graph.index"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("x", "*indices")
    ATTRS = {"axes": attr("ints")}

    def infer_types(self) -> list[TensorType]:
        x, indices = self.x.type, self.operands[1:]
        axes = [checked_axis(self, a, x.rank) for a in self.axes]
        if len(axes) != len(indices) or not axes or axes != sorted(set(axes)):
            raise VerifyError(self, f"axes {list(self.axes)} must be increasing, one per index "
                                    f"tensor ({len(indices)})")
        for value in indices:
            _index_type(self, value.type, "index")
        picked = checked_broadcast(self, *[v.type.shape for v in indices])
        rest = [d for i, d in enumerate(x.shape) if i not in axes]
        if axes == list(range(axes[0], axes[-1] + 1)):
            shape = list(x.shape[:axes[0]]) + list(picked) + list(x.shape[axes[-1] + 1:])
        else:
            shape = list(picked) + rest
        return [x.with_shape(tuple(shape))]

    def index_bounds(self) -> list[IndexBound]:
        shape = self.x.type.shape
        return [IndexBound(1 + k, f"indices[{k}]", a % len(shape), shape[a % len(shape)],
                           negative=True) for k, a in enumerate(self.axes)]

    def evaluate(self, ctx: EvalContext, x: np.ndarray, *indices: np.ndarray) -> np.ndarray:
        self.check_indices((x, *indices))
        key: list[slice | np.ndarray] = [slice(None)] * x.ndim
        for axis, idx in zip(self.axes, indices, strict=True):
            key[axis % x.ndim] = idx.astype(np.int64)
        return np.asarray(x[tuple(key)], order="C")


@register_op
class PadOp(Operation):
    """Constant padding: `pads` holds (before, after) per axis, in axis order."""

    name = "graph.pad"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("x",)
    ATTRS = {"pads": attr("ints"), "value": attr("float", 0.0)}

    def infer_types(self) -> list[TensorType]:
        shape = list(self.x.type.shape)
        if len(self.pads) != 2 * len(shape):
            raise VerifyError(self, f"pads needs 2 entries per axis ({2 * len(shape)}), "
                                    f"got {len(self.pads)}")
        out = [d + self.pads[2 * i] + self.pads[2 * i + 1] for i, d in enumerate(shape)]
        return [self.x.type.with_shape(tuple(out))]

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        pairs = [(self.pads[2 * i], self.pads[2 * i + 1]) for i in range(x.ndim)]
        if any(p < 0 for pair in pairs for p in pair):
            raise InterpretError(self, "negative padding is not supported; use graph.slice")
        return np.pad(x, pairs, constant_values=self.x.type.dtype.cast(
            np.asarray(self.value)).item())
