"""Whole-module verification: SSA dominance, op rules, types, the terminator."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import VerifyError
from .core import Block, Operation, Value
from .packing import row_words
from .types import QuantType

if TYPE_CHECKING:
    from .module import Module


def verify(module: Module) -> None:
    """Raise VerifyError at the first broken rule; return None when the module is valid."""
    _verify_block(module.body, set(), module)
    term = module.body.terminator
    if term is None or term.name != "func.return":
        got = "an empty body" if term is None else f"'{term.name}'"
        raise VerifyError(None, f"module @{module.name}: the body must end with 'func.return', "
                                f"got {got}")


def _verify_block(block: Block, visible: set[Value], module: Module) -> None:
    visible = visible | set(block.args)
    for position, op in enumerate(block.ops):
        if op.parent is not block:
            raise VerifyError(op, "op's parent link does not point at its block")
        for index, value in enumerate(op.operands):
            if value not in visible:
                raise VerifyError(op, f"operand #{index} does not dominate this use (it is "
                                      "defined later, in another region, or erased)")
            if (op, index) not in value.uses:
                raise VerifyError(op, f"operand #{index}'s use list is out of date")
        if op.name == "func.return" and position != len(block.ops) - 1:
            raise VerifyError(op, "'func.return' must be the last op of its block")
        op.verify()
        _verify_weight(op, module)
        for region in op.regions:
            for inner in region.blocks:
                _verify_block(inner, visible, module)
        visible |= set(op.results)
        for result in op.results:
            _verify_uses(result)


def _verify_uses(value: Value) -> None:
    for user, index in value.uses:
        if index >= len(user.operands) or user.operands[index] is not value:
            raise VerifyError(user, f"stale use: operand #{index} is no longer this value")


def _verify_weight(op: Operation, module: Module) -> None:
    ref = op.attributes.get("weight") if op.name == "graph.constant" else None
    if not isinstance(ref, str) or ref not in module.weights:
        return
    array = module.weights[ref]
    want = op.results[0].type
    if isinstance(want.dtype, QuantType):
        if want.rank != 2:
            raise VerifyError(op, f"a quantized weight is 2-d [out, in], got {want}")
        n, k = want.shape
        if isinstance(n, int) and isinstance(k, int):
            packed = (n, row_words(k, want.dtype.bits))
            if tuple(array.shape) != packed or array.dtype != np.uint32:
                raise VerifyError(op, f"weight '{ref}' is {array.dtype}{list(array.shape)}; "
                                      f"{want} is stored packed as uint32{list(packed)}")
        return
    if tuple(array.shape) != tuple(want.shape) or array.dtype != want.dtype.numpy_dtype:
        raise VerifyError(op, f"weight '{ref}' is {array.dtype}{list(array.shape)}, "
                              f"the constant's type says {want}")
