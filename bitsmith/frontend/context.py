"""What an ATen converter sees: the builder, node types, and helpers for scalars and casts."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy
import torch
from torch import fx

from ..errors import ConversionError
from ..ir import Builder, DenseAttr, Operation, TensorType, Value, graph
from ..ir import dtypes as dt
from ..ir.types import Dim, make_dim

TORCH_DTYPES: dict[torch.dtype, dt.DType] = {
    torch.float32: dt.f32, torch.float16: dt.f16, torch.bfloat16: dt.bf16,
    torch.float64: dt.f32,  # imported as f32: bitsmith computes in at most 32 bits
    torch.int64: dt.i64, torch.int32: dt.i32, torch.int16: dt.i16, torch.int8: dt.i8,
    torch.uint8: dt.u8, torch.bool: dt.boolean,
}


def ir_dtype(dtype: torch.dtype) -> dt.DType:
    """The IR dtype of a torch dtype."""
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"torch dtype {dtype} has no IR equivalent")
    return TORCH_DTYPES[dtype]


def torch_dim(symbols: dict[sympy.Symbol, sympy.Symbol], value: Any) -> Dim:
    """A torch int/SymInt as an IR dim, torch's symbols renamed (s0 -> B)."""
    if isinstance(value, torch.SymInt):
        return make_dim(value.node.expr.xreplace(symbols))
    return make_dim(int(value))


def plain_dtype(type: TensorType) -> dt.DType:
    """The element type of an imported tensor: a plain dtype (torch has no quantized types of
    ours; those come from the quantize pass)."""
    if not isinstance(type.dtype, dt.DType):
        raise ConversionError(f"expected a plain element type, got {type.dtype}")
    return type.dtype


Converter = Callable[..., Any]
CONVERTERS: dict[Any, Converter] = {}


def converts(*targets: Any) -> Callable[[Converter], Converter]:
    """Register a converter for one or more ATen overloads."""
    def register(fn: Converter) -> Converter:
        for target in targets:
            CONVERTERS[target] = fn
        return fn
    return register


@dataclass
class ImportContext:
    """State of one import: the builder, the current node, and torch->IR symbol names."""

    builder: Builder
    symbols: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)
    node: fx.Node | None = None
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    """The module's weights so far (converters that need a constant's value read them)."""

    @property
    def current(self) -> fx.Node:
        """The node being converted."""
        if self.node is None:
            raise ConversionError("no node is being converted")
        return self.node

    # ---- types --------------------------------------------------------------------------
    def dim(self, value: Any) -> Dim:
        """A torch int/SymInt as an IR dim, torch's symbols renamed (s0 -> B)."""
        return torch_dim(self.symbols, value)

    def type_of_val(self, val: Any) -> TensorType:
        """The IR type of a FakeTensor."""
        return self.type_of_val_with(self.symbols, val)

    @staticmethod
    def type_of_val_with(symbols: dict[sympy.Symbol, sympy.Symbol], val: Any) -> TensorType:
        """The IR type of a FakeTensor under a symbol renaming."""
        shape = tuple(torch_dim(symbols, d) for d in val.shape)
        return TensorType(shape, ir_dtype(val.dtype))

    def out_type(self, index: int | None = None) -> TensorType:
        """The IR type of the current node's (index-th) output."""
        val = self.node.meta["val"] if self.node is not None else None
        if index is not None and val is not None:
            val = val[index]
        if not isinstance(val, torch.Tensor):
            raise ConversionError(f"node {self.node} has no tensor metadata")
        return self.type_of_val(val)

    def out_dtype(self, index: int | None = None) -> dt.DType:
        """The IR dtype of the current node's (index-th) output."""
        return plain_dtype(self.out_type(index))

    # ---- building -----------------------------------------------------------------------
    def op(self, cls: type[Operation], *operands: Value | None, **kwargs: Any) -> Operation:
        """Create an op at the insertion point."""
        return self.builder.create(cls, *operands, **kwargs)

    def value(self, cls: type[Operation], *operands: Value | None, **kwargs: Any) -> Value:
        """Create a single-result op and return its value."""
        return self.builder.value(cls, *operands, **kwargs)

    def scalar(self, value: float | int | bool, dtype: dt.DType) -> Value:
        """A rank-0 literal constant."""
        type = TensorType((), dtype)
        array = dtype.cast(np.asarray(value))
        return self.value(graph.ConstantOp, result_types=[type], value=DenseAttr(type, array))

    def cast(self, value: Value, dtype: dt.DType) -> Value:
        """`value` converted to `dtype` (no op when it already is)."""
        if value.type.dtype == dtype:
            return value
        return self.value(graph.CastOp, value, dtype=dtype)

    def as_tensor(self, value: Value | float | int | bool, dtype: dt.DType) -> Value:
        """A tensor operand of `dtype` from a Value or a Python scalar."""
        if isinstance(value, Value):
            return self.cast(value, dtype)
        if isinstance(value, (bool, int, float)):
            return self.scalar(value, dtype)
        raise ConversionError(f"expected a tensor or a number, got {value!r}")

    def reshape(self, value: Value, type: TensorType) -> Value:
        """`value` reshaped to `type` (no op when the shape already matches)."""
        if value.type.same_as(type):
            return value
        return self.value(graph.ReshapeOp, value, result_types=[type])
