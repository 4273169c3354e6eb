"""The `kernel` dialect: `kernel.fused` owns a region of graph ops that runs as one kernel.

The region is isolated from above: its ops see only the block arguments (one per kernel input,
same types) and each other. `kernel.yield` returns the kernel's outputs.
"""
from __future__ import annotations

from typing import ClassVar, cast

import numpy as np

from ...errors import VerifyError
from ..core import Operation, Trait, attr, register_op
from ..interpreter import EvalContext, interpret_block

KERNEL_KINDS = ("matmul", "conv", "attention", "reduction", "pool", "elementwise", "injective",
                "opaque")
"""What a kernel is, by its anchor op: codegen picks a template family from this."""

KERNEL_PRECISIONS = ("f32", "bf16", "int8")
"""Arithmetic a kernel's contraction may run in below its f32 types (`compile(precision=)`):
"bf16" rounds both operands to bf16 and accumulates in f32; "int8" quantizes each row of the
activations on its own scale and the weight per output channel, sums in int32 and scales the
sums back to f32."""


@register_op
class YieldOp(Operation):
    """Return a kernel region's outputs."""

    name = "kernel.yield"
    TRAITS = frozenset({Trait.TERMINATOR})
    OPERANDS = ("*values",)
    NUM_RESULTS: ClassVar[int | None] = 0

    def infer_types(self) -> list:
        return []

    def verify_(self) -> None:
        # anywhere else the interpreter would stop at it and return its operands as outputs
        region = self.parent.parent if self.parent is not None else None
        owner = region.parent if region is not None else None
        if owner is None or owner.name != "kernel.fused":
            where = "the function body" if owner is None else f"a '{owner.name}' region"
            raise VerifyError(self, f"'kernel.yield' may only end a 'kernel.fused' region, "
                                    f"found in {where}")


@register_op
class FusedOp(Operation):
    """A fused kernel: inputs, a region of graph ops, and the values it yields as results."""

    name = "kernel.fused"
    TRAITS = frozenset({Trait.REGION})
    OPERANDS = ("*inputs",)
    ATTRS = {"kind": attr("str", choices=KERNEL_KINDS), "name": attr("str"),
             # the arithmetic its contraction may run in (None: the types' own, f32)
             "precision": attr("str", None, choices=KERNEL_PRECISIONS, optional=True),
             # int8: SmoothQuant factors s per reduction index (x / s, W * s), calibrated
             "smooth": attr("floats", None, optional=True)}
    NUM_REGIONS = 1
    RESULT_TYPES_GIVEN = True
    NUM_RESULTS: ClassVar[int | None] = None

    @property
    def kernel_name(self) -> str:
        """The `name` attribute (`op.name` is the op kind, "kernel.fused")."""
        return cast(str, self.attributes["name"])  # a str by ATTRS, checked by verify()

    @property
    def body_ops(self) -> list[Operation]:
        """The fused ops, without the terminator."""
        return [op for op in self.regions[0].block.ops if op.name != "kernel.yield"]

    def verify_(self) -> None:
        if len(self.regions[0].blocks) != 1:
            raise VerifyError(self, f"expected a single-block region, got "
                                    f"{len(self.regions[0].blocks)} blocks")
        block = self.regions[0].block
        if len(block.args) != len(self.operands):
            raise VerifyError(self, f"region takes {len(block.args)} argument(s) for "
                                    f"{len(self.operands)} input(s)")
        for i, (arg, value) in enumerate(zip(block.args, self.operands, strict=True)):
            if not arg.type.same_as(value.type):
                raise VerifyError(self, f"region argument #{i} is {arg.type}, input is "
                                        f"{value.type}")
        term = block.terminator
        if term is None or term.name != "kernel.yield":
            raise VerifyError(self, "region must end with 'kernel.yield'")
        got = [v.type for v in term.operands]
        want = [r.type for r in self.results]
        if len(got) != len(want) or not all(a.same_as(b) for a, b in zip(got, want, strict=True)):
            raise VerifyError(self, f"yields ({', '.join(map(str, got))}), results are "
                                    f"({', '.join(map(str, want))})")
        self._verify_isolated(block)

    def _verify_isolated(self, block) -> None:
        defined = set(block.args)
        for op in block.ops:
            for i, value in enumerate(op.operands):
                if value not in defined:
                    raise VerifyError(op, f"operand #{i} comes from outside its kernel.fused "
                                          "region; pass it in as a kernel input")
            if op.name == "kernel.yield" and op is not block.ops[-1]:
                raise VerifyError(op, "'kernel.yield' must be the last op of its region")
            defined.update(op.results)

    def evaluate(self, ctx: EvalContext, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(interpret_block(self.regions[0].block, inputs, ctx))
