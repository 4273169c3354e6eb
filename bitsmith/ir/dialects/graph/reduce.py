"""Reductions over axes, and argmax/argmin."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ....errors import VerifyError
from ...core import Operation, Trait, attr, register_op
from ...dtypes import boolean, i64
from ...interpreter import EvalContext
from ...shapes import ShapeError, normalize_axis
from ...types import TensorType
from .elementwise import checked_axis, in_float, plain_dtype


def reduced_shape(op: Operation, shape: tuple, axes: tuple[int, ...], keepdim: bool) -> tuple:
    """The shape after reducing `axes` (an empty tuple means all axes)."""
    try:
        picked = {normalize_axis(a, len(shape)) for a in axes} if axes else set(range(len(shape)))
    except ShapeError as exc:
        raise VerifyError(op, str(exc)) from None
    if len(picked) != len(axes or picked):
        raise VerifyError(op, f"repeated axis in {list(axes)}")
    if keepdim:
        return tuple(1 if i in picked else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in picked)


class ReduceOp(Operation):
    """Base of reductions over `axes` (empty: all), keeping reduced dims when `keepdim`."""

    TRAITS = frozenset({Trait.REDUCTION})

    OPERANDS = ("x",)
    ATTRS = {"axes": attr("ints", ()), "keepdim": attr("bool", False)}
    fn: ClassVar[Callable[..., Any]]
    ARITHMETIC: ClassVar[bool] = False  # sum/mean/prod: bool (and for mean, int) is refused

    def infer_types(self) -> list[TensorType]:
        return [self.x.type.with_shape(reduced_shape(self, self.x.type.shape, self.axes,
                                                     self.keepdim))]

    def verify_(self) -> None:
        dtype = plain_dtype(self, self.x.type)
        mean = self.name == "graph.reduce_mean"
        if self.ARITHMETIC and (dtype == boolean or (mean and not dtype.is_float)):
            raise VerifyError(self, f"cannot {self.name[13:]} {dtype} values (torch widens or "
                                    "refuses); insert a graph.cast first")

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        axes = tuple(a % x.ndim for a in self.axes) if self.axes and x.ndim else None
        dtype = self.x.type.dtype
        reduce = type(self).fn
        if dtype.is_float:
            return in_float(lambda v: reduce(v, axis=axes, keepdims=self.keepdim), dtype, x)
        work = x.astype(np.int64) if dtype.is_int else x
        return dtype.cast(np.asarray(reduce(work, axis=axes, keepdims=self.keepdim)))


def _make(short: str, fn: Callable[..., Any], doc: str) -> type:
    cls = type(f"Reduce{short.title()}Op", (ReduceOp,),
               {"name": f"graph.reduce_{short}", "fn": staticmethod(fn),
                "ARITHMETIC": short in ("sum", "mean", "prod"),
                "__doc__": doc, "__module__": __name__})
    return register_op(cls)


ReduceSumOp = _make("sum", np.sum, "Sum over axes.")
ReduceMeanOp = _make("mean", np.mean, "Mean over axes.")
ReduceMaxOp = _make("max", np.max, "Maximum over axes.")
ReduceMinOp = _make("min", np.min, "Minimum over axes.")
ReduceProdOp = _make("prod", np.prod, "Product over axes.")
ReduceAnyOp = _make("any", np.any, "Logical or over axes.")
ReduceAllOp = _make("all", np.all, "Logical and over axes.")


class ArgReduceOp(Operation):
    """Base of index-of-extreme reductions along one axis (first index on ties); i64 result."""

    TRAITS = frozenset({Trait.REDUCTION})

    OPERANDS = ("x",)
    ATTRS = {"axis": attr("int"), "keepdim": attr("bool", False)}
    fn: ClassVar[Callable[..., Any]]

    def infer_types(self) -> list[TensorType]:
        shape = reduced_shape(self, self.x.type.shape, (self.axis,), self.keepdim)
        return [TensorType(shape, i64)]

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        out = type(self).fn(x, axis=self.axis % max(x.ndim, 1), keepdims=self.keepdim)
        return np.asarray(out, dtype=np.int64)


@register_op
class ArgMaxOp(ArgReduceOp):
    """Index of the maximum along an axis."""

    name = "graph.argmax"
    fn = staticmethod(np.argmax)


@register_op
class ArgMinOp(ArgReduceOp):
    """Index of the minimum along an axis."""

    name = "graph.argmin"
    fn = staticmethod(np.argmin)


@register_op
class CumsumOp(Operation):
    """Inclusive cumulative sum along an axis."""

    name = "graph.cumsum"
    TRAITS = frozenset({Trait.SCAN})
    OPERANDS = ("x",)
    ATTRS = {"axis": attr("int")}

    def infer_types(self) -> list[TensorType]:
        checked_axis(self, self.axis, self.x.type.rank)
        return [self.x.type]

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        dtype = self.x.type.dtype
        work = x.astype(np.float32 if dtype.is_float else np.int64)
        if x.ndim == 0:
            return dtype.cast(work)  # torch allows axis 0 or -1 on a 0-d tensor
        return dtype.cast(np.cumsum(work, axis=self.axis % x.ndim))
