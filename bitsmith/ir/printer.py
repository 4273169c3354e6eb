"""The MLIR-like generic text form. print -> parse -> print gives identical text."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from .attributes import format_attr
from .core import Block, Operation, Value

if TYPE_CHECKING:
    from .module import Module

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Namer:
    """Gives every value a unique `%name`: hints for inputs, numbers for results."""

    def __init__(self, anonymous: bool = False) -> None:
        self.names: dict[Value, str] = {}
        self.used: set[str] = set()
        self.counter = 0
        self.arg_counter = 0
        self.anonymous = anonymous

    def name_arg(self, value: Value) -> str:
        """Name a block argument after its hint when it has a usable one."""
        hint = value.name_hint
        if self.anonymous or not hint or not _IDENT.match(hint) or hint in self.used:
            hint = None
        if hint is None:
            while f"arg{self.arg_counter}" in self.used:
                self.arg_counter += 1
            hint = f"arg{self.arg_counter}"
        self.used.add(hint)
        self.names[value] = hint
        return hint

    def name_results(self, op: Operation) -> str:
        """Name an op's results `%N` (one) or `%N:k` (several, used as `%N#i`)."""
        if not op.results:
            return ""
        base = str(self.counter)
        self.counter += 1
        if len(op.results) == 1:
            self.names[op.results[0]] = base
            return f"%{base} = "
        for i, result in enumerate(op.results):
            self.names[result] = f"{base}#{i}"
        return f"%{base}:{len(op.results)} = "

    def __getitem__(self, value: Value) -> str:
        if value not in self.names:
            return "%<<UNKNOWN VALUE>>"
        return f"%{self.names[value]}"


def print_op(op: Operation, namer: Namer, indent: str, locations: bool = True) -> list[str]:
    """Lines of one op in generic form, regions included."""
    head = namer.name_results(op)
    operands = ", ".join(namer[v] for v in op.operands)
    text = f'{indent}{head}"{op.name}"({operands})'
    lines: list[str] = []
    if op.regions:
        lines.append(text + " (")
        for i, region in enumerate(op.regions):
            lines.append(f"{indent}  {{")
            for block in region.blocks:
                lines.extend(print_block(block, namer, indent + "    ", True, locations))
            lines.append(f"{indent}  }}" + ("," if i + 1 < len(op.regions) else ""))
        text = f"{indent})"
    shown = {k: v for k, v in op.attributes.items() if not _is_default_none(op, k, v)}
    if shown:
        items = ", ".join(f"{k} = {format_attr(v)}" for k, v in sorted(shown.items()))
        text += f" {{{items}}}"
    in_types = ", ".join(str(v.type) for v in op.operands)
    out_types = [str(r.type) for r in op.results]
    out = out_types[0] if len(out_types) == 1 else f"({', '.join(out_types)})"
    text += f" : ({in_types}) -> {out}"
    if locations and op.loc:
        text += f" loc({json.dumps(op.loc)})"
    lines.append(text)
    return lines


def _is_default_none(op: Operation, key: str, value: object) -> bool:
    """Absent optional attributes (None by default) are left out of the text."""
    spec = op.ATTRS.get(key)
    return value is None and spec is not None and spec.default is None


def print_block(block: Block, namer: Namer, indent: str, label: bool,
                locations: bool = True) -> list[str]:
    """Lines of a block; a labelled block lists its arguments first."""
    lines: list[str] = []
    if label:
        args = ", ".join(f"%{namer.name_arg(a)}: {a.type}" for a in block.args)
        lines.append(f"{indent[:-2]}^bb0({args}):")
    for op in block.ops:
        lines.extend(print_op(op, namer, indent, locations))
    return lines


def print_module(module: Module, *, anonymous: bool = False, locations: bool = True) -> str:
    """The module's text. `anonymous` drops input names (used by the structural hash)."""
    namer = Namer(anonymous)
    args = ", ".join(f"%{namer.name_arg(a)}: {a.type}" for a in module.body.args)
    outs = ", ".join(str(t) for t in module.output_types) if module.body.ops else ""
    lines = [f"module @{module.name} {{", f"  func.func @main({args}) -> ({outs}) {{"]
    lines.extend(print_block(module.body, namer, "    ", False, locations))
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"
