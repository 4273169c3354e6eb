"""Layout: run conv2d, pooling and batch norm channels-last (NHWC) and cancel the transposes.

Each NCHW op is wrapped as permute(NCHW->NHWC) -> op{NHWC} -> permute(NHWC->NCHW); conv
weights are pre-packed to HWIO at compile time (a new weight, tagged `layout = "HWIO"`);
quantized convs (`quant.conv2d`) keep their flat [O, I*KH*KW] weight. Then permutes are sunk
through elementwise ops and merged, so that back-to-back convs see no layout shuffle: what is
left is one permute at the model input and at most one where a channels-last tensor meets a
layout-sensitive op (e.g. a flatten).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import PassError
from ..ir import Module, Operation, Trait, Value, ops_with
from ..ir.dialects import graph
from .canonicalize import (
    fold_constant_op,
    merge_permutes,
    merge_reshapes,
    permute_of_unit_dims_to_reshape,
    producer,
    remove_identity_permute,
    remove_noop,
)
from .cleanup import erase_dead_ops, prune_weights
from .manager import ModulePass, PassContext, register_pass
from .op_kinds import OpKind, classify
from .rewrite import PatternRewriter, apply_patterns, pattern

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
OIHW_TO_HWIO = (2, 3, 1, 0)


def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes `perm`."""
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def _packed_weight(rw: PatternRewriter, weight: Value) -> Value:
    """The conv weight in HWIO: a pre-packed module weight when it is a bound constant."""
    src = producer(weight)
    if src is None or src.name != "graph.constant" or src.weight not in rw.module.weights:
        return rw.value(graph.PermuteOp, weight, perm=OIHW_TO_HWIO)
    array = np.ascontiguousarray(np.transpose(rw.module.weights[src.weight], OIHW_TO_HWIO))
    name = f"{src.weight}:HWIO"
    existing = rw.module.weights.get(name)
    if existing is None or not np.array_equal(existing, array):  # a shared weight: packed once
        name = rw.add_weight(name, array)
    t = weight.type.with_shape(tuple(weight.type.shape[p] for p in OIHW_TO_HWIO))
    return rw.value(graph.ConstantOp, weight=name, layout="HWIO", result_types=[t])


@pattern(*ops_with(Trait.NCHW), graph.BatchNormOp)
def convert_to_nhwc(op: Operation, rw: PatternRewriter) -> bool:
    """op{NCHW}(x) -> permute(op{NHWC}(permute(x)))"""
    if op.name == "graph.batch_norm":
        if op.x.type.rank != 4 or op.axis % 4 != 1:
            return False
        attrs = dict(op.attributes, axis=3)
    elif op.layout != "NCHW":
        return False
    else:
        attrs = dict(op.attributes, layout="NHWC")
    operands = [rw.value(graph.PermuteOp, op.operands[0], perm=TO_NHWC)]
    if op.name == "graph.conv2d":
        operands.append(_packed_weight(rw, op.weight))
        operands += op.operands[2:]
    else:
        operands += op.operands[1:]
    inner = rw.value(type(op), *operands, **attrs)
    rw.replace_op(op, rw.value(graph.PermuteOp, inner, perm=TO_NCHW))
    return True


def _permuted(value: Value) -> tuple[Value, tuple[int, ...]] | None:
    op = producer(value)
    if op is None or op.name != "graph.permute":
        return None
    return op.x, tuple(op.perm)


@pattern()
def sink_permute_through_elementwise(op: Operation, rw: PatternRewriter) -> bool:
    """f(permute(a, p), permute(b, p), const) -> permute(f(a, b, const'), p)

    Only when every operand is permuted the same way or is a constant (its inverse permute
    folds away), and at least one permuted operand is computed: no permute is ever added on a
    computed value, and constants alone are left to constant folding.
    """
    if not op.name.startswith("graph.") or op.name in ("graph.expand", "graph.batch_norm") \
            or classify(op) > OpKind.BROADCAST:
        return False
    rank = op.result.type.rank
    plan = [_sinkable(value, rank) for value in op.operands]
    perms = {found[1] for found in plan if isinstance(found, tuple)}
    if None in plan or len(perms) != 1 or not any(
            isinstance(found, tuple) and _is_computed(found[0]) for found in plan):
        return False
    (perm,) = perms
    operands = []
    for value, found in zip(op.operands, plan, strict=True):
        if isinstance(found, tuple):
            operands.append(found[0])
            continue
        if value.type.rank < rank:
            shape = (1,) * (rank - value.type.rank) + tuple(value.type.shape)
            value = rw.value(graph.ReshapeOp, value, result_types=[value.type.with_shape(shape)])
        operands.append(rw.value(graph.PermuteOp, value, perm=inverse(perm)))
    inner = rw.value(type(op), *operands, **op.attributes)
    rw.replace_op(op, rw.value(graph.PermuteOp, inner, perm=perm))
    return True


def _sinkable(value: Value, rank: int) -> tuple[Value, tuple[int, ...]] | str | None:
    """(source, perm) for a permute back to NCHW, "const" for a constant, else None.

    Only the permutes this pass made are sunk (others would just multiply). A permute with
    other users stays for them; they sink it too in later sweeps.
    """
    found = _permuted(value)
    if found is not None and found[1] == TO_NCHW and rank == 4:
        return found
    src = producer(value)
    return "const" if src is not None and src.has(Trait.SOURCE) else None


def _is_computed(value: Value) -> bool:
    src = producer(value)
    return src is None or not src.has(Trait.SOURCE)


@pattern("graph.pad", "graph.slice")
def sink_permute_through_pad_or_slice(op: Operation, rw: PatternRewriter) -> bool:
    """pad(permute(x, p)) -> permute(pad'(x), p), pads moved to x's axes (same for slice)."""
    found = _permuted(op.x)
    if found is None or len(op.x.users) != 1 or found[1] != TO_NCHW:
        return False
    x, perm = found
    if op.name == "graph.pad":
        pads = [0] * len(op.pads)
        for i, p in enumerate(perm):
            pads[2 * p], pads[2 * p + 1] = op.pads[2 * i], op.pads[2 * i + 1]
        inner = rw.value(graph.PadOp, x, pads=tuple(pads), value=op.value)
    else:
        axis = perm[op.axis % len(perm)]
        inner = rw.value(graph.SliceOp, x, **dict(op.attributes, axis=axis))
    rw.replace_op(op, rw.value(graph.PermuteOp, inner, perm=perm))
    return True


LAYOUT_PATTERNS = (convert_to_nhwc, sink_permute_through_elementwise,
                   sink_permute_through_pad_or_slice, fold_constant_op,
                   merge_permutes, remove_identity_permute, permute_of_unit_dims_to_reshape,
                   merge_reshapes, remove_noop)


@register_pass("layout")
@dataclass(frozen=True)
class Layout(ModulePass):
    """Choose data layouts: `conv=nhwc` runs convs, pools and batch norms channels-last."""

    conv: Literal["nchw", "nhwc"] = "nhwc"

    def run(self, module: Module, ctx: PassContext) -> None:
        if self.conv == "nchw":
            return
        fused = [op for op in module.ops if op.name == "kernel.fused"
                 and any(inner.has(Trait.NCHW) or isinstance(inner, graph.BatchNormOp)
                         for inner in op.walk())]
        if fused:
            raise PassError(f"layout must run before fuse: kernel '{fused[0].kernel_name}' "
                            "already holds a conv/pool/batch norm, and layouts cannot change "
                            "across kernel boundaries; put layout{conv=nhwc} before fuse in "
                            "the pipeline")
        if any(op.name == "kernel.fused" for op in module.ops):
            ctx.remark("already fused and no kernel holds a conv, pool or batch norm: "
                       "nothing to lay out")
            return
        fired = apply_patterns(module, LAYOUT_PATTERNS, before_sweep=erase_dead_ops)
        for name, n in fired.items():
            ctx.count(name, n)
        erase_dead_ops(module.body)
        prune_weights(module)
        ctx.count("permutes-left", sum(op.name == "graph.permute" for op in module.walk()))
