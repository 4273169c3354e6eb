"""Symbolic dims of an execution plan ("B", "(16*B)") evaluated under the inputs' bindings;
shared by the CPU and the Triton executors (and free of TVM and torch).

A dim expression is read with Python's `ast` (never evaluated as code): integer literals,
symbol names, + - * and //, parentheses; at most MAX_DIM_TEXT characters. Anything else, a
division by zero or a value outside [0, MAX_DIM] is an ArtifactError.
"""
from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping

from .artifact import ArtifactError

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv}
MAX_DIM_TEXT = 256
MAX_DIM = 2**62


def dim_symbols(dim: object) -> set[str]:
    """The symbols a dim uses (checking that it is a well-formed dim expression)."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        if not 0 <= dim < MAX_DIM:
            raise ArtifactError(f"dim {dim} is outside [0, 2**62)")
        return set()
    names: set[str] = set()
    _walk(_parse(dim), None, str(dim), names)
    return names


def eval_dim(dim: int | str, bindings: Mapping[str, int]) -> int:
    """An int dim, or the value of a dim expression such as "B" or "(16*B)" under `bindings`."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        return dim

    def bound(name: str) -> int:
        if name not in bindings:
            raise ArtifactError(f"dim {dim!r} uses symbol {name}, which no input binds")
        return bindings[name]
    value = _walk(_parse(dim), bound, str(dim), set())
    if not 0 <= value < MAX_DIM:
        raise ArtifactError(f"dim {dim!r} is {value} under {dict(bindings)}, outside "
                            "[0, 2**62); the plan is damaged, recompile the model")
    return value


def _parse(dim: object) -> ast.expr:
    if not isinstance(dim, str) or not 0 < len(dim) <= MAX_DIM_TEXT:
        raise ArtifactError(f"dim {str(dim)[:60]!r} must be an int or an expression of at most "
                            f"{MAX_DIM_TEXT} characters")
    try:
        return ast.parse(dim, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ArtifactError(f"dim {dim[:60]!r} is not an integer expression over "
                            "symbols") from None


def _walk(node: ast.AST, value_of: Callable[[str], int] | None, text: str, names: set[str],
          depth: int = 0) -> int:
    """The expression's value with symbols valued by `value_of`; without it, only check the
    expression and collect its symbols into `names` (the value is then meaningless)."""
    if depth > 64:
        raise ArtifactError(f"dim {text[:60]!r} nests too deeply")
    if (isinstance(node, ast.Constant) and isinstance(node.value, int)
            and not isinstance(node.value, bool) and 0 <= node.value < MAX_DIM):
        return node.value
    if isinstance(node, ast.Name):
        names.add(node.id)
        return value_of(node.id) if value_of is not None else 1
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left = _walk(node.left, value_of, text, names, depth + 1)
        right = _walk(node.right, value_of, text, names, depth + 1)
        if value_of is None:
            return 1
        if isinstance(node.op, ast.FloorDiv) and right == 0:
            raise ArtifactError(f"dim {text[:60]!r} divides by zero")
        value = _OPS[type(node.op)](left, right)
        if abs(value) >= MAX_DIM * MAX_DIM:
            raise ArtifactError(f"dim {text[:60]!r} is out of range")
        return value
    raise ArtifactError(f"dim {text[:60]!r} is not an integer expression over symbols")
