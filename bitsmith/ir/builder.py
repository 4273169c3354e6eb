"""IR builder (create ops at an insertion point) and rewriter (replace, erase) for passes."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import IRError
from .core import Block, Operation, OpT, Value


class Builder:
    """Creates ops at an insertion point: the end of a block, or just before an op."""

    def __init__(self, block: Block, before: Operation | None = None,
                 loc: str | None = None) -> None:
        self.block = block
        self.before = before
        self.loc = loc

    @classmethod
    def at_end(cls, block: Block, loc: str | None = None) -> Builder:
        """A builder appending to `block`."""
        return cls(block, None, loc)

    @classmethod
    def before_op(cls, op: Operation) -> Builder:
        """A builder inserting just before `op`, inheriting its location."""
        if op.parent is None:
            raise IRError(f"'{op.name}' is not in a block")
        return cls(op.parent, op, op.loc)

    def insert(self, op: OpT) -> OpT:
        """Insert an already-built op at the insertion point."""
        index = len(self.block.ops) if self.before is None else self.block.index(self.before)
        self.block.insert(index, op)
        return op

    def create(self, cls: type[OpT], *operands: Value | None, **kwargs: Any) -> OpT:
        """Build an op (types inferred) and insert it; returns the op."""
        kwargs.setdefault("loc", self.loc)
        return self.insert(cls.create(*operands, **kwargs))

    def value(self, cls: type[Operation], *operands: Value | None, **kwargs: Any) -> Value:
        """Like `create` for a single-result op; returns the result value."""
        return self.create(cls, *operands, **kwargs).result


class Rewriter(Builder):
    """A builder that also replaces and erases ops, recording whether anything changed."""

    def __init__(self, block: Block, before: Operation | None = None) -> None:
        super().__init__(block, before)
        self.changed = False

    def set_insertion_before(self, op: Operation) -> None:
        """Move the insertion point to just before `op` (and take its location)."""
        if op.parent is None:
            raise IRError(f"'{op.name}' is not in a block")
        self.block, self.before, self.loc = op.parent, op, op.loc

    def insert(self, op: OpT) -> OpT:
        self.changed = True
        return super().insert(op)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Point every use of `old` at `new`."""
        if old.type.rank != new.type.rank or old.type.dtype != new.type.dtype:
            raise IRError(f"cannot replace a value of type {old.type} by one of {new.type}")
        old.replace_all_uses_with(new)
        self.changed = True

    def replace_op(self, op: Operation, new_values: Sequence[Value] | Value) -> None:
        """Replace all uses of `op`'s results by `new_values`, then erase `op`."""
        values = [new_values] if isinstance(new_values, Value) else list(new_values)
        if len(values) != len(op.results):
            raise IRError(f"replacing '{op.name}' with {len(values)} value(s), "
                          f"it has {len(op.results)} result(s)")
        for result, value in zip(op.results, values, strict=True):
            self.replace_all_uses(result, value)
        self.erase_op(op)

    def erase_op(self, op: Operation) -> None:
        """Erase an op whose results are unused."""
        if self.before is op:
            index = self.block.index(op)
            self.before = self.block.ops[index + 1] if index + 1 < len(self.block.ops) else None
        op.erase()
        self.changed = True
