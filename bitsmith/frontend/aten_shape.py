"""ATen converters for views, layout changes, slicing, joining and gathering."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConversionError
from ..ir import Value, graph
from ..ir import dtypes as dt
from ..ir.types import TensorType
from .context import ImportContext, converts, plain_dtype

aten = torch.ops.aten
INT64_MAX = 2**63 - 1


@converts(aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
          aten.flatten.using_ints, aten.unflatten.int, aten.view_copy.default)
def convert_reshape(ctx: ImportContext, x: Value, *args: Any) -> Value:
    return ctx.reshape(x, ctx.out_type())


@converts(aten.permute.default)
def convert_permute(ctx: ImportContext, x: Value, dims: Sequence[int]) -> Value:
    perm = tuple(d % max(x.type.rank, 1) for d in dims)
    if perm == tuple(range(x.type.rank)):
        return x
    return ctx.value(graph.PermuteOp, x, perm=perm)


@converts(aten.transpose.int)
def convert_transpose(ctx: ImportContext, x: Value, dim0: int, dim1: int) -> Value:
    perm = list(range(x.type.rank))
    a, b = dim0 % x.type.rank, dim1 % x.type.rank
    perm[a], perm[b] = perm[b], perm[a]
    return convert_permute(ctx, x, perm)


@converts(aten.t.default, aten.numpy_T.default)
def convert_t(ctx: ImportContext, x: Value) -> Value:
    return convert_permute(ctx, x, list(reversed(range(x.type.rank))))


@converts(aten.expand.default, aten.expand_copy.default, aten.broadcast_to.default)
def convert_expand(ctx: ImportContext, x: Value, *args: Any, **kwargs: Any) -> Value:
    out = ctx.out_type()
    if x.type.same_as(out):
        return x
    return ctx.value(graph.ExpandOp, x, result_types=[out])


@converts(aten.repeat.default)
def convert_repeat(ctx: ImportContext, x: Value, repeats: Sequence[int]) -> Value:
    """repeat = reshape to [1, d0, 1, d1, ...], expand to [r0, d0, ...], reshape."""
    out = ctx.out_type()
    lead = len(repeats) - x.type.rank
    dims = (1,) * lead + tuple(x.type.shape)
    spread = TensorType(tuple(v for d in dims for v in (1, d)), x.type.dtype)
    grown = TensorType(tuple(v for r, d in zip(repeats, dims, strict=True) for v in (r, d)),
                       x.type.dtype)
    expanded = ctx.value(graph.ExpandOp, ctx.reshape(x, spread), result_types=[grown])
    return ctx.reshape(expanded, out)


@converts(aten.slice.Tensor, aten.slice_copy.Tensor)
def convert_slice(ctx: ImportContext, x: Value, dim: int = 0, start: Any = None,
                  end: Any = None, step: int = 1) -> Value:
    out = ctx.out_type()
    if x.type.same_as(out):
        return x
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    axis = dim % x.type.rank
    if not isinstance(start, int) or not isinstance(step, int):
        raise ConversionError(f"slice with symbolic bounds [{start}:{end}]")
    whole = start == 0 and isinstance(end, int) and end >= 2**62 and step == 1
    if not isinstance(end, int) or not (isinstance(x.type.shape[axis], int) or whole):
        return _slice_rows(ctx, x, axis, start, step, out)
    return ctx.value(graph.SliceOp, x, axis=axis, start=start, end=end, step=step)


def _slice_rows(ctx: ImportContext, x: Value, axis: int, start: int, step: int,
                out: TensorType) -> Value:
    """A slice with a symbolic end (a position table cut to the sequence length S), or of a
    symbolic dim (x[:, 0] of a B x S input): the rows start, start + step, ... picked by an
    arange as long as torch's result dim. A dim too short at run time is an out-of-range index
    (an error), never a read past the end."""
    size = x.type.shape[axis]
    if start < 0:
        if not isinstance(size, int):
            raise ConversionError(f"slice [{start}:...] from the end of symbolic dim {size}")
        start += size
    rows = ctx.value(graph.ArangeOp, result_types=[TensorType((out.shape[axis],), dt.i64)],
                     start=start, step=step)
    return ctx.value(graph.IndexSelectOp, x, rows, axis=axis)


@converts(aten.select.int)
def convert_select(ctx: ImportContext, x: Value, dim: int, index: int) -> Value:
    axis = dim % x.type.rank
    if not isinstance(index, int):
        raise ConversionError("select with a symbolic index")
    end = index + 1 if index != -1 else INT64_MAX
    if not isinstance(x.type.shape[axis], int):
        picked = ctx.out_type()
        one = TensorType(picked.shape[:axis] + (1,) + picked.shape[axis:], picked.dtype)
        return ctx.reshape(_slice_rows(ctx, x, axis, index, 1, one), picked)
    piece = ctx.value(graph.SliceOp, x, axis=axis, start=index, end=end, step=1)
    return ctx.reshape(piece, ctx.out_type())


@converts(aten.cat.default, aten.concat.default)
def convert_cat(ctx: ImportContext, tensors: Sequence[Value], dim: int = 0) -> Value:
    out = ctx.out_type()
    dtype = plain_dtype(out)
    parts = [ctx.cast(t, dtype) for t in tensors if t.type.numel() != 0]
    if len(parts) == 1:
        return parts[0]
    return ctx.value(graph.ConcatOp, *parts, axis=dim % out.rank)


@converts(aten.split_with_sizes.default, aten.split.Tensor, aten.split.sizes)
def convert_split(ctx: ImportContext, x: Value, sizes: Any, dim: int = 0) -> tuple[Value, ...]:
    axis = dim % x.type.rank
    length = x.type.shape[axis]
    if not isinstance(length, int):
        raise ConversionError("split along a symbolic dim")
    if isinstance(sizes, int):
        sizes = [min(sizes, length - s) for s in range(0, length, sizes)]
    return tuple(ctx.op(graph.SplitOp, x, axis=axis, sizes=tuple(sizes)).results)


@converts(aten.unbind.int)
def convert_unbind(ctx: ImportContext, x: Value, dim: int = 0) -> tuple[Value, ...]:
    axis = dim % x.type.rank
    count = x.type.shape[axis]
    if not isinstance(count, int):
        raise ConversionError("unbind along a symbolic dim")
    pieces = ctx.op(graph.SplitOp, x, axis=axis, sizes=(1,) * count).results
    return tuple(ctx.reshape(p, ctx.out_type(i)) for i, p in enumerate(pieces))


@converts(aten.embedding.default)
def convert_embedding(ctx: ImportContext, weight: Value, indices: Value, padding_idx: int = -1,
                      *args: Any) -> Value:
    return ctx.value(graph.EmbeddingOp, weight, indices)


@converts(aten.index_select.default)
def convert_index_select(ctx: ImportContext, x: Value, dim: int, index: Value) -> Value:
    return ctx.value(graph.IndexSelectOp, x, index, axis=dim % x.type.rank)


@converts(aten.gather.default)
def convert_gather(ctx: ImportContext, x: Value, dim: int, index: Value, *args: Any) -> Value:
    return ctx.value(graph.GatherOp, x, index, axis=dim % x.type.rank)


@converts(aten.index.Tensor)
def convert_index(ctx: ImportContext, x: Value, indices: Sequence[Value | None]) -> Value:
    """x[..., idx, ...] with integer index tensors (numpy/torch advanced indexing)."""
    present = [(axis, i) for axis, i in enumerate(indices) if i is not None]
    if any(i.type.dtype == dt.boolean for _, i in present):
        raise ConversionError("boolean-mask indexing (data-dependent shape)")
    axes = tuple(axis for axis, _ in present)
    return ctx.value(graph.IndexOp, x, *[i for _, i in present], axes=axes)


@converts(aten.constant_pad_nd.default)
def convert_pad(ctx: ImportContext, x: Value, pad: Sequence[int], value: float = 0.0) -> Value:
    pairs = [0] * (2 * x.type.rank)
    for i in range(len(pad) // 2):  # torch lists (before, after) from the last axis back
        axis = x.type.rank - 1 - i
        pairs[2 * axis], pairs[2 * axis + 1] = pad[2 * i], pad[2 * i + 1]
    if any(p < 0 for p in pairs):
        raise ConversionError("negative padding")
    return ctx.value(graph.PadOp, x, pads=tuple(pairs), value=float(value))


def _triangle(ctx: ImportContext, x: Value, diagonal: int, lower: bool) -> Value:
    """Keep x[i, j] where j - i <= diagonal (tril) or j - i >= diagonal (triu), else 0."""
    rows, cols = x.type.shape[-2], x.type.shape[-1]
    i = ctx.reshape(ctx.value(graph.ArangeOp, result_types=[TensorType((rows,), dt.i64)]),
                    TensorType((rows, 1), dt.i64))
    j = ctx.value(graph.ArangeOp, result_types=[TensorType((cols,), dt.i64)])
    offset = ctx.value(graph.BINARY_OPS["sub"], j, i)
    keep = ctx.value(graph.BINARY_OPS["le" if lower else "ge"], offset,
                     ctx.scalar(diagonal, dt.i64))
    return ctx.value(graph.WhereOp, keep, x, ctx.scalar(0, plain_dtype(x.type)))


@converts(aten.tril.default)
def convert_tril(ctx: ImportContext, x: Value, diagonal: int = 0) -> Value:
    return _triangle(ctx, x, diagonal, lower=True)


@converts(aten.triu.default)
def convert_triu(ctx: ImportContext, x: Value, diagonal: int = 0) -> Value:
    return _triangle(ctx, x, diagonal, lower=False)
