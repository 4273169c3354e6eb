"""The numpy reference interpreter: the oracle every pass and kernel is checked against."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import sympy

from ..errors import InputError, InterpretError
from .core import Block, Operation, Value
from .dtypes import DType
from .types import TensorType, evaluate_dim, format_dim

if TYPE_CHECKING:
    from .module import Module


@dataclass
class EvalContext:
    """What ops may consult while evaluating: weights and the bound symbolic dims."""

    weights: Mapping[str, np.ndarray]
    bindings: dict[sympy.Symbol, int] = field(default_factory=dict)

    def shape(self, type: TensorType) -> tuple[int, ...]:
        """The concrete shape of a (possibly symbolic) type."""
        return tuple(evaluate_dim(d, self.bindings) for d in type.shape)

    def weight(self, name: str) -> np.ndarray:
        """A weight by name, or an error naming what is missing."""
        if name not in self.weights:
            raise InterpretError(f"weight '{name}' is not bound; parse(text, weights=...) "
                                 "or set module.weights")
        return self.weights[name]


def interpret(module: Module, *inputs: np.ndarray) -> list[np.ndarray]:
    """Run `module` on numpy inputs; return its outputs as a list of arrays."""
    args = module.body.args
    if len(inputs) != len(args):
        raise InputError(f"module @{module.name} takes {len(args)} input(s) "
                         f"({', '.join(module.input_names)}), got {len(inputs)}")
    ctx = EvalContext(module.weights)
    arrays = [bind_input(ctx, arg, np.asarray(x), name)
              for arg, x, name in zip(args, inputs, module.input_names, strict=True)]
    return interpret_block(module.body, arrays, ctx)


def kernel_calls(module: Module, inputs: Sequence[np.ndarray]
                 ) -> Iterator[tuple[Operation, list[np.ndarray], EvalContext]]:
    """Interpret a fused module on `inputs`, yielding each `kernel.fused` op with the values
    it is fed (what a generated kernel is checked against)."""
    if len(inputs) != len(module.inputs):
        raise InputError(f"module @{module.name} takes {len(module.inputs)} input(s) "
                         f"({', '.join(module.input_names)}), got {len(inputs)}")
    ctx = EvalContext(module.weights)
    env = {arg: bind_input(ctx, arg, np.asarray(a), f"input {i}")
           for i, (arg, a) in enumerate(zip(module.inputs, inputs, strict=True))}
    for op in module.ops:
        if op.name == "func.return":
            break
        args = [env[v] for v in op.operands]
        if op.name == "kernel.fused":
            yield op, args, ctx
        env.update(zip(op.results, evaluate_op(op, ctx, args), strict=True))


def bind_input(ctx: EvalContext, arg: Value, array: np.ndarray, name: str) -> np.ndarray:
    """Check an input against its type, binding symbolic dims; return it in storage dtype."""
    want = arg.type
    if array.ndim != want.rank:
        raise InputError(f"input '{name}': expected rank {want.rank} ({want}), "
                         f"got shape {list(array.shape)}")
    for axis, (dim, got) in enumerate(zip(want.shape, array.shape, strict=True)):
        if isinstance(dim, int):
            if dim != got:
                raise InputError(f"input '{name}': expected {want}, got shape "
                                 f"{list(array.shape)} (dim {axis} should be {dim})")
        elif isinstance(dim, sympy.Symbol):
            bound = ctx.bindings.setdefault(dim, got)
            if bound != got:
                raise InputError(f"input '{name}': dim {axis} is {format_dim(dim)} = {bound} "
                                 f"from an earlier input, got {got}")
        elif evaluate_dim(dim, ctx.bindings) != got:
            raise InputError(f"input '{name}': dim {axis} should be {format_dim(dim)}, got {got}")
    dtype = want.dtype
    if not isinstance(dtype, DType):
        raise InputError(f"input '{name}' has non-plain element type {dtype}")
    if array.dtype != dtype.numpy_dtype:
        if array.dtype.kind != np.dtype(dtype.numpy_dtype).kind:
            raise InputError(f"input '{name}': expected element type {dtype}, "
                             f"got numpy {array.dtype}")
        array = dtype.cast(array)
    return array


def interpret_block(block: Block, args: Sequence[np.ndarray], ctx: EvalContext,
                    env: dict[Value, np.ndarray] | None = None) -> list[np.ndarray]:
    """Evaluate a block given its argument arrays; return the terminator's operand arrays."""
    if len(args) != len(block.args):
        raise InputError(f"the block takes {len(block.args)} argument(s), got {len(args)}")
    env = dict(env or {})
    env.update(zip(block.args, args, strict=True))
    for op in block.ops:
        operands = [env[v] for v in op.operands]
        if op.name in ("func.return", "kernel.yield"):
            return operands
        outs = evaluate_op(op, ctx, operands)
        env.update(zip(op.results, outs, strict=True))
    raise InterpretError("block has no terminator")


def evaluate_op(op: Operation, ctx: EvalContext, operands: list[np.ndarray]) -> list[np.ndarray]:
    """Evaluate one op and check its results against the declared types."""
    out = op.evaluate(ctx, *operands)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(outs) != len(op.results):
        raise InterpretError(f"'{op.name}' at {op.loc}: evaluate gave {len(outs)} result(s), "
                             f"expected {len(op.results)}")
    checked = []
    for result, array in zip(op.results, outs, strict=True):
        array = np.asarray(array)
        want = result.type
        shape = ctx.shape(want)
        if tuple(array.shape) != shape:
            raise InterpretError(f"'{op.name}' at {op.loc}: result shape {list(array.shape)} "
                                 f"does not match its type {want} = {list(shape)}")
        held = want.dtype.numpy_dtype if isinstance(want.dtype, DType) else np.dtype(np.uint8)
        if array.dtype != held:  # quantized tensors are held as their uint8 bit codes
            raise InterpretError(f"'{op.name}' at {op.loc}: result dtype {array.dtype} does "
                                 f"not match its type {want}")
        checked.append(array)
    return checked
