"""How graph ops fuse: each op's pattern kind (TVM's OpPatternKind, in our words)."""
from __future__ import annotations

from enum import IntEnum

from ..ir import Operation, Trait
from ..ir.dialects.graph.nn import NormOp
from ..ir.shapes import normalize_axis
from ..ir.types import format_dim


class OpKind(IntEnum):
    """Fusion classes, ordered: a group's kind is the largest kind of its ops."""

    ELEMENTWISE = 0  # out[i] = f(in[i]), all shapes equal
    BROADCAST = 1  # elementwise with an operand broadcast (bias add, per-channel scale)
    INJECTIVE = 2  # each output element reads one input element (reshape, permute, gather)
    REDUCTION = 3  # reduces along axes (sum, softmax, layer norm)
    OUT_FUSABLE = 4  # matmul / conv / pool / attention: may absorb an elementwise epilogue
    OPAQUE = 5  # runs alone

    def __str__(self) -> str:
        return self.name.lower().replace("_", "-")


def classify(op: Operation) -> OpKind:
    """The fusion class of an op, from its traits (an op with none of them is opaque)."""
    if op.has(Trait.ELEMENTWISE):
        out = op.results[0].type.shape
        same = all(len(v.type.shape) == len(out) and all(
            format_dim(a) == format_dim(b) for a, b in zip(v.type.shape, out, strict=True))
            for v in op.operands)
        return OpKind.ELEMENTWISE if same else OpKind.BROADCAST
    if op.has(Trait.BROADCAST):
        return OpKind.BROADCAST
    if op.has(Trait.INJECTIVE):
        return OpKind.INJECTIVE
    if op.has(Trait.REDUCTION):
        return OpKind.REDUCTION
    if op.has(Trait.ANCHOR):
        return OpKind.OUT_FUSABLE
    return OpKind.OPAQUE


def anchor_kind(op: Operation) -> str:
    """The kernel kind an anchored group becomes: its anchor's kind, or 'reduction'."""
    return op.ANCHOR.value if op.ANCHOR is not None else "reduction"


def reduction_signature(op: Operation) -> tuple[str, tuple[int, ...]]:
    """(input shape, reduced axes): reductions fuse together only when these agree."""
    x = op.operands[0].type
    rank = x.rank
    if isinstance(op, NormOp):
        axes = tuple(range(rank - op.ndim, rank))
    elif "axis" in op.ATTRS:
        axes = (normalize_axis(op.axis, rank),)
    else:
        axes = tuple(sorted(normalize_axis(a, rank) for a in op.axes)) or tuple(range(rank))
    return "x".join(format_dim(d) for d in x.shape), axes
