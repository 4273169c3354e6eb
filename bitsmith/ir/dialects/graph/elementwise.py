"""Elementwise graph ops: unary math and activations, broadcasting binary ops, where, cast."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from scipy import special

from ....errors import InterpretError, VerifyError
from ...core import Operation, Trait, attr, register_op
from ...dtypes import DType, boolean, convert
from ...interpreter import EvalContext
from ...shapes import ShapeError, broadcast_shapes, normalize_axis
from ...types import Dim, TensorType


def plain_dtype(op: Operation, type: TensorType) -> DType:
    """The operand's element type, which must be a plain (not quantized) dtype."""
    if not isinstance(type.dtype, DType):
        raise VerifyError(op, f"expected a plain element type, got {type.dtype}")
    return type.dtype


def checked_axis(op: Operation, axis: int, rank: int) -> int:
    """`axis` normalized into 0..rank-1, or a VerifyError naming the op."""
    try:
        return normalize_axis(axis, rank)
    except ShapeError as exc:
        raise VerifyError(op, str(exc)) from None


def checked_broadcast(op: Operation, *shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    """The broadcast of `shapes`, or a VerifyError naming the op."""
    try:
        return broadcast_shapes(*shapes)
    except ShapeError as exc:
        raise VerifyError(op, str(exc)) from None


def in_float(fn: Callable[..., np.ndarray], dtype: DType, *args: np.ndarray) -> np.ndarray:
    """Apply fn in f32 (upcasting f16/bf16 like torch does), cast back to `dtype`."""
    work = [a.astype(np.float32, copy=False) for a in args]
    with np.errstate(all="ignore"):
        return dtype.cast(np.asarray(fn(*work)))


class UnaryOp(Operation):
    """Base of one-operand elementwise ops; `fn` is the numpy function on f32."""

    TRAITS = frozenset({Trait.ELEMENTWISE})

    OPERANDS = ("x",)
    FLOAT_ONLY: ClassVar[bool] = True
    RESULT_BOOL: ClassVar[bool] = False
    fn: ClassVar[Callable[[np.ndarray], np.ndarray]]

    def infer_types(self) -> list[TensorType]:
        return [self.x.type.with_dtype(boolean) if self.RESULT_BOOL else self.x.type]

    def verify_(self) -> None:
        dtype = plain_dtype(self, self.x.type)
        if self.FLOAT_ONLY and not dtype.is_float:
            raise VerifyError(self, f"expected a float operand, got {dtype}")
        if dtype == boolean and self.name != "graph.logical_not":
            raise VerifyError(self, "expected a numeric operand, got bool; insert a graph.cast")

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        dtype = boolean if self.RESULT_BOOL else self.x.type.dtype
        if dtype.is_float:
            return in_float(type(self).fn, dtype, x)
        with np.errstate(all="ignore"):
            return dtype.cast(np.asarray(type(self).fn(x)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    inner = np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    """x * Phi(x); NaN at +-inf, as torch's CPU kernel gives (its GELU is x*0.5*(1+erf(...))
    evaluated in a form where inf meets 0)."""
    y = np.float32(0.5) * x * (np.float32(1.0) + special.erf(x * np.float32(0.5 ** 0.5)))
    return np.where(np.isinf(x), np.float32(np.nan), y)


LOGICAL = ("logical_not", "logical_and", "logical_or")  # bool results, as in torch

_UNARY: dict[str, tuple[Callable[[Any], Any], bool, str]] = {
    # name: (numpy function on float32, float only, docstring)
    "neg": (np.negative, False, "-x"),
    "abs": (np.abs, False, "|x|"),
    "exp": (np.exp, True, "e^x"),
    "log": (np.log, True, "natural logarithm"),
    "log1p": (np.log1p, True, "log(1 + x), accurate for small x"),
    "expm1": (np.expm1, True, "e^x - 1, accurate for small x"),
    "sqrt": (np.sqrt, True, "square root"),
    "rsqrt": (lambda x: np.float32(1.0) / np.sqrt(x), True, "1/sqrt(x)"),
    "reciprocal": (lambda x: np.float32(1.0) / x, True, "1/x"),
    "sin": (np.sin, True, "sine"),
    "cos": (np.cos, True, "cosine"),
    "tanh": (np.tanh, True, "hyperbolic tangent"),
    "erf": (special.erf, True, "error function"),
    "sigmoid": (special.expit, True, "1/(1+e^-x)"),
    "relu": (lambda x: np.maximum(x, np.zeros((), x.dtype)), False, "max(x, 0)"),
    "silu": (lambda x: x * special.expit(x), True, "x * sigmoid(x)"),
    "floor": (np.floor, False, "round down"),
    "ceil": (np.ceil, False, "round up"),
    "round": (lambda x: x if x.dtype.kind in "iu" else np.rint(x), False,
              "round half to even"),
    "sign": (lambda x: np.nan_to_num(np.sign(x), nan=0.0), False, "-1, 0 or 1 (0 for NaN)"),
    "logical_not": (np.logical_not, False, "boolean not (a bool result)"),
}


def _make_unary(short: str, fn: Callable[..., Any], float_only: bool, doc: str) -> type:
    cls = type(f"{short.title().replace('_', '')}Op", (UnaryOp,),
               {"name": f"graph.{short}", "fn": staticmethod(fn), "FLOAT_ONLY": float_only,
                "RESULT_BOOL": short in LOGICAL, "__doc__": f"Elementwise {doc}.",
                "__module__": __name__})
    return register_op(cls)


UNARY_OPS: dict[str, type[UnaryOp]] = {k: _make_unary(k, *v) for k, v in _UNARY.items()}


@register_op
class GeluOp(UnaryOp):
    """GELU, exact (erf) or with the tanh approximation."""

    name = "graph.gelu"
    ATTRS = {"approximate": attr("str", "none", choices=("none", "tanh"))}

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        fn = _gelu_tanh if self.approximate == "tanh" else _gelu_erf
        return in_float(fn, self.x.type.dtype, x)


@register_op
class ClampOp(UnaryOp):
    """Clamp into [min, max]; either bound may be absent (relu6 is clamp(0, 6))."""

    name = "graph.clamp"
    FLOAT_ONLY = False
    ATTRS = {"min": attr("any", None, optional=True), "max": attr("any", None, optional=True)}

    def verify_(self) -> None:
        dtype = plain_dtype(self, self.x.type)
        for key in ("min", "max"):
            bound = self.attributes[key]
            if not dtype.is_float and isinstance(bound, float):
                raise VerifyError(self, f"float bound {key}={bound} on a {dtype} operand (torch "
                                        "would promote to float); insert a graph.cast")

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        lo = -np.inf if self.min is None else self.min
        hi = np.inf if self.max is None else self.max
        return self.x.type.dtype.cast(np.clip(x, lo, hi))


class BinaryOp(Operation):
    """Base of broadcasting two-operand ops; both operands share one element type."""

    TRAITS = frozenset({Trait.ELEMENTWISE})

    OPERANDS = ("lhs", "rhs")
    RESULT_BOOL: ClassVar[bool] = False
    fn: ClassVar[Callable[[np.ndarray, np.ndarray], np.ndarray]]

    def infer_types(self) -> list[TensorType]:
        shape = checked_broadcast(self, self.lhs.type.shape, self.rhs.type.shape)
        dtype = boolean if self.RESULT_BOOL else self.lhs.type.dtype
        return [TensorType(shape, dtype)]

    def verify_(self) -> None:
        lhs, rhs = plain_dtype(self, self.lhs.type), plain_dtype(self, self.rhs.type)
        if lhs != rhs:
            raise VerifyError(self, f"operand element types differ: {lhs} vs {rhs}; "
                                    "insert a graph.cast")

    def evaluate(self, ctx: EvalContext, lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        fn = type(self).fn
        out_dtype = boolean if self.RESULT_BOOL else self.lhs.type.dtype
        if self.lhs.type.dtype.is_float and not self.RESULT_BOOL:
            return in_float(fn, out_dtype, lhs, rhs)
        if self.name in INT_DIVISIONS and not np.all(rhs):
            raise InterpretError(f"'{self.name}' at {self.loc}: integer division by zero "
                                 "(torch raises ZeroDivisionError)")
        with np.errstate(all="ignore"):
            return out_dtype.cast(np.asarray(fn(lhs, rhs)))


INT_DIVISIONS = ("graph.div", "graph.floor_div", "graph.remainder", "graph.fmod")


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "iu":
        return a / b
    # Truncating, like torch.div(rounding_mode="trunc"), in integers: a float quotient would
    # round above 2**53. Step the floor quotient toward zero where it was negative and inexact.
    q = np.floor_divide(a, b)
    return q + ((q * b != a) & ((a < 0) != (b < 0)))


def _pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "iu" or not (b < 0).any():
        return np.power(a, b)
    # torch: an int to a negative power is 1 / a**-b truncated: 0 unless a is 1 or -1
    small = np.where(a == 1, 1, np.where(a == -1, 1 - 2 * (b & 1), 0))
    return np.where(b < 0, small, np.power(a, np.maximum(b, 0)))


_BINARY: dict[str, tuple[Callable[[Any, Any], Any], bool, str]] = {
    "add": (np.add, False, "lhs + rhs"),
    "sub": (np.subtract, False, "lhs - rhs"),
    "mul": (np.multiply, False, "lhs * rhs"),
    "div": (_int_div, False, "lhs / rhs (truncating for integers)"),
    "floor_div": (np.floor_divide, False, "floor(lhs / rhs)"),
    "remainder": (np.remainder, False, "lhs mod rhs with the sign of rhs (Python/torch)"),
    "fmod": (np.fmod, False, "lhs mod rhs with the sign of lhs (C fmod, torch.fmod)"),
    "pow": (_pow, False, "lhs ** rhs"),
    "maximum": (np.maximum, False, "larger of the two (NaN propagates)"),
    "minimum": (np.minimum, False, "smaller of the two (NaN propagates)"),
    "logical_and": (np.logical_and, False, "boolean and (a bool result)"),
    "logical_or": (np.logical_or, False, "boolean or (a bool result)"),
    "eq": (np.equal, True, "lhs == rhs"),
    "ne": (np.not_equal, True, "lhs != rhs"),
    "lt": (np.less, True, "lhs < rhs"),
    "le": (np.less_equal, True, "lhs <= rhs"),
    "gt": (np.greater, True, "lhs > rhs"),
    "ge": (np.greater_equal, True, "lhs >= rhs"),
}


def _make_binary(short: str, fn: Callable[..., Any], is_bool: bool, doc: str) -> type:
    cls = type(f"{short.title().replace('_', '')}Op", (BinaryOp,),
               {"name": f"graph.{short}", "fn": staticmethod(fn),
                "RESULT_BOOL": is_bool or short in LOGICAL,
                "__doc__": f"Elementwise {doc}, broadcasting.", "__module__": __name__})
    return register_op(cls)


BINARY_OPS: dict[str, type[BinaryOp]] = {k: _make_binary(k, *v) for k, v in _BINARY.items()}


@register_op
class WhereOp(Operation):
    """cond ? x : y, broadcasting all three."""

    name = "graph.where"
    TRAITS = frozenset({Trait.ELEMENTWISE})
    OPERANDS = ("cond", "x", "y")

    def infer_types(self) -> list[TensorType]:
        shape = checked_broadcast(self, self.cond.type.shape, self.x.type.shape,
                                  self.y.type.shape)
        return [TensorType(shape, self.x.type.dtype)]

    def verify_(self) -> None:
        if self.cond.type.dtype != boolean:
            raise VerifyError(self, f"condition must be bool, got {self.cond.type.dtype}")
        if self.x.type.dtype != self.y.type.dtype:
            raise VerifyError(self, f"branch element types differ: {self.x.type.dtype} vs "
                                    f"{self.y.type.dtype}; insert a graph.cast")

    def evaluate(self, ctx: EvalContext, cond: np.ndarray, x: np.ndarray,
                 y: np.ndarray) -> np.ndarray:
        return np.where(cond, x, y).astype(x.dtype, copy=False)


@register_op
class CastOp(Operation):
    """Convert to another element type as torch does on x86 CPU (`dtypes.convert`)."""

    name = "graph.cast"
    TRAITS = frozenset({Trait.ELEMENTWISE})
    OPERANDS = ("x",)
    ATTRS = {"dtype": attr("dtype")}

    def infer_types(self) -> list[TensorType]:
        return [self.x.type.with_dtype(self.dtype)]

    def verify_(self) -> None:
        plain_dtype(self, self.x.type)

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        return convert(x, self.dtype)
