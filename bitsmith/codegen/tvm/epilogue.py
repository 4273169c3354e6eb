"""A GEMM's elementwise epilogue (bias, activation, residual, reshapes) fused into the GEMM
kernel's own loop: the kernel is lowered with its contraction replaced by a placeholder of the
sums, inlined into one elementwise block, checked to read only its own element's sum, and
turned into `store(out, value, row, column)`, the statement writing the output of one GEMM
element (`amx.gemm`'s `store`, `qdense_i8`'s `put`).

TVM 0.27 keeps its TIR expression mutators out of Python, so `rebuild` rebuilds an expression
node by node; a node kind it does not know makes the epilogue unfusable (None), never wrong.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te, topi

from ...ir import Operation
from ...ir.dialects import quant
from ...ir.dialects.kernel import FusedOp
from .amx import flatten, unflatten
from .lower import Lowering, compute, lower_kernel, shape_of
from .schedule import inline_injective, root_blocks

Put = Callable[[Any, Any, Any, Any], Any]
"""put(out, value, row, column) -> the TIR statement storing the output of that GEMM element."""


@dataclass
class Epilogue:
    """A kernel's epilogue as `put`, with the lowered function's parameters (the kernel's
    inputs in order, then its output) and the index of the GEMM's left operand."""

    put: Put
    inputs: list[Any]
    out: Any
    x_index: int


def gemm_epilogue(kernel: FusedOp, anchor: Operation, m: int, n: int, *,
                  acc_shape: tuple[int, int], placeholders: Mapping[int, te.Tensor],
                  operands: tuple[int, ...]) -> Epilogue | None:
    """The epilogue of `kernel`, whose `anchor` computes an (m, n) GEMM of x (its first
    argument, rows: leading dims flattened) with a weight (its input `operands` besides x:
    an epilogue reading them or x is not fused); the sums are read from an f32 buffer of
    `acc_shape` (a padded tile buffer may be larger). None when the kernel is not one
    elementwise block of its own element's sum with a single f32 output."""
    acc = te.placeholder(acc_shape, "float32", name="gemm_acc")
    seen: dict[str, te.Tensor] = {}

    def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
        seen["x"] = x = args[0]
        # a linear layer's or 1x1 convolution's bias; a quantized layer's third operand is
        # its scales
        bias = args[2] if not isinstance(op, quant.LinearOp) and len(args) > 2 else None
        return dense_rows(acc, x, n, bias)
    func, inputs, outputs = lower_kernel(kernel, rules={anchor: rule},
                                         placeholders=placeholders, extra=[acc])
    x_index = next((i for i, t in enumerate(inputs) if t.same_as(seen.get("x"))), None)
    if len(outputs) != 1 or x_index is None or x_index in operands or \
            outputs[0].dtype != "float32":
        return None  # (the fused function writes f32: a cast epilogue stays unfused)
    sch = s_tir.Schedule(func)
    inline_injective(sch)
    blocks = root_blocks(sch)
    if len(blocks) != 1:
        return None
    params = list(sch.mod["main"].params)  # [acc, *inputs, out]: buffers
    unread = tuple(params[1 + i] for i in (x_index, *operands))
    put = elementwise_epilogue(sch.get(blocks[0]), params[0], params[-1], (m, n), unread)
    if put is None:
        return None
    return Epilogue(put, params[1:-1], params[-1], x_index)


def is_load(expr: Any, buffer: Any = None) -> bool:
    """Whether `expr` is a buffer read (of `buffer`, if given): TVM 0.27's `TensorLoad`,
    whose source is the buffer (a buffer is a Var)."""
    return isinstance(expr, tvm.ir.TensorLoad) and (buffer is None
                                                    or expr.source.same_as(buffer))


def rebuild(expr: Any, swap: Callable[[Any], Any]) -> Any:
    """A TIR expression with every node for which `swap` returns something replaced by it
    (TVM 0.27 keeps its expression mutators out of Python). ValueError for a node kind it
    does not know."""
    done = swap(expr)
    if done is not None:
        return done
    again = lambda e: rebuild(e, swap)  # noqa: E731
    kind = type(expr)
    if isinstance(expr, (tvm.tirx.Var, tvm.tirx.IntImm, tvm.tirx.FloatImm)) or \
            kind.__name__ == "StringImm":
        return expr
    if hasattr(expr, "a") and hasattr(expr, "b"):  # arithmetic, comparison, logic, bitwise
        return kind(again(expr.a), again(expr.b))
    if hasattr(expr, "a"):  # Not
        return kind(again(expr.a))
    if isinstance(expr, tvm.tirx.Select):
        return tvm.tirx.Select(again(expr.condition), again(expr.true_value),
                               again(expr.false_value))
    if isinstance(expr, tvm.tirx.Cast):
        return tvm.tirx.Cast(str(expr.ty), again(expr.value))
    if isinstance(expr, tvm.tirx.Let):
        return tvm.tirx.Let(expr.var, again(expr.value), again(expr.body))
    if is_load(expr):
        return tvm.tirx.BufferLoad(expr.source, [again(i) for i in expr.indices])
    if isinstance(expr, tvm.ir.Call):
        return tvm.ir.Call(expr.op, [again(a) for a in expr.args], expr.attrs, expr.ty_args,
                           ret_ty=expr.ty)
    raise ValueError(f"an epilogue node the AMX fusion does not rebuild: {kind.__name__}")


def loads_of(expr: Any) -> list[Any]:
    """Every buffer read in `expr` (ValueError, as `_rebuild`, for a node it does not know)."""
    found: list[Any] = []
    rebuild(expr, lambda e: found.append(e) if is_load(e) else None)
    return found


def dense_rows(acc: Any, x: te.Tensor, n: int, bias: te.Tensor | None) -> te.Tensor:
    """The GEMM's rows `acc` (x's leading dims flattened) as the layer's output [..., n],
    plus its bias."""
    lead = [int(d) for d in shape_of(x)[:-1]]
    out = compute([*lead, n], lambda *i: acc[flatten(i, lead), i[-1]], name="dense_rows")
    return topi.add(out, bias) if bias is not None else out


def elementwise_epilogue(block: Any, acc: Any, out: Any, gemm_shape: tuple[int, int],
                          unread: tuple[Any, ...] = ()) -> Any:
    """`store(out, value, row, col)` for `amx.gemm` from an inlined epilogue block that writes
    `out` at its own iteration point from reads of `acc` at that point's GEMM (row, column)
    (rows: the output's leading dims flattened, `gemm_shape` (m, n) in all) and of no buffer
    in `unread`; None when the block is not that."""
    body = block.body
    ivars = [iv.var for iv in block.iter_vars]
    if not isinstance(body, tvm.tirx.BufferStore) or not body.buffer.same_as(out) or \
            len(body.indices) != len(ivars) or block.init is not None or \
            any(not i.same_as(v) for i, v in zip(body.indices, ivars, strict=True)):
        return None
    lead = [int(d) for d in out.shape[:-1]]
    if (int(np.prod(lead)), int(out.shape[-1])) != gemm_shape:
        return None  # the output is not the GEMM's rows and columns

    def at(index: list[Any]) -> Callable[[Any], Any]:
        mapping = dict(zip(ivars, index, strict=True))
        return lambda e: next((v for k, v in mapping.items() if k.same_as(e)), None) \
            if isinstance(e, tvm.tirx.Var) else None
    row_v, col_v = tvm.tirx.Var("row", "int32"), tvm.tirx.Var("col", "int32")
    analyzer = tvm.sym.Analyzer()
    const = tvm.tirx.const
    analyzer.bind(row_v, tvm.ir.Range.from_min_extent(const(0), const(max(1, int(np.prod(lead))))))
    analyzer.bind(col_v, tvm.ir.Range.from_min_extent(const(0), const(int(out.shape[-1]))))
    try:
        every = loads_of(body.value)
        if any(is_load(e, buffer) for e in every for buffer in unread):
            return None
        loads = [e for e in every if is_load(e, acc)]
        for load in loads:  # every read of the sums is of this element's own sum
            r, c = (rebuild(i, at(unflatten(row_v, lead, col_v))) for i in load.indices)
            if not (analyzer.can_prove_equal(r, row_v) and analyzer.can_prove_equal(c, col_v)):
                return None
    except ValueError:
        return None

    def store(buf: Any, value: Any, row: Any, col: Any) -> Any:
        index = unflatten(row, lead, col)
        swap = at(index)
        expr = rebuild(body.value, lambda e: value if is_load(e, acc) else swap(e))
        return tvm.tirx.BufferStore(buf, expr, index)
    return store

