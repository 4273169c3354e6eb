"""The `func` dialect: the function terminator."""
from __future__ import annotations

from typing import ClassVar

from ..core import Operation, Trait, register_op


@register_op
class ReturnOp(Operation):
    """Return the function's outputs."""

    name = "func.return"
    TRAITS = frozenset({Trait.TERMINATOR})
    OPERANDS = ("*values",)
    NUM_RESULTS: ClassVar[int | None] = 0

    def infer_types(self) -> list:
        return []
