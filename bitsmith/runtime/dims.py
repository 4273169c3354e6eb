"""Symbolic dims of an execution plan ("B", "(16*B)") evaluated under the inputs' bindings;
shared by the CPU and the Triton executors (and free of TVM and torch)."""
from __future__ import annotations

import ast
import operator
from collections.abc import Mapping

from .artifact import ArtifactError

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv}


def eval_dim(dim: int | str, bindings: Mapping[str, int]) -> int:
    """An int dim, or the value of a dim expression such as "B" or "(16*B)" under `bindings`."""
    if isinstance(dim, int):
        return dim
    return _eval(ast.parse(dim, mode="eval").body, bindings, dim)


def _eval(node: ast.AST, bindings: Mapping[str, int], text: str) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in bindings:
            raise ArtifactError(f"dim {text!r} uses symbol {node.id}, which no input binds")
        return bindings[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, bindings, text),
                                   _eval(node.right, bindings, text))
    raise ArtifactError(f"dim {text!r} is not an integer expression over symbols")
