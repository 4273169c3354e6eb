"""A module: one function (`main`) whose body block takes the inputs, plus named weights."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import IRError
from .core import Block, Operation, Value
from .printer import print_module
from .types import TensorType


class Module:
    """The unit bitsmith compiles: `func @main(inputs) -> outputs` and the weights it names.

    Weights are referenced by name from `graph.constant` ops and live in `weights`; they are
    never printed inline.
    """

    def __init__(self, name: str, input_types: Sequence[TensorType],
                 input_names: Sequence[str | None] | None = None,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        self.name = name
        self.body = Block(input_types, input_names)
        self.weights: dict[str, np.ndarray] = dict(weights or {})
        # what passes record for later stages (JSON-able, e.g. the quantization report)
        self.metadata: dict[str, Any] = {}
        # example input tuples that calibrate passes (quantization), never printed
        self.calibration: list[tuple[np.ndarray, ...]] = []

    @property
    def inputs(self) -> list[Value]:
        """The function arguments."""
        return list(self.body.args)

    @property
    def input_names(self) -> list[str]:
        """Argument names (their name hints, or argN)."""
        return [a.name_hint or f"arg{i}" for i, a in enumerate(self.body.args)]

    @property
    def return_op(self) -> Operation:
        """The `func.return` terminator."""
        term = self.body.terminator
        if term is None or term.name != "func.return":
            raise IRError(f"module @{self.name} has no func.return terminator")
        return term

    @property
    def outputs(self) -> tuple[Value, ...]:
        """The returned values."""
        return self.return_op.operands

    @property
    def output_types(self) -> list[TensorType]:
        """Types of the returned values."""
        return [v.type for v in self.outputs]

    def walk(self) -> Iterator[Operation]:
        """Every op, nested ones included, pre-order."""
        for op in list(self.body.ops):
            yield from op.walk()

    @property
    def ops(self) -> list[Operation]:
        """Top-level ops of the body, in order."""
        return list(self.body.ops)

    def __str__(self) -> str:
        return print_module(self)
