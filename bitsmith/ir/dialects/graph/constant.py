"""Ops that make tensors: named weights and inline literals, fills, ranges."""
from __future__ import annotations

import numpy as np

from ....errors import VerifyError
from ...core import Operation, Trait, attr, register_op
from ...interpreter import EvalContext
from ...packing import unpack_rows
from ...types import QuantType
from .elementwise import plain_dtype


@register_op
class ConstantOp(Operation):
    """A constant tensor: a module weight referenced by name, or a small inline literal.

    `layout`, when set, is a free-form tag (e.g. "HWIO", "KN") naming the physical layout
    the weight was pre-packed into at compile time, so that consumers can tell a re-laid-out
    weight from its original; it does not change semantics: the value is taken as is.

    A weight of a quantized type ([N, K] of `!quant.weight<...>`) is stored packed (uint32
    [N, ceil(K*bits/32)], `ir.packing` rows layout); its value is the unpacked codes.
    """

    name = "graph.constant"
    TRAITS = frozenset({Trait.SOURCE})
    ATTRS = {"weight": attr("str", None, optional=True),
             "value": attr("dense", None, optional=True),
             "layout": attr("str", None, optional=True)}
    RESULT_TYPES_GIVEN = True

    def verify_(self) -> None:
        if (self.weight is None) == (self.value is None):
            raise VerifyError(self, "needs exactly one of 'weight' (a name) or 'value' "
                                    "(an inline dense literal)")
        if self.layout is not None and not self.layout.strip():
            raise VerifyError(self, "layout tag must name a layout (e.g. \"HWIO\"), "
                                    f"got {self.layout!r}")
        if self.value is not None and isinstance(self.result.type.dtype, QuantType):
            raise VerifyError(self, "a quantized constant must be a packed weight, not an "
                                    "inline literal")
        if self.value is not None and self.value.type != self.result.type:
            raise VerifyError(self, f"literal type {self.value.type} differs from the "
                                    f"result type {self.result.type}")

    def evaluate(self, ctx: EvalContext) -> np.ndarray:
        if self.value is not None:
            return self.value.array
        array = ctx.weight(self.weight)
        qtype = self.result.type.dtype
        if isinstance(qtype, QuantType):
            return unpack_rows(array, qtype.bits, ctx.shape(self.result.type)[-1])
        return array


@register_op
class FullOp(Operation):
    """A tensor of the result type filled with one value."""

    name = "graph.full"
    TRAITS = frozenset({Trait.SOURCE, Trait.INJECTIVE})
    ATTRS = {"value": attr("any")}
    RESULT_TYPES_GIVEN = True

    def verify_(self) -> None:
        if not isinstance(self.value, (int, float, bool)):
            raise VerifyError(self, f"value must be a number, got {self.value!r}")

    def evaluate(self, ctx: EvalContext) -> np.ndarray:
        dtype = plain_dtype(self, self.result.type)
        return dtype.cast(np.full(ctx.shape(self.result.type), self.value))


@register_op
class ArangeOp(Operation):
    """start, start + step, ... filling the 1-d result type."""

    name = "graph.arange"
    TRAITS = frozenset({Trait.SOURCE, Trait.INJECTIVE})
    ATTRS = {"start": attr("any", 0), "step": attr("any", 1)}
    RESULT_TYPES_GIVEN = True

    def verify_(self) -> None:
        if self.result.type.rank != 1:
            raise VerifyError(self, f"result must be 1-d, got {self.result.type}")
        for key in ("start", "step"):
            if not isinstance(self.attributes[key], (int, float)):
                raise VerifyError(self, f"{key} must be a number, got "
                                        f"{self.attributes[key]!r}")

    def evaluate(self, ctx: EvalContext) -> np.ndarray:
        (n,) = ctx.shape(self.result.type)
        exact = all(isinstance(v, int) for v in (self.start, self.step))  # no float64 rounding
        values = self.start + np.arange(n, dtype=np.int64 if exact else np.float64) * self.step
        return plain_dtype(self, self.result.type).cast(values)
