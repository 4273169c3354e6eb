"""Dead-code elimination and common-subexpression elimination."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Block, Module, Operation
from ..ir.attributes import format_attr
from .manager import ModulePass, PassContext, register_pass

TERMINATORS = ("func.return", "kernel.yield")


def erase_dead_ops(block: Block) -> int:
    """Erase ops whose results are all unused, last to first (ops are pure); return how many."""
    erased = 0
    for op in reversed(list(block.ops)):
        if op.name in TERMINATORS:
            continue
        for region in op.regions:
            for inner in region.blocks:
                erased += erase_dead_ops(inner)
        if op.results and not any(r.uses for r in op.results):
            op.erase()
            erased += 1
    return erased


def prune_weights(module: Module) -> int:
    """Drop module weights that no `graph.constant` references any more; return how many."""
    used = {op.attributes.get("weight") for op in module.walk() if op.name == "graph.constant"}
    dead = [name for name in module.weights if name not in used]
    for name in dead:
        del module.weights[name]
    return len(dead)


@register_pass("dce")
@dataclass(frozen=True)
class DeadCodeElimination(ModulePass):
    """Remove ops whose results nobody uses, and weights nobody references."""

    def run(self, module: Module, ctx: PassContext) -> None:
        ctx.count("ops-removed", erase_dead_ops(module.body))
        ctx.count("weights-removed", prune_weights(module))


def _cse_key(op: Operation) -> tuple | None:
    if op.regions or op.name in TERMINATORS or not op.results:
        return None
    try:  # the exact text, so that e.g. 0.0 and -0.0 stay apart (they compare equal)
        attrs = tuple((k, format_attr(v)) for k, v in sorted(op.attributes.items()))
    except TypeError:  # an attribute with no text form: leave the op alone
        return None
    types = tuple(str(r.type) for r in op.results)
    return (op.name, tuple(id(v) for v in op.operands), attrs, types)


def eliminate_common_subexpressions(block: Block) -> int:
    """Replace each op by an earlier identical one (same kind, operands, attributes, types)."""
    seen: dict[tuple, Operation] = {}
    removed = 0
    for op in list(block.ops):
        for region in op.regions:
            for inner in region.blocks:
                removed += eliminate_common_subexpressions(inner)
        key = _cse_key(op)
        if key is None:
            continue
        earlier = seen.setdefault(key, op)
        if earlier is op:
            continue
        for old, new in zip(op.results, earlier.results, strict=True):
            old.replace_all_uses_with(new)
        op.erase()
        removed += 1
    return removed


@register_pass("cse")
@dataclass(frozen=True)
class CommonSubexpressionElimination(ModulePass):
    """Merge identical ops (graph ops are pure), e.g. a weight loaded twice."""

    def run(self, module: Module, ctx: PassContext) -> None:
        ctx.count("ops-removed", eliminate_common_subexpressions(module.body))
