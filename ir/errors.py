"""Errors raised by the IR: each says what is wrong, where, expected vs got."""
from __future__ import annotations


class IRError(Exception):
    """Base class of the IR's errors."""


class VerifyError(IRError):
    """An op or module breaks an IR rule."""

    def __init__(self, op: object, message: str) -> None:
        self.op = op
        where = _describe(op)
        super().__init__(f"{where}: {message}" if where else message)


class ParseError(IRError):
    """Text that is not valid IR; carries line and column (1-based)."""

    def __init__(self, line: int, col: int, message: str, source_line: str = "") -> None:
        self.line, self.col, self.reason = line, col, message
        text = f"{line}:{col}: {message}"
        if source_line:
            text += f"\n  {source_line}\n  {' ' * (col - 1)}^"
        super().__init__(text)


class InterpretError(IRError):
    """The reference interpreter could not run a module (bad inputs, missing weights)."""


def _describe(op: object) -> str:
    name = getattr(op, "name", None)
    if name is None:
        return ""
    loc = getattr(op, "loc", None)
    return f"'{name}' op" + (f" at {loc}" if loc else "")
