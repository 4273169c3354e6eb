"""Structural hashes of modules and regions: equal structure gives equal hash."""
from __future__ import annotations

import hashlib

from .core import Operation
from .module import Module
from .printer import Namer, print_module, print_op


def structural_hash(item: Module | Operation, *, locations: bool = False) -> str:
    """Hex sha256 of the canonical text with value names anonymized (locations ignored)."""
    if isinstance(item, Module):
        text = print_module(item, anonymous=True, locations=locations)
    else:
        namer = Namer(anonymous=True)
        for value in item.operands:
            namer.names.setdefault(value, f"in{len(namer.names)}")
        text = "\n".join(print_op(item, namer, "", locations))
    return hashlib.sha256(text.encode()).hexdigest()



def kernel_signature(op: Operation) -> str:
    """The structural hash of a `kernel.fused` op without its name: kernels with equal
    signatures compute the same function of their inputs (one compiled function serves
    all of them)."""
    name = op.attributes.get("name")
    op.attributes["name"] = ""
    try:
        return structural_hash(op)
    finally:
        op.attributes["name"] = name
