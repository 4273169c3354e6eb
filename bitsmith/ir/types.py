"""Tensor types: static and symbolic dimensions, plain and quantized element types."""
from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from typing import cast

import sympy

from ..errors import DTypeError, ParseError, ShapeError
from .dimexpr import parse_dim
from .dimexpr import symbol as symbol  # re-exported: ir.types.symbol is the public name
from .dtypes import DType, IntType, LowFloatType, f16

Dim = int | sympy.Expr
"""A dimension: a non-negative int, or a sympy expression over symbols such as a batch `B`."""


def make_dim(value: object) -> Dim:
    """Normalize an int / str / sympy value to a Dim (an int whenever it is constant).

    A str is read by the dim grammar of `ir.dimexpr` (`"B"`, `"2*S + 1"`), never evaluated."""
    if isinstance(value, bool):
        raise ShapeError(f"a dimension must be an int or a sympy expression, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ShapeError(f"a dimension must be >= 0, got {value}")
        return value
    expr = _dim_from_text(value) if isinstance(value, str) else value
    if not isinstance(expr, sympy.Expr):
        raise ShapeError(f"a dimension must be an int or a sympy expression, got {value!r}")
    expr = _simplified(expr) if not expr.is_Symbol else expr
    if expr.is_Integer:
        return make_dim(int(expr))
    return expr


def _dim_from_text(text: str) -> sympy.Expr:
    try:
        return parse_dim(text)
    except ParseError as exc:
        raise ShapeError(f"bad dimension {text[:80]!r}: {exc.reason} (column {exc.col}); "
                         "expected an integer expression over symbols such as '2*S + 1'"
                         ) from None


def _as_expr(d: Dim) -> sympy.Expr:
    return sympy.Integer(d) if isinstance(d, int) else d


@functools.lru_cache(maxsize=4096)
def _simplified(expr: sympy.Expr) -> sympy.Expr:
    """sympy.simplify, memoized: the same few dim expressions recur in every op of a model."""
    return sympy.simplify(expr)


def dims_equal(a: Dim, b: Dim) -> bool:
    """True when two dimensions are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    a, b = _as_expr(a), _as_expr(b)
    return a == b or _simplified(a - b) == 0


def is_static(d: Dim) -> bool:
    """True for a constant dimension."""
    return isinstance(d, int)


def format_dim(d: Dim) -> str:
    """Text of a dimension: `16`, `B`, or a parenthesized expression `(16*B)`."""
    if isinstance(d, int):
        return str(d)
    if isinstance(d, sympy.Symbol) and _is_bare_symbol(d.name):
        return d.name
    return f"({sympy.sstr(d)})"


def _is_bare_symbol(name: str) -> bool:
    # upper-case names cannot contain the 'x' that separates dims, so they print unquoted
    return name[:1].isupper() and all(c.isupper() or c.isdigit() or c == "_" for c in name)


def evaluate_dim(d: Dim, bindings: dict[sympy.Symbol, int]) -> int:
    """The concrete value of a dimension under symbol bindings."""
    if isinstance(d, int):
        return d
    value = d.subs(bindings.items())  # sympy's Mapping overload wants Basic keys and values
    if not value.is_Integer:
        missing = sorted(str(s) for s in value.free_symbols)
        raise ShapeError(f"dimension {format_dim(d)} has unbound symbols {missing}")
    return int(value)


class GroupAxis(enum.Enum):
    """Which channel owns the scales of a quantized [out, in] weight (see `ir.dialects.quant`)."""

    OUT = "out"  # per output channel: scales [N, ceil(K/group)], groups run along the inputs
    IN = "in"  # per input channel: scales [ceil(N/group), K], groups run along the outputs


class ZeroPoint(enum.Enum):
    """How a quantized weight is offset."""

    NONE = "none"  # symmetric
    INT = "int"  # asymmetric, zero point stored in the storage integer type
    FLOAT = "float"  # asymmetric, zero point stored in the scale dtype
    MIN = "min"  # scale and minimum (llama.cpp's Q4_1): w = decode(q) * s + m, m in the scale
    # dtype; the zero-point operand holds m


@dataclass(frozen=True, slots=True)
class QuantType:
    """Element type of a quantized weight: storage format plus grouping and scale metadata."""

    storage: DType  # IntType of 1..8 bits or a LowFloatType
    group_size: int = 0  # 0: one group spans the whole axis (per-channel)
    axis: GroupAxis = GroupAxis.OUT
    scale_dtype: DType = f16
    zero_point: ZeroPoint = ZeroPoint.NONE

    def __post_init__(self) -> None:
        if isinstance(self.storage, IntType):
            if not 1 <= self.storage.width <= 8:
                raise DTypeError(f"quantized integer width must be 1..8, got {self.storage}")
        elif not isinstance(self.storage, LowFloatType):
            raise DTypeError(f"quantized storage must be iN/uN or fBeEmM, got {self.storage}")
        if self.group_size < 0:
            raise DTypeError(f"group size must be >= 0 (0 = per channel), got {self.group_size}")
        if not self.scale_dtype.is_float:
            raise DTypeError(f"scale dtype must be a float type, got {self.scale_dtype}")
        if isinstance(self.storage, LowFloatType) and self.zero_point is ZeroPoint.INT:
            raise DTypeError("an integer zero point needs integer storage, got "
                             f"{self.storage}; use zero_point=float or none")

    @property
    def bits(self) -> int:
        """Bits per stored weight element."""
        return self.storage.bits

    @property
    def name(self) -> str:
        """Text form, e.g. `!quant.weight<u4, group=128, axis=in, scale=f16, zero_point=int>`."""
        return (f"!quant.weight<{self.storage.name}, group={self.group_size}, "
                f"axis={self.axis.value}, scale={self.scale_dtype.name}, "
                f"zero_point={self.zero_point.value}>")

    def __str__(self) -> str:
        return self.name


ElementType = DType | QuantType


@dataclass(frozen=True, slots=True)
class TensorType:
    """A ranked tensor type: shape of static/symbolic dims and an element type."""

    shape: tuple[Dim, ...]
    dtype: ElementType

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(make_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        """True when every dimension is a constant."""
        return all(isinstance(d, int) for d in self.shape)

    @property
    def symbols(self) -> set[sympy.Symbol]:
        """The symbols the shape mentions."""
        out: set[sympy.Symbol] = set()
        for d in self.shape:
            if not isinstance(d, int):
                # sympy types free_symbols as set[Basic]; a shape only holds Symbols
                out |= cast("set[sympy.Symbol]", d.free_symbols)
        return out

    def numel(self) -> Dim:
        """Element count (symbolic when the shape is)."""
        static = [d for d in self.shape if isinstance(d, int)]
        if len(static) == self.rank:
            return math.prod(static)
        return make_dim(sympy.Mul(*[_as_expr(d) for d in self.shape]))

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        """The same element type with another shape."""
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: ElementType) -> TensorType:
        """The same shape with another element type."""
        return TensorType(self.shape, dtype)

    def same_as(self, other: TensorType) -> bool:
        """Structural equality that compares symbolic dims up to simplification."""
        return (self.dtype == other.dtype and self.rank == other.rank
                and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape, strict=True)))

    def __str__(self) -> str:
        parts = [format_dim(d) for d in self.shape] + [str(self.dtype)]
        return f"tensor<{'x'.join(parts)}>"
