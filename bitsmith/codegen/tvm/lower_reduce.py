"""Generic lowering of the reductions (sum, mean, max, min, product, all, any, argmax, argmin)
and of the index-reading ops (gather, index_select), each as the interpreter defines it.

Indices past their dim cannot raise inside a kernel: they are clamped into the dim, so a kernel
never reads outside its buffers; the interpreter raises IndexError for them.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import tvm
from tvm import te, topi

from ...ir import Operation
from .lower import Lowering, lowers
from .typed import cast_tensor, compute, shape_of

T = tvm.tirx
Expr = Any  # a TIR expression: TVM declares its arithmetic operators on no Python type


def _axes(op: Operation) -> list[int]:
    rank = op.x.type.rank
    return sorted(a % rank for a in op.axes) or list(range(rank))


def _reduce(x: te.Tensor, op: Operation, lo: Lowering, combine: Callable[[Expr, Expr], Expr],
            identity: Expr, value: Callable[[Expr], Expr], name: str) -> te.Tensor:
    """out[kept] = combine over the reduced axes of value(x[...]), keepdim as the op says."""
    axes = _axes(op)
    reducer = te.comm_reducer(lambda a, b: combine(a, b), lambda t: identity, name=name)
    shape = shape_of(x)
    raxes = {a: te.reduce_axis((0, shape[a]), name=f"r{a}") for a in axes}
    out_shape = lo.shape(op.result.type)

    def element(*idx: object) -> Expr:
        src, k = [], 0
        for a in range(len(shape)):
            if a in raxes:
                src.append(raxes[a])
                k += op.keepdim  # a kept size-1 dim: skip its output index
            else:
                src.append(idx[k])
                k += 1
        return reducer(value(x(*src)), axis=list(raxes.values()))
    return compute(out_shape, element, name=name)


@lowers("reduce_sum", "reduce_mean", "reduce_max", "reduce_min")
def lower_reduce_arith(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """Sum, mean, max and min over axes: floats as topi does, except that max and min let NaN
    win (as torch and numpy); integer sums in i64, then wrapped to the type, as the
    interpreter does."""
    x, dtype = args[0], str(args[0].dtype)
    kind = op.name.split("_")[-1]
    is_float = op.x.type.dtype.is_float
    if kind in ("max", "min"):
        combine, identity = nan_extreme(dtype, largest=kind == "max")
        return _reduce(x, op, lo, combine, identity, lambda v: v, op.name.split(".")[1])
    if kind == "mean":
        total = topi.sum(x, axis=_axes(op), keepdims=op.keepdim)
        count: Expr = T.const(1, "int64")
        for a in _axes(op):
            count = count * lo.dim(op.x.type.shape[a])
        return topi.divide(total, count.astype(str(total.dtype)))
    if is_float:
        return topi.sum(x, axis=_axes(op), keepdims=op.keepdim)
    out = _reduce(x, op, lo, lambda a, b: a + b, T.const(0, "int64"),
                  lambda v: v.astype("int64"), "reduce_sum")
    return out if dtype == "int64" else cast_tensor(out, dtype)


@lowers("reduce_prod")
def lower_reduce_prod(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """Product in f32 for floats (as the interpreter), in i64 for integers, then cast."""
    x, dtype = args[0], str(args[0].dtype)
    work = "float32" if op.x.type.dtype.is_float else "int64"
    out = _reduce(x, op, lo, lambda a, b: a * b, T.const(1, work),
                  lambda v: v.astype(work), "reduce_prod")
    return out if work == dtype else cast_tensor(out, dtype)


@lowers("reduce_all", "reduce_any")
def lower_reduce_logical(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """Whether all (any) elements are nonzero (NaN counts as nonzero), in the input's type."""
    x, dtype = args[0], str(args[0].dtype)
    is_all = op.name == "graph.reduce_all"
    combine = (lambda a, b: a & b) if is_all else (lambda a, b: a | b)
    out = _reduce(x, op, lo, combine, T.const(is_all, "bool"),
                  lambda v: v if dtype == "bool" else v != T.const(0, dtype),
                  op.name.split(".")[1])
    return out if dtype == "bool" else cast_tensor(out, dtype)


def nan_extreme(dtype: str, largest: bool) -> tuple[Callable[[Expr, Expr], Expr], Expr]:
    """The combine and identity of a max (min) that NaN wins, as numpy and torch define it."""
    def pick(a: Expr, b: Expr) -> Expr:
        return T.max(a, b) if largest else T.min(a, b)
    if dtype.startswith("float"):
        identity = T.const(-math.inf if largest else math.inf, dtype)

        def combine(a: Expr, b: Expr) -> Expr:
            return T.Select(T.isnan(a), a, T.Select(T.isnan(b), b, pick(a, b)))
        return combine, identity
    bound = T.min_value(dtype) if largest else T.max_value(dtype)
    return (lambda a, b: pick(a, b)), bound


@lowers("argmax", "argmin")
def lower_arg_extreme(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """The first index of the maximum (minimum) along `axis`; the first NaN when there is one."""
    x = args[0]
    out_shape = lo.shape(op.result.type)
    if not x.shape:
        return compute(out_shape, lambda *i: T.const(0, "int64"), name="arg0")
    axis = op.axis % len(x.shape)
    largest = op.name == "graph.argmax"
    combine, identity = nan_extreme(str(x.dtype), largest)
    size = x.shape[axis]
    extreme = te.comm_reducer(combine, lambda t: identity, name="extreme")
    first = te.comm_reducer(lambda a, b: T.min(a, b), lambda t: T.max_value(t), name="first")

    def source(idx: tuple, at: Expr) -> list:
        kept = list(idx)
        if op.keepdim:
            kept.pop(axis)
        return kept[:axis] + [at] + kept[axis:]

    r = te.reduce_axis((0, size), name="r")
    best = compute(out_shape, lambda *i: extreme(x(*source(i, r)), axis=r), name="best")
    k = te.reduce_axis((0, size), name="k")

    def index(*i: object) -> Expr:
        v, m = x(*source(i, k)), best(*i)
        hit = v == m
        if str(x.dtype).startswith("float"):
            hit = hit | (T.isnan(v) & T.isnan(m))
        return first(T.Select(hit, k.var.astype("int64"), T.const(2**62, "int64")), axis=k)
    return compute(out_shape, index, name=op.name.split(".")[1])


def clamped_index(v: Expr, size: Expr, negatives: bool) -> Expr:
    """An index inside [0, size), in the dim's own integer type (an int64 index where the
    producer's loops are int32 cannot be inlined into it): computed in int64, negatives
    counting from the end where `negatives`."""
    dim_type = str(size.ty) if hasattr(size, "ty") else "int64"
    v = v.astype("int64")
    size = T.Cast("int64", size)
    if negatives:
        v = T.Select(v < 0, v + size, v)
    inside: Expr = T.max(T.min(v, size - 1), T.const(0, "int64"))
    return inside.astype(dim_type)


@lowers("gather")
def lower_gather(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """out[i..] = x[i.. with index[i..] at `axis`] (torch.gather); out has index's shape."""
    x, index = args
    axis = op.axis % len(x.shape)

    def element(*i: object) -> Expr:
        at = list(i)
        at[axis] = clamped_index(index(*i), x.shape[axis], negatives=True)
        return x(*at)
    return compute(lo.shape(op.result.type), element, name="gather")


@lowers("index_select")
def lower_index_select(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """Slices of x along `axis` picked by a 0-d or 1-d index (the axis takes index's shape)."""
    x, index = args
    axis = op.axis % len(x.shape)
    picked = len(index.shape)

    def element(*i: object) -> Expr:
        at = list(i[:axis])
        at.append(clamped_index(index(*i[axis:axis + picked]), x.shape[axis], negatives=False))
        at += list(i[axis + picked:])
        return x(*at)
    return compute(lo.shape(op.result.type), element, name="index_select")

