"""ATen converters composed from existing graph ops at import time, so that the interpreter and
both backends (TVM, Triton) cover them with no rules of their own:

- convolution: 1-d (as 2-d with H = 1) and transposed (zeros between input pixels, padding,
  then a stride-1 conv2d by the spatially flipped weight with in/out channels swapped per group)
- group norm and batch-statistics batch norm (instance norm): layer_norm over a reshaped view
- upsampling: in `aten_resample.py`
- leaky_relu, elu, flip, and log1p, expm1 and fmod (graph ops of their own)
- sort and topk along a short axis by ranks from broadcast compares (O(n^2), n <= MAX_SORT)
- linalg_vector_norm for every real `ord`
- _embedding_bag (sum/mean/max) over bags known at compile time

Multi-output ops return None for outputs they do not compute and refuse, with a
ConversionError, a model that uses one (`_refuse_used_outputs`).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConversionError
from ..ir import DenseAttr, Value, graph
from ..ir import dtypes as dt
from ..ir.shapes import product
from ..ir.types import Dim, TensorType, dims_equal, format_dim
from . import aten_nn
from .context import ImportContext, converts, plain_dtype

aten = torch.ops.aten

MAX_SORT = 1024
"""Longest axis sort/topk compose over: they compare every pair, O(n^2) per row."""


# ---- helpers --------------------------------------------------------------------------------
def _un(ctx: ImportContext, name: str, x: Value) -> Value:
    return ctx.value(graph.UNARY_OPS[name], x)


def _bin(ctx: ImportContext, name: str, a: Value, b: Value) -> Value:
    return ctx.value(graph.BINARY_OPS[name], a, b)


def _literal(ctx: ImportContext, array: np.ndarray, dtype: dt.DType) -> Value:
    """An inline constant (the importer has no module to add weights to: keep them small)."""
    array = dtype.cast(np.asarray(array))
    type = TensorType(tuple(array.shape), dtype)
    return ctx.value(graph.ConstantOp, result_types=[type], value=DenseAttr(type, array))


def _static(d: Dim, what: str) -> int:
    if not isinstance(d, int):
        raise ConversionError(f"{what} along a symbolic dim {format_dim(d)}")
    return d


def _axis(x: Value, dim: int) -> int:
    return dim % max(x.type.rank, 1)


def _refuse_used_outputs(ctx: ImportContext, first: int, what: str) -> None:
    """A ConversionError if the model reads output `first` or a later one of the current node
    (outputs the converter does not compute)."""
    for user in ctx.current.users:
        index = user.args[1] if user.target is operator.getitem else None
        if isinstance(index, int) and index >= first and user.users:
            raise ConversionError(f"{what}: output {user.args[1]} is used by the model and not "
                                  "supported (only output 0 is)")


def _reverse(ctx: ImportContext, x: Value, axis: int) -> Value:
    """x reversed along `axis`: index_select by n-1, n-2, ..., 0."""
    n = _static(x.type.shape[axis], "flip")
    if n <= 1:
        return x
    index = ctx.value(graph.ArangeOp, result_types=[TensorType((n,), dt.i64)], start=n - 1,
                      step=-1)
    return ctx.value(graph.IndexSelectOp, x, index, axis=axis)


def _permute(ctx: ImportContext, x: Value, perm: Sequence[int]) -> Value:
    if tuple(perm) == tuple(range(x.type.rank)):
        return x
    return ctx.value(graph.PermuteOp, x, perm=tuple(perm))


def _channel_affine(ctx: ImportContext, y: Value, weight: Value | None, bias: Value | None
                    ) -> Value:
    """y * weight + bias with [C] parameters on axis 1 of y."""
    shape = (y.type.shape[1],) + (1,) * (y.type.rank - 2)
    if weight is not None:
        y = _bin(ctx, "mul", y, ctx.reshape(weight, weight.type.with_shape(shape)))
    if bias is not None:
        y = _bin(ctx, "add", y, ctx.reshape(bias, bias.type.with_shape(shape)))
    return y


def _constant_array(ctx: ImportContext, value: Value) -> np.ndarray | None:
    """The value of `value` when import already knows it: an arange, a literal or a weight
    (through reshapes, casts and clones); else None."""
    op = getattr(value, "op", None)
    if isinstance(op, (graph.ReshapeOp, graph.CastOp)):
        inner = _constant_array(ctx, op.x)
        if inner is None:
            return None
        shape = [d for d in value.type.shape if isinstance(d, int)]
        if len(shape) != value.type.rank:
            return None
        return plain_dtype(value.type).cast(inner.reshape(shape))
    if isinstance(op, graph.ArangeOp):
        (n,) = value.type.shape
        if not isinstance(n, int):
            return None
        return plain_dtype(value.type).cast(op.start + np.arange(n) * op.step)
    if isinstance(op, graph.ConstantOp):
        if op.value is not None:
            return op.value.array
        if op.weight in ctx.weights:
            return np.asarray(ctx.weights[op.weight])
    return None


# ---- elementwise ----------------------------------------------------------------------------
@converts(aten.log1p.default, aten.expm1.default)
def convert_log1p_expm1(ctx: ImportContext, x: Value) -> Value:
    name = "log1p" if ctx.current.target is aten.log1p.default else "expm1"
    return _un(ctx, name, ctx.cast(x, ctx.out_dtype()))


@converts(aten.fmod.Tensor, aten.fmod.Scalar)
def convert_fmod(ctx: ImportContext, a: Any, b: Any) -> Value:
    dtype = ctx.out_dtype()
    return _bin(ctx, "fmod", ctx.as_tensor(a, dtype), ctx.as_tensor(b, dtype))


@converts(aten.leaky_relu.default)
def convert_leaky_relu(ctx: ImportContext, x: Value, negative_slope: Any = 0.01) -> Value:
    """x > 0 ? x : x * slope (NaN takes the second branch and stays NaN, as in torch)."""
    dtype = plain_dtype(x.type)
    positive = _bin(ctx, "gt", x, ctx.scalar(0, dtype))
    return ctx.value(graph.WhereOp, positive, x,
                     _bin(ctx, "mul", x, ctx.scalar(float(negative_slope), dtype)))


@converts(aten.elu.default)
def convert_elu(ctx: ImportContext, x: Value, alpha: Any = 1.0, scale: Any = 1.0,
                input_scale: Any = 1.0) -> Value:
    """x > 0 ? x * scale : expm1(x * input_scale) * alpha * scale (ELU, SELU)."""
    dtype = plain_dtype(x.type)

    def times(v: Value, k: float) -> Value:
        return v if k == 1 else _bin(ctx, "mul", v, ctx.scalar(k, dtype))
    negative = times(_un(ctx, "expm1", times(x, float(input_scale))),
                     float(np.float32(alpha) * np.float32(scale)))
    positive = _bin(ctx, "gt", x, ctx.scalar(0, dtype))
    return ctx.value(graph.WhereOp, positive, times(x, float(scale)), negative)


@converts(aten.flip.default)
def convert_flip(ctx: ImportContext, x: Value, dims: Sequence[int]) -> Value:
    for axis in sorted({_axis(x, d) for d in dims}):
        x = _reverse(ctx, x, axis)
    return x


# ---- convolution ----------------------------------------------------------------------------
def _ints(values: Any, n: int) -> tuple[int, ...]:
    vals = [values] if isinstance(values, int) else list(values)
    return tuple(vals) if len(vals) == n else tuple(vals[:1]) * n


@converts(aten.convolution.default)
def convert_convolution(ctx: ImportContext, x: Value, weight: Value, bias: Value | None = None,
                        stride: Sequence[int] = (1,), padding: Any = (0,),
                        dilation: Sequence[int] = (1,), transposed: bool = False,
                        output_padding: Sequence[int] = (0,), groups: int = 1) -> Value:
    """2-d convolutions go to graph.conv2d (aten_nn's converter); 1-d ones run as 2-d with
    H = 1; transposed ones as a stride-1 conv2d of the zero-stuffed, padded input."""
    rank = x.type.rank
    if not transposed and rank == 4:
        return aten_nn.convert_convolution(ctx, x, weight, bias, stride, padding, dilation,
                                           transposed, output_padding, groups)
    if rank not in (3, 4):
        raise ConversionError(f"{rank - 2}-d convolution (1-d and 2-d are supported)")
    if isinstance(padding, str):
        raise ConversionError(f"padding='{padding}'")
    spatial = rank - 2
    stride, padding, dilation = (_ints(v, spatial) for v in (stride, padding, dilation))
    output_padding = _ints(output_padding, spatial)
    if rank == 3:  # [N, C, L] -> [N, C, 1, L], and the 1-d parameters as (1 or 0, p)
        x = ctx.reshape(x, x.type.with_shape((*x.type.shape[:2], 1, x.type.shape[2])))
        w = weight.type.shape
        weight = ctx.reshape(weight, weight.type.with_shape((w[0], w[1], 1, w[2])))
        stride, dilation = (1, *stride), (1, *dilation)
        padding, output_padding = (0, *padding), (0, *output_padding)
    if transposed:
        out = _conv_transpose2d(ctx, x, weight, bias, stride, padding, dilation, output_padding,
                                groups)
    else:
        out = ctx.value(graph.Conv2dOp, x, weight, bias, stride=stride, padding=padding,
                        dilation=dilation, groups=groups)
    return ctx.reshape(out, ctx.out_type())


def _conv_transpose2d(ctx: ImportContext, x: Value, weight: Value, bias: Value | None,
                      stride: tuple[int, ...], padding: tuple[int, ...],
                      dilation: tuple[int, ...], output_padding: tuple[int, ...], groups: int
                      ) -> Value:
    """conv_transpose2d(x, W) = conv2d(pad(stuff(x)), W'): stuff puts stride-1 zeros between
    input pixels; pad adds dilation*(k-1)-padding before and that plus output_padding after
    (a negative amount crops); W'[o, i] = W[i, o] flipped in H and W, per group. W' is computed
    in the graph: constant folding turns it into a weight when W is one."""
    n, c_in, h, w = x.type.shape
    w_in, c_out_g, kh, kw = weight.type.shape
    g = groups
    if not all(isinstance(d, int) for d in (w_in, c_out_g, kh, kw)) or int(w_in) % g:
        raise ConversionError(f"transposed convolution weight {weight.type} with groups={g}")
    # the weight: [g*I, O/g, kh, kw] -> [g, I, O/g, kh, kw] -> [g, O/g, I, kh, kw] -> flipped
    wt = weight.type
    five = ctx.reshape(weight, wt.with_shape((g, w_in // g, c_out_g, kh, kw)))
    swapped = _permute(ctx, five, (0, 2, 1, 3, 4))
    flipped = ctx.reshape(swapped, wt.with_shape((g * c_out_g, w_in // g, kh, kw)))
    flipped = _reverse(ctx, _reverse(ctx, flipped, 2), 3)
    # the input: stride-1 zeros after each pixel (H, W) -> (H*sh, W*sw)
    sh, sw = stride
    if sh > 1 or sw > 1:
        t = x.type
        six = ctx.reshape(x, t.with_shape((n, c_in, h, 1, w, 1)))
        six = ctx.value(graph.PadOp, six, pads=(0, 0, 0, 0, 0, 0, 0, sh - 1, 0, 0, 0, sw - 1),
                        value=0.0)
        x = ctx.reshape(six, t.with_shape((n, c_in, h * sh, w * sw)))
    # padding: before = d*(k-1) - p; after = the same + output_padding, less the s-1 trailing
    # zeros the stuffing already put there
    pads, crops = [0] * 8, []
    for i, (k, s, p, d, op) in enumerate(zip((int(kh), int(kw)), stride, padding, dilation,
                                             output_padding, strict=True)):
        before = d * (k - 1) - p
        after = before + op - (s - 1)
        pads[4 + 2 * i], pads[5 + 2 * i] = max(before, 0), max(after, 0)
        crops.append((max(-before, 0), max(-after, 0)))
    if any(pads):
        x = ctx.value(graph.PadOp, x, pads=tuple(pads), value=0.0)
    for axis, (lo, hi) in zip((2, 3), crops, strict=True):
        if lo or hi:
            size = _static(x.type.shape[axis], "transposed convolution cropping")
            x = ctx.value(graph.SliceOp, x, axis=axis, start=lo, end=size - hi, step=1)
    return ctx.value(graph.Conv2dOp, x, flipped, bias, stride=(1, 1), padding=(0, 0),
                     dilation=tuple(dilation), groups=g)


# ---- normalization --------------------------------------------------------------------------
@converts(aten.native_group_norm.default)
def convert_group_norm(ctx: ImportContext, x: Value, weight: Value | None, bias: Value | None,
                       n: Any, c: Any, hw: Any, group: int, eps: float) -> tuple:
    """Normalize [N, G, C/G * HxW] over its last axis (graph.layer_norm), then the
    per-channel affine."""
    _refuse_used_outputs(ctx, 1, "group norm's mean and rstd")
    c = _static(ctx.dim(c), "group norm")
    if c % group:
        raise ConversionError(f"group norm of {c} channels in {group} groups")
    rows = x.type.with_shape((x.type.shape[0], group,
                              c // group * product(x.type.shape[2:])))
    y = ctx.value(graph.LayerNormOp, ctx.reshape(x, rows), None, None, ndim=1, eps=float(eps))
    return _channel_affine(ctx, ctx.reshape(y, x.type), weight, bias), None, None


@converts(aten._native_batch_norm_legit.no_stats)
def convert_batch_norm_batch_stats(ctx: ImportContext, x: Value, weight: Value | None,
                                   bias: Value | None, training: bool, momentum: float,
                                   eps: float) -> tuple:
    """Batch norm with the batch's own statistics (instance norm, and batch norm without
    running statistics): each channel normalized over every other axis."""
    _refuse_used_outputs(ctx, 1, "batch norm's saved mean and invstd")
    return _batch_stats_norm(ctx, x, weight, bias, eps), None, None


@converts(aten._native_batch_norm_legit.default)
def convert_batch_norm_legit(ctx: ImportContext, x: Value, weight: Value | None,
                             bias: Value | None, mean: Value, var: Value, training: bool,
                             momentum: float, eps: float) -> tuple:
    """Running statistics unless `training` (then the batch's, as torch computes them; the
    running statistics' update is training state and is not imported)."""
    _refuse_used_outputs(ctx, 1, "batch norm's saved mean and invstd")
    if not training:
        return aten_nn.convert_batch_norm(ctx, x, weight, bias, mean, var, momentum, eps)
    return _batch_stats_norm(ctx, x, weight, bias, eps), None, None


def _batch_stats_norm(ctx: ImportContext, x: Value, weight: Value | None, bias: Value | None,
                      eps: float) -> Value:
    t = x.type
    if t.rank < 2:
        raise ConversionError(f"batch norm of a rank-{t.rank} input")
    rest = (0, *range(2, t.rank))
    channels_first = x if t.shape[0] == 1 else _permute(ctx, x, (1, *rest))
    rows = t.with_shape((t.shape[1], product([t.shape[a] for a in rest])))
    y = ctx.value(graph.LayerNormOp, ctx.reshape(channels_first, rows), None, None, ndim=1,
                  eps=float(eps))
    if t.shape[0] == 1:
        y = ctx.reshape(y, t)
    else:
        y = ctx.reshape(y, t.with_shape((t.shape[1], t.shape[0], *t.shape[2:])))
        y = _permute(ctx, y, (1, 0, *range(2, t.rank)))
    return _channel_affine(ctx, y, weight, bias)


# ---- sort and topk --------------------------------------------------------------------------
def _ranks(ctx: ImportContext, x: Value, descending: bool) -> Value:
    """rank[.., i] along the last axis: how many x_j come before x_i in a stable sort (ties by
    index; NaN is the largest value and equals NaN, as in torch). i64."""
    t = x.type
    n = t.shape[-1]
    xi = ctx.reshape(x, t.with_shape((*t.shape, 1)))  # i on axis -2
    xj = ctx.reshape(x, t.with_shape((*t.shape[:-1], 1, n)))  # j on axis -1
    ahead = _bin(ctx, "gt" if descending else "lt", xj, xi)
    equal = _bin(ctx, "eq", xj, xi)
    if plain_dtype(t).is_float:
        nan_i, nan_j = _bin(ctx, "ne", xi, xi), _bin(ctx, "ne", xj, xj)
        not_i, not_j = _un(ctx, "logical_not", nan_i), _un(ctx, "logical_not", nan_j)
        bigger = _bin(ctx, "logical_and", nan_j, not_i) if descending else \
            _bin(ctx, "logical_and", nan_i, not_j)  # j before i: j NaN (desc), i NaN (asc)
        ahead = _bin(ctx, "logical_or", ahead, bigger)
        equal = _bin(ctx, "logical_or", equal, _bin(ctx, "logical_and", nan_i, nan_j))
    index = ctx.value(graph.ArangeOp, result_types=[TensorType((n,), dt.i64)])
    earlier = _bin(ctx, "lt", index, ctx.reshape(index, TensorType((n, 1), dt.i64)))
    before = _bin(ctx, "logical_or", ahead, _bin(ctx, "logical_and", equal, earlier))
    return ctx.value(graph.ReduceSumOp, ctx.cast(before, dt.i64), axes=(t.rank,))


def _sorted_along_last(ctx: ImportContext, x: Value, k: int, descending: bool
                       ) -> tuple[Value, Value]:
    """The first k values and indices of x sorted along its last axis."""
    t = x.type
    n = t.shape[-1]
    index = ctx.value(graph.ArangeOp, result_types=[TensorType((n,), dt.i64)])
    # The ranks compare every x_i with every x_j, and they are a permutation only if each
    # element has one value. A kernel that recomputes x (a softmax fused before the compares)
    # may compute an element one way for x_i and another for x_j (Triton's row kernels: lanes
    # vs a loop, a different rounding): reading x through an index_select (injective, which
    # starts a new kernel after a reduction) makes the compares read one stored x.
    x = ctx.value(graph.IndexSelectOp, x, index, axis=t.rank - 1)
    rank = ctx.reshape(_ranks(ctx, x, descending), TensorType((*t.shape[:-1], 1, n), dt.i64))
    slots = ctx.value(graph.ArangeOp, result_types=[TensorType((k,), dt.i64)])
    hit = _bin(ctx, "eq", rank, ctx.reshape(slots, TensorType((k, 1), dt.i64)))  # [.., k, n]
    picked = ctx.value(graph.WhereOp, hit, index, ctx.scalar(0, dt.i64))
    indices = ctx.value(graph.ReduceSumOp, picked, axes=(t.rank,))  # [.., k]
    return ctx.value(graph.GatherOp, x, indices, axis=t.rank - 1), indices


def _sort(ctx: ImportContext, x: Value, dim: int, k: int | None, descending: bool
          ) -> tuple[Value, Value]:
    if x.type.rank == 0:
        return x, ctx.value(graph.FullOp, result_types=[TensorType((), dt.i64)], value=0)
    axis = _axis(x, dim)
    n = _static(x.type.shape[axis], "sort/topk")
    if n > MAX_SORT:
        raise ConversionError(f"sort/topk along an axis of {n} elements: composed from "
                              f"pairwise compares, O(n^2), they are limited to {MAX_SORT}")
    if plain_dtype(x.type) == dt.boolean:
        x = ctx.cast(x, dt.u8)
    last = x.type.rank - 1
    perm = list(range(x.type.rank))
    perm[axis], perm[last] = perm[last], perm[axis]
    values, indices = _sorted_along_last(ctx, _permute(ctx, x, perm), n if k is None else k,
                                         descending)
    values, indices = _permute(ctx, values, perm), _permute(ctx, indices, perm)
    return ctx.cast(values, ctx.out_dtype(0)), indices


@converts(aten.sort.default)
def convert_sort(ctx: ImportContext, x: Value, dim: int = -1, descending: bool = False
                 ) -> tuple[Value, Value]:
    """Stable (ties keep their order: the stable sort's answer, one valid answer of the
    unstable one)."""
    return _sort(ctx, x, dim, None, descending)


@converts(aten.sort.stable)
def convert_sort_stable(ctx: ImportContext, x: Value, *, stable: bool | None = None,
                        dim: int = -1, descending: bool = False) -> tuple[Value, Value]:
    return _sort(ctx, x, dim, None, descending)


@converts(aten.topk.default)
def convert_topk(ctx: ImportContext, x: Value, k: int, dim: int = -1, largest: bool = True,
                 sorted: bool = True) -> tuple[Value, Value]:
    """Sorted whatever `sorted` says (unsorted order is unspecified); ties by index."""
    if not isinstance(k, int):
        raise ConversionError("topk with a symbolic k")
    return _sort(ctx, x, dim, k, largest)


# ---- norms ----------------------------------------------------------------------------------
@converts(aten.linalg_vector_norm.default)
def convert_vector_norm(ctx: ImportContext, x: Value, ord: Any = 2, dim: Any = None,
                        keepdim: bool = False, *, dtype: Any = None) -> Value:
    """sum(|x|^ord)^(1/ord) over `dim` (all axes when None): max|x| for inf, min|x| for -inf,
    the count of non-zeros for 0, sqrt(sum(x*x)) for 2 and sum|x| for 1."""
    out = ctx.out_dtype()
    x = ctx.cast(x, out)
    axes = aten_nn._axes(x, dim) if dim is not None and (isinstance(dim, int) or len(dim)) \
        else ()
    ord = float(ord)

    def reduce(cls: type, v: Value) -> Value:
        return ctx.value(cls, v, axes=axes, keepdim=keepdim)
    if ord == 0:
        nonzero = ctx.cast(_bin(ctx, "ne", x, ctx.scalar(0, out)), out)
        return reduce(graph.ReduceSumOp, nonzero)
    if math.isinf(ord):
        return reduce(graph.ReduceMaxOp if ord > 0 else graph.ReduceMinOp, _un(ctx, "abs", x))
    if ord == 2:
        return _un(ctx, "sqrt", reduce(graph.ReduceSumOp, _bin(ctx, "mul", x, x)))
    if ord == 1:
        return reduce(graph.ReduceSumOp, _un(ctx, "abs", x))
    powered = _bin(ctx, "pow", _un(ctx, "abs", x), ctx.scalar(ord, out))
    return _bin(ctx, "pow", reduce(graph.ReduceSumOp, powered), ctx.scalar(1.0 / ord, out))


# ---- embedding bag --------------------------------------------------------------------------
_BAG_MODES = {0: "sum", 1: "mean", 2: "max"}


@converts(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def convert_embedding_bag(ctx: ImportContext, weight: Value, indices: Value, offsets: Value,
                          scale_grad_by_freq: bool = False, mode: int = 0, sparse: bool = False,
                          per_sample_weights: Value | None = None,
                          include_last_offset: bool = False, padding_idx: int = -1) -> tuple:
    """Bags laid out as [bags, longest bag] by a constant table (offsets must be known at
    import: a 2-D input's arange, or a constant), then embedding and a masked reduction; an
    empty bag gives 0 in every mode, as in torch; `padding_idx` entries are left out."""
    _refuse_used_outputs(ctx, 1, "embedding_bag's offset2bag, bag_size and max_indices")
    name = _BAG_MODES.get(mode)
    if name is None:
        raise ConversionError(f"embedding_bag mode {mode}")
    if per_sample_weights is not None and name != "sum":
        raise ConversionError("per_sample_weights with embedding_bag mode other than 'sum'")
    if indices.type.rank != 1:
        raise ConversionError(f"embedding_bag indices {indices.type} (expected 1-d)")
    bags, longest, table, valid = _bag_layout(ctx, indices, offsets, include_last_offset)
    dtype, index_dtype = plain_dtype(weight.type), plain_dtype(indices.type)

    def laid_out(v: Value) -> Value:  # [total] -> [bags, longest]
        if table is not None:
            v = ctx.value(graph.IndexSelectOp, v, table, axis=0)
        return ctx.reshape(v, v.type.with_shape((bags, longest)))
    ids = laid_out(indices)
    rows = ctx.value(graph.EmbeddingOp, weight, ids)  # [bags, longest, D]
    if padding_idx is not None and padding_idx >= 0:
        kept = _bin(ctx, "ne", ids, ctx.scalar(padding_idx, index_dtype))
        valid = kept if valid is None else _bin(ctx, "logical_and", valid, kept)
    if per_sample_weights is not None:
        psw = laid_out(ctx.cast(per_sample_weights, dtype))
        rows = _bin(ctx, "mul", rows, ctx.reshape(psw, psw.type.with_shape((bags, longest, 1))))
    mask = None if valid is None else ctx.reshape(valid, TensorType((bags, longest, 1),
                                                                    dt.boolean))
    if name == "max":
        filled = rows if mask is None else ctx.value(graph.WhereOp, mask, rows,
                                                      ctx.scalar(-math.inf, dtype))
        out = ctx.value(graph.ReduceMaxOp, filled, axes=(1,))
    else:
        filled = rows if mask is None else ctx.value(graph.WhereOp, mask, rows,
                                                      ctx.scalar(0.0, dtype))
        out = ctx.value(graph.ReduceSumOp, filled, axes=(1,))
    if mask is None or valid is None:
        if name == "mean":
            out = _bin(ctx, "div", out, ctx.scalar(float(longest), dtype))
        return out, None, None, None
    count = ctx.value(graph.ReduceSumOp, ctx.cast(valid, dtype), axes=(1,), keepdim=True)
    if name == "mean":
        out = _bin(ctx, "div", out, ctx.value(graph.ClampOp, count, min=1.0))
    if name == "max":  # an empty bag is 0, not -inf
        empty = _bin(ctx, "eq", count, ctx.scalar(0.0, dtype))
        out = ctx.value(graph.WhereOp, empty, ctx.scalar(0.0, dtype), out)
    return out, None, None, None


def _bag_layout(ctx: ImportContext, indices: Value, offsets: Value, include_last: bool
                ) -> tuple[Dim, int, Value | None, Value | None]:
    """(bags, longest, table, valid): bag b holds indices[table[b, j]] where valid[b, j];
    table is an i64 [bags * longest] literal (None when bag b is simply indices[b*longest:
    (b+1)*longest], as for a 2-D input), valid a bool [bags, longest] one (None: all valid)."""
    total = indices.type.shape[0]
    op = getattr(offsets, "op", None)
    if isinstance(op, graph.ArangeOp) and op.start == 0 and isinstance(op.step, int) \
            and op.step > 0 and not include_last:
        (bags,) = offsets.type.shape
        if dims_equal(total, bags * op.step):
            return bags, op.step, None, None
    starts = _constant_array(ctx, offsets)
    if starts is None:
        raise ConversionError("embedding_bag offsets that are not a compile-time constant "
                              "(pass 2-D indices, or offsets that are a constant or buffer)")
    total = _static(total, "embedding_bag with offsets")
    starts = starts.astype(np.int64).reshape(-1)
    ends = np.append(starts[1:], total)
    if include_last:
        starts, ends = starts[:-1], ends[:-1]
    if total == 0 or not len(starts) or starts[0] != 0 or np.any(ends < starts) \
            or ends[-1] > total:
        raise ConversionError(f"embedding_bag offsets {starts.tolist()} do not split "
                              f"{total} indices into bags")
    longest = max(int((ends - starts).max()), 1)
    positions = starts[:, None] + np.arange(longest)[None, :]
    valid = positions < ends[:, None]
    table = np.where(valid, positions, 0).reshape(-1)
    return (len(starts), longest, _literal(ctx, table, dt.i64),
            None if valid.all() else _literal(ctx, valid, dt.boolean))
