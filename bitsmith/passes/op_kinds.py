"""How graph ops fuse: each op's pattern kind (TVM's OpPatternKind, in our words)."""
from __future__ import annotations

from enum import IntEnum

from ..ir import Operation
from ..ir.dialects import graph
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


_ELEMENTWISE = {cls.name for cls in graph.UNARY_OPS.values()} | {
    cls.name for cls in graph.BINARY_OPS.values()} | {
    "graph.gelu", "graph.clamp", "graph.cast", "graph.where"}
_BROADCAST = {"graph.batch_norm", "graph.expand"}
_INJECTIVE = {"graph.reshape", "graph.permute", "graph.slice", "graph.concat", "graph.split",
              "graph.pad", "graph.full", "graph.arange", "graph.gather", "graph.index_select",
              "graph.index", "graph.embedding", "quant.dequantize"}
_REDUCTION = {"graph.reduce_sum", "graph.reduce_mean", "graph.reduce_max", "graph.reduce_min",
              "graph.reduce_prod", "graph.reduce_all", "graph.reduce_any", "graph.argmax",
              "graph.argmin", "graph.softmax", "graph.log_softmax", "graph.layer_norm",
              "graph.rms_norm"}
ANCHORS = {"graph.matmul": "matmul", "graph.linear": "matmul", "graph.conv2d": "conv",
           "graph.max_pool2d": "pool", "graph.avg_pool2d": "pool",
           "graph.adaptive_avg_pool2d": "pool", "graph.attention": "attention",
           "quant.linear": "matmul", "quant.conv2d": "conv"}


def classify(op: Operation) -> OpKind:
    """The fusion class of a graph op (unknown ops are opaque)."""
    if op.name in _ELEMENTWISE:
        out = op.results[0].type.shape
        same = all(len(v.type.shape) == len(out) and all(
            format_dim(a) == format_dim(b) for a, b in zip(v.type.shape, out, strict=True))
            for v in op.operands)
        return OpKind.ELEMENTWISE if same else OpKind.BROADCAST
    if op.name in _BROADCAST:
        return OpKind.BROADCAST
    if op.name in _INJECTIVE:
        return OpKind.INJECTIVE
    if op.name in _REDUCTION:
        return OpKind.REDUCTION
    if op.name in ANCHORS:
        return OpKind.OUT_FUSABLE
    return OpKind.OPAQUE


def reduction_signature(op: Operation) -> tuple[str, tuple[int, ...]]:
    """(input shape, reduced axes): reductions fuse together only when these agree."""
    x = op.operands[0].type
    rank = x.rank
    if op.name in ("graph.layer_norm", "graph.rms_norm"):
        axes = tuple(range(rank - op.ndim, rank))
    elif "axis" in op.ATTRS:
        axes = (normalize_axis(op.axis, rank),)
    else:
        axes = tuple(sorted(normalize_axis(a, rank) for a in op.axes)) or tuple(range(rank))
    return "x".join(format_dim(d) for d in x.shape), axes
