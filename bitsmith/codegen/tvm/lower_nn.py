"""Generic lowering rules for windowed and attention ops: conv2d, pools, batch norm, pad, split,
attention. Registered into `lower.RULES` on import."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import tvm
from tvm import te, topi

from ...ir import Operation
from ..template import CodegenError
from .fast_math import fast_exp
from .lower import Lowering, is_one, lowers, tvm_dtype
from .lower_reduce import clamped_index, nan_extreme
from .typed import compute, shape_of


def _nchw(op: Operation) -> bool:
    return getattr(op, "layout", "NCHW") == "NCHW"


def _padded(x: te.Tensor, op: Operation, value: float, hw_axes: tuple[int, int],
            extra: tuple[int, int] = (0, 0)) -> te.Tensor:
    """x padded by the op's padding on the H and W axes (plus `extra` at the far end)."""
    ph, pw = op.padding
    before = [0] * len(shape_of(x))
    after = [0] * len(shape_of(x))
    before[hw_axes[0]], before[hw_axes[1]] = ph, pw
    after[hw_axes[0]], after[hw_axes[1]] = ph + extra[0], pw + extra[1]
    if not any(before) and not any(after):
        return x
    return topi.nn.pad(x, before, after, pad_value=value)


def _exp(x: Any, dtype: str, lo: Lowering) -> Any:
    """e^x of a `dtype` expression: `fast_exp` in f32, libm's for other float types."""
    return fast_exp(x, lo.lets) if str(dtype) == "float32" else tvm.tirx.exp(x)


@lowers("conv2d")
def lower_conv2d(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """Direct convolution in either layout (NCHW/OIHW or NHWC/HWIO), any groups/dilation."""
    x, w, *bias = args
    if _nchw(op):
        cout, cin_g, kh, kw = (int(d) for d in op.weight.type.shape)
        out = conv2d_compute(op, x, lambda oc, rc, ry, rx: w[oc, rc, ry, rx], (kh, kw, cin_g),
                             lo)
    else:
        kh, kw, cin_g, cout = (int(d) for d in op.weight.type.shape)
        out = conv2d_compute(op, x, lambda oc, rc, ry, rx: w[ry, rx, rc, oc], (kh, kw, cin_g),
                             lo)
    if bias:
        b = bias[0]
        channel = 1 if _nchw(op) else 3
        out = compute(shape_of(out), lambda *i: out(*i) + b[i[channel]], name="conv2d_bias")
    return out


def conv2d_compute(op: Operation, x: te.Tensor, weight: Callable[..., Any],
                   kernel: tuple[int, int, int], lo: Lowering) -> te.Tensor:
    """The convolution `op` of x (its layout, stride, padding, dilation, groups), reading the
    weight element (out channel, in channel of the group, kernel row, column) from `weight`;
    `kernel` is (KH, KW, in channels per group)."""
    nchw = _nchw(op)
    xp = _padded(x, op, 0.0, (2, 3) if nchw else (1, 2))
    (sh, sw), (dh, dw), groups = op.stride, op.dilation, op.groups
    kh, kw, cin_g = kernel
    cout = int(op.result.type.shape[1 if nchw else 3])
    cout_g = cout // groups
    rc = te.reduce_axis((0, cin_g), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def element(n: object, a: object, b: object, c: object) -> object:
        if nchw:
            oc, oy, ox = a, b, c
        else:
            oy, ox, oc = a, b, c
        ic = (oc // cout_g) * cin_g + rc
        iy, ix = oy * sh + ry * dh, ox * sw + rx * dw
        xv = xp[n, ic, iy, ix] if nchw else xp[n, iy, ix, ic]
        # NHWC reads input channels contiguously: make them the innermost reduction
        return te.sum(xv * weight(oc, rc, ry, rx), axis=[rc, ry, rx] if nchw else [ry, rx, rc])
    return compute(lo.shape(op.result.type), element, name="conv2d")


def _pool_extra(op: Operation, lo: Lowering) -> tuple[int, int]:
    """Padding past the far edge that ceil_mode windows need (0 without ceil_mode)."""
    x, y = op.x.type, op.result.type
    axes = (2, 3) if _nchw(op) else (1, 2)
    extra = []
    for k, axis in enumerate(axes):
        size, out = x.shape[axis], y.shape[axis]
        if not isinstance(size, int) or not isinstance(out, int):
            return (0, 0)
        dil = op.dilation[k] if "dilation" in op.ATTRS else 1
        need = (out - 1) * op.stride[k] + dil * (op.kernel[k] - 1) + 1
        extra.append(max(0, need - size - 2 * op.padding[k]))
    return extra[0], extra[1]


@lowers("max_pool2d")
def lower_max_pool2d(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    x = args[0]
    nchw = _nchw(op)
    hw_axes = (2, 3) if nchw else (1, 2)
    dtype = str(x.dtype)
    lowest = -math.inf if dtype.startswith("float") else int(tvm.tirx.min_value(dtype).value)
    xp = _padded(x, op, lowest, hw_axes, _pool_extra(op, lo))
    (kh, kw), (sh, sw), (dh, dw) = op.kernel, op.stride, op.dilation
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    combine, identity = nan_extreme(dtype, largest=True)  # NaN propagates, as in torch
    window_max = te.comm_reducer(combine, lambda t: identity, name="window_max")

    def element(n: object, a: object, b: object, c: object) -> object:
        if nchw:
            return window_max(xp[n, a, b * sh + ry * dh, c * sw + rx * dw], axis=[ry, rx])
        return window_max(xp[n, a * sh + ry * dh, b * sw + rx * dw, c], axis=[ry, rx])
    return compute(lo.shape(op.result.type), element, name="max_pool2d")


@lowers("avg_pool2d")
def lower_avg_pool2d(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    if op.ceil_mode or op.divisor is not None:
        raise CodegenError("generic lowering of avg_pool2d with ceil_mode or a divisor "
                           "override is not written yet")
    return topi.nn.pool2d(args[0], list(op.kernel), list(op.stride), [1, 1],
                          [op.padding[0], op.padding[1]] * 2, "avg", ceil_mode=False,
                          layout=op.layout, count_include_pad=op.count_include_pad)


@lowers("adaptive_avg_pool2d")
def lower_adaptive_avg_pool2d(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    return topi.nn.adaptive_pool(args[0], list(op.size), "avg", layout=op.layout)


@lowers("batch_norm")
def lower_batch_norm(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    x, mean, var, *affine = args
    axis = op.axis % op.x.type.rank
    eps = tvm.tirx.const(op.eps, x.dtype)

    def element(*i: object) -> object:
        c = i[axis]
        out = (x(*i) - mean[c]) / tvm.tirx.sqrt(var[c] + eps)
        if affine:
            out = out * affine[0][c]
        return out + affine[1][c] if len(affine) > 1 else out
    return compute(x.shape, element, name="batch_norm")


@lowers("pad")
def lower_pad(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    pads = op.pads
    return topi.nn.pad(args[0], list(pads[0::2]), list(pads[1::2]), pad_value=op.value)


@lowers("split")
def lower_split(op: Operation, args: list, lo: Lowering) -> list[te.Tensor]:
    x = args[0]
    axis = op.axis % op.x.type.rank
    outs, start = [], 0
    for result, size in zip(op.results, op.sizes, strict=True):
        def element(*i: Any, offset: int = start) -> object:
            src = list(i)
            src[axis] = i[axis] + offset
            return x(*src)
        outs.append(compute(lo.shape(result.type), _positional(element), name="split"))
        start += size
    return outs


def _positional(fn):  # te.compute refuses keyword-only/default arguments in fcompute
    return lambda *i: fn(*i)


ROW_LANES = 16
"""Partial results a row reduction keeps (`_row_reduce`): one vector of AVX-512's f32 lanes,
two of AVX2's and four of NEON's."""


def _row_reduce(x: te.Tensor, kind: str) -> te.Tensor:
    """max or sum over x's last axis, keeping it as a unit dim. With a static last axis that
    ROW_LANES divides, in two steps: `<kind>_lanes` reduces each row to ROW_LANES partials
    (lane j takes every ROW_LANES-th element from j: the reduction a vector of them does), a
    second block those partials; the attention template vectorises the first (TVM's rfactor
    cannot, under the attention's loop)."""
    *lead, n = shape_of(x)
    reduce = te.max if kind == "max" else te.sum
    if not isinstance(n, (int, tvm.tirx.IntImm)) or int(n) % ROW_LANES or \
            int(n) == ROW_LANES:
        return (topi.max if kind == "max" else topi.sum)(x, axis=len(lead), keepdims=True)
    c: Any = te.reduce_axis((0, int(n) // ROW_LANES), name="c")
    part = compute([*lead, ROW_LANES], lambda *i: reduce(x(*i[:-1], c * ROW_LANES + i[-1]),
                                                         axis=c), name=f"{kind}_lanes")
    j = te.reduce_axis((0, ROW_LANES), name="j")
    return compute([*lead, 1], lambda *i: reduce(part(*i[:-1], j), axis=j), name=f"{kind}_row")


@lowers("attention")
def lower_attention(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """softmax(q k^T * scale + mask (+ causal)) v, with grouped-query heads."""
    q, k, v, *mask = args
    rank = len(q.shape)
    e = int(op.q.type.shape[-1])
    scale = op.scale if op.scale is not None else 1.0 / math.sqrt(e)
    heads_q = op.q.type.shape[-3] if rank >= 3 else 1
    heads_k = op.k.type.shape[-3] if rank >= 3 else 1
    group = heads_q // heads_k if op.gqa and isinstance(heads_q, int) else 1
    lk = k.shape[-2]
    score_shape = list(q.shape[:-1]) + [lk]
    d = te.reduce_axis((0, e), name="d")

    def kv_index(i: tuple) -> list:
        lead = list(i[:-2])
        if rank >= 3 and group > 1:
            lead[-1] = lead[-1] // group
        return lead

    qk = compute(score_shape, lambda *i: te.sum(q(*i[:-1], d) * k(*kv_index(i), i[-1], d),
                                                   axis=d), name="qk")

    def score(*i: Any) -> object:
        s = qk(*i) * tvm.tirx.const(scale, q.dtype)
        if op.is_causal:
            s = tvm.tirx.Select(i[-1] > i[-2], tvm.tirx.const(-math.inf, q.dtype), s)
        if mask:
            m = mask[0]
            idx = [0 if is_one(m.shape[j]) else i[len(i) - len(m.shape) + j]
                   for j in range(len(m.shape))]
            if m.dtype == "bool":
                s = tvm.tirx.Select(m(*idx), s, tvm.tirx.const(-math.inf, q.dtype))
            else:
                s = s + m(*idx)
        return s
    scores = compute(score_shape, score, name="scores")
    peak = _row_reduce(scores, "max")
    hidden = compute(shape_of(peak), lambda *i: peak(*i) == tvm.tirx.const(-math.inf, q.dtype))
    probs = compute(score_shape, lambda *i: tvm.tirx.Select(
        hidden(*i[:-1], 0), tvm.tirx.const(0.0, q.dtype),
        _exp(scores(*i) - peak(*i[:-1], 0), q.dtype, lo)), name="exp")
    total = _row_reduce(probs, "sum")
    one = tvm.tirx.const(1.0, q.dtype)
    # normalised before P.V, so that the contraction's consumers need only its result
    normed = compute(score_shape, lambda *i: probs(*i) / tvm.tirx.Select(
        total(*i[:-1], 0) > 0, total(*i[:-1], 0), one), name="probs")
    j = te.reduce_axis((0, lk), name="j")
    return compute(lo.shape(op.result.type), lambda *i: te.sum(
        normed(*i[:-1], j) * v(*kv_index(i), j, i[-1]), axis=j), name="pv")


@lowers("arange")
def lower_arange(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    dtype = str(tvm_dtype(op, op.result.type.dtype))
    start, step = op.start, op.step
    return compute(lo.shape(op.result.type), lambda i: tvm.tirx.const(start, dtype) + (
        i.astype(dtype) * tvm.tirx.const(step, dtype)), name="arange")


@lowers("cumsum")
def lower_cumsum(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    return topi.cumsum(args[0], axis=op.axis % op.x.type.rank)


@lowers("index")
def lower_index(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """x[..., i0, i1, ...] with adjacent indexed axes (the common case); negatives wrap, and
    an index past its dim is clamped (the runtime raises for it before this kernel runs)."""
    x, *indices = args
    rank = op.x.type.rank
    axes = [a % rank for a in op.axes]
    if axes != list(range(axes[0], axes[-1] + 1)):
        raise CodegenError("generic lowering of graph.index over non-adjacent axes is not "
                           "written yet")
    picked_rank = max(len(t.shape) for t in indices)

    def element(*i: object) -> object:
        picked = i[axes[0]:axes[0] + picked_rank]
        src = list(i[:axes[0]])
        for axis, t in zip(axes, indices, strict=True):
            sub = [0 if is_one(t.shape[j]) else picked[picked_rank - len(t.shape) + j]
                   for j in range(len(t.shape))]
            src.append(clamped_index(t(*sub), x.shape[axis], negatives=True))
        src += list(i[axes[0] + picked_rank:])
        return x(*src)
    return compute(lo.shape(op.result.type), element, name="index")
