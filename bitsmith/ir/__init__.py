"""bitsmith's IR: types, ops, dialects, printer/parser, verifier, hash and the interpreter."""
from ..errors import InterpretError, IRError, ParseError, VerifyError
from . import dialects  # noqa: F401 - registers the func and graph dialects
from .attributes import DenseAttr
from .builder import Builder, Rewriter
from .core import (
    OP_REGISTRY,
    Anchor,
    Block,
    BlockArgument,
    Operation,
    OpResult,
    Region,
    Trait,
    Value,
    attr,
    ops_with,
    register_op,
)
from .core import dialects as list_dialects
from .dialects import graph
from .dtypes import DType, parse_dtype
from .hashing import structural_hash
from .interpreter import EvalContext, interpret, interpret_block
from .module import Module
from .parser import parse
from .printer import print_module
from .types import GroupAxis, QuantType, TensorType, ZeroPoint, symbol
from .verifier import verify

__all__ = [
    "Anchor", "Trait", "ops_with", "DenseAttr", "Builder", "Rewriter", "OP_REGISTRY", "Block",
    "BlockArgument", "Operation",
    "OpResult", "Region", "Value", "attr", "list_dialects", "register_op", "graph", "DType",
    "parse_dtype", "InterpretError", "IRError", "ParseError", "VerifyError",
    "structural_hash", "EvalContext", "interpret", "interpret_block", "Module", "parse",
    "print_module", "GroupAxis", "QuantType", "TensorType", "ZeroPoint", "symbol", "verify",
]
