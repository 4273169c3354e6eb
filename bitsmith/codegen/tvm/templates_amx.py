"""Linear layers and convolutions on the AMX tile unit, in bf16 (`dense_bf16_amx`,
`conv_gemm_bf16_amx`) or int8 (`dense_int8_amx`, `conv_gemm_int8_amx`), for kernels that
`compile(precision=...)` marked (`kernel.fused {precision = "bf16"}` or `"int8"`).

The contraction is `amx.gemm` (bf16: x rounded to bf16 by the kernel, the weight packed to
bf16 panels at compile time, f32 accumulation; int8: each row of x quantized by the kernel on
its own scale, the weight per output channel at compile time, int32 accumulation scaled once)
as a `te.extern` writing a padded f32 tile buffer; the rest of the kernel (bias, activation,
residual, reshapes) is the generic lowering reading it, scheduled like any elementwise block.
Static shapes only; a host without the AMX flavour never gets these kernels (`compile` keeps
such models in f32 and says so).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te, topi

from ...ir import Operation
from ...ir.dialects.graph import Conv2dOp, LinearOp, MatmulOp
from ...ir.dialects.kernel import FusedOp
from ..template import Config, Knob, KnobSpace, Problem, Target, register_template
from .amx import (
    BLOCK,
    KINDS,
    flatten,
    gemm,
    gemm_extern,
    has_amx,
    pack_bf16_panels,
    pack_int8_panels,
    unflatten,
)
from .lower import Lowering, lower_kernel
from .schedule import auto_schedule, inline_injective, root_blocks
from .target import vector_lanes
from .templates import (
    ConvGemm,
    Dense,
    TvmKernel,
    TvmTemplate,
    as_matrix,
    padded_input,
    pointwise_conv,
)
from .typed import compute, shape_of


def amx_default(problem: Problem, target: Target) -> Config:
    """Panel-major work items of every row, unless there are fewer panels than twice the
    cores: then row groups small enough for that many items."""
    panels = -(-int(problem["N"]) // BLOCK)
    blocks = -(-int(problem["M"]) // BLOCK)
    group = 0
    if panels < 2 * target.cores:
        most = max(1, blocks * panels // (2 * target.cores))
        group = max(g for g in (1, 2, 4, 8) if g <= most)
    return Config({"ORDER": "nm", "ROW_GROUP": group})


PACKS = {"bf16": pack_bf16_panels, "int8": pack_int8_panels}
"""How each AMX flavour packs a weight [N, K] (transposed) or [K, N]."""


class _Amx(TvmTemplate):
    """What the AMX templates share: kernels of static rows in `precision` ("bf16" or
    "int8", `amx.KINDS`), work-item knobs."""

    space = KnobSpace(Knob("ORDER", ("nm", "mn")), Knob("ROW_GROUP", (0, 1, 2, 4, 8)))
    """ROW_GROUP: blocks of 32 rows per work item (0: every row)."""
    precision = "bf16"

    def match(self, op: Operation) -> Problem | None:
        problem = super().match(op)
        if problem is None or not str(problem["M"]).isdigit():
            return None  # static rows only
        return problem

    def valid(self, problem: Problem, config: Config) -> bool:
        return True

    def default_config(self, problem: Problem, target: Target) -> Config:
        return amx_default(problem, target)

    def check_target(self, target: Target) -> None:
        if not has_amx(target, self.precision):
            raise ValueError(f"{self.name} needs a CPU with AMX ({self.precision}); the target "
                             f"has {', '.join(target.isa) or 'no extensions'}")

    def packed(self, problem: Problem) -> te.Tensor:
        """The weight's placeholder: `amx.PACKS`' panels (bf16: bits in [N/32, K/2, 32, 2];
        int8: codes in [N/32, K/4 + 1, 32, 4], the last row the column scales)."""
        kind = KINDS[self.precision]
        k = -(-int(problem["K"]) // kind.step) * kind.step
        rows = k // kind.group + (1 if self.precision == "int8" else 0)
        return te.placeholder((-(-int(problem["N"]) // BLOCK), rows, BLOCK, kind.group),
                              kind.storage, name="packed")

    def pack(self, matrix: Any, transposed: bool) -> tuple[str, Any]:
        """The weight's packing: its layout name and function (of the stored weight)."""
        fn = PACKS[self.precision]
        return f"amx_{self.precision}_panels", lambda w: fn(matrix(w), transposed)

    def fused(self, problem: Problem, config: Config, anchor: Operation, packed: te.Tensor,
              pack: tuple[str, Any]) -> TvmKernel | None:
        """The kernel as one AMX GEMM whose epilogue (bias, activation, residual, reshapes)
        runs on each 32 x 32 block of sums while it is in L1 (`amx.gemm`'s `store`); None
        when the kernel is not of that shape (x not a kernel input, more than one output,
        an epilogue that does not inline into one elementwise block reading the sum of its
        own element): the caller then builds it unfused."""
        kernel: FusedOp = problem.kernel_op
        m, n, w_index = int(problem["M"]), int(problem["N"]), int(problem["w_index"])
        acc = te.placeholder((-(-m // BLOCK) * BLOCK, -(-n // BLOCK) * BLOCK), "float32",
                             name="amx_acc")
        seen: dict[str, te.Tensor] = {}

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            seen["x"] = x = args[0]
            return _dense_rows(acc, x, n, args[2] if len(args) > 2 else None)
        func, inputs, outputs = lower_kernel(kernel, rules={anchor: rule},
                                             placeholders={w_index: packed}, extra=[acc])
        x_index = next((i for i, t in enumerate(inputs) if t.same_as(seen.get("x"))), None)
        if len(outputs) != 1 or x_index is None or x_index == w_index or \
                outputs[0].dtype != "float32":
            return None  # (the fused function writes f32: a cast epilogue stays unfused)
        sch = s_tir.Schedule(func)
        inline_injective(sch)
        blocks = root_blocks(sch)
        if len(blocks) != 1:
            return None
        params = list(sch.mod["main"].params)  # [acc, *inputs, out]: buffers
        # the GEMM's own operands are the AMX function's parameters: an epilogue reading
        # them (a residual of x itself) stays unfused
        epilogue = _elementwise_epilogue(sch.get(blocks[0]), params[0], params[-1], (m, n),
                                         (params[1 + x_index], params[1 + w_index]))
        if epilogue is None:
            return None
        main: Any = gemm(self.precision, tuple(shape_of(inputs[x_index])), n,
                         str(config["ORDER"]), tuple(shape_of(packed)),
                         row_group=int(config["ROW_GROUP"]),
                         store=(tuple(params[-1].shape), epilogue))
        x_buf, w_buf, out_buf = main.params
        own = [x_buf if i == x_index else w_buf if i == w_index else params[1 + i]
               for i in range(len(inputs))]
        func = tvm.tirx.PrimFunc([*own, out_buf], main.body, attrs=main.attrs)
        return TvmKernel(func, self.name, config, packs={w_index: pack},
                         isa=(f"amx_{self.precision}", "amx_tile"))

    def finish(self, problem: Problem, config: Config, target: Target, anchor: Operation,
               rule: Any, packed: te.Tensor, pack: tuple[str, Any]) -> TvmKernel:
        """The kernel with `rule` lowering its anchor: the AMX GEMM an opaque block, the rest
        (view, bias, epilogue) scheduled as elementwise blocks."""
        w_index = int(problem["w_index"])
        func, _, _ = lower_kernel(problem.kernel_op, rules={anchor: rule},
                                  placeholders={w_index: packed})
        sch = s_tir.Schedule(func)
        auto_schedule(sch, lanes=vector_lanes(target), cores=target.cores, keep={"amx_gemm"})
        return TvmKernel(sch.mod["main"], self.name, config, packs={w_index: pack},
                         isa=(f"amx_{self.precision}", "amx_tile"))


def _is_load(expr: Any, buffer: Any = None) -> bool:
    """Whether `expr` is a buffer read (of `buffer`, if given): TVM 0.27's `TensorLoad`,
    whose source is the buffer (a buffer is a Var)."""
    return isinstance(expr, tvm.ir.TensorLoad) and (buffer is None
                                                    or expr.source.same_as(buffer))


def _rebuild(expr: Any, swap: Callable[[Any], Any]) -> Any:
    """A TIR expression with every node for which `swap` returns something replaced by it
    (TVM 0.27 keeps its expression mutators out of Python). ValueError for a node kind it
    does not know."""
    done = swap(expr)
    if done is not None:
        return done
    again = lambda e: _rebuild(e, swap)  # noqa: E731
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
    if _is_load(expr):
        return tvm.tirx.BufferLoad(expr.source, [again(i) for i in expr.indices])
    if isinstance(expr, tvm.ir.Call):
        return tvm.ir.Call(expr.op, [again(a) for a in expr.args], expr.attrs, expr.ty_args,
                           ret_ty=expr.ty)
    raise ValueError(f"an epilogue node the AMX fusion does not rebuild: {kind.__name__}")


def _loads_of(expr: Any) -> list[Any]:
    """Every buffer read in `expr` (ValueError, as `_rebuild`, for a node it does not know)."""
    found: list[Any] = []
    _rebuild(expr, lambda e: found.append(e) if _is_load(e) else None)
    return found


def _dense_rows(acc: Any, x: te.Tensor, n: int, bias: te.Tensor | None) -> te.Tensor:
    """The GEMM's rows `acc` (x's leading dims flattened) as the layer's output [..., n],
    plus its bias."""
    lead = [int(d) for d in shape_of(x)[:-1]]
    out = compute([*lead, n], lambda *i: acc[flatten(i, lead), i[-1]], name="dense_rows")
    return topi.add(out, bias) if bias is not None else out


def _elementwise_epilogue(block: Any, acc: Any, out: Any, gemm_shape: tuple[int, int],
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
        every = _loads_of(body.value)
        if any(_is_load(e, buffer) for e in every for buffer in unread):
            return None
        loads = [e for e in every if _is_load(e, acc)]
        for load in loads:  # every read of the sums is of this element's own sum
            r, c = (_rebuild(i, at(unflatten(row_v, lead, col_v))) for i in load.indices)
            if not (analyzer.can_prove_equal(r, row_v) and analyzer.can_prove_equal(c, col_v)):
                return None
    except ValueError:
        return None

    def store(buf: Any, value: Any, row: Any, col: Any) -> Any:
        index = unflatten(row, lead, col)
        swap = at(index)
        expr = _rebuild(body.value, lambda e: value if _is_load(e, acc) else swap(e))
        return tvm.tirx.BufferStore(buf, expr, index)
    return store


@register_template
class DenseBf16Amx(_Amx, Dense):
    """out = epilogue(bf16(x) @ bf16(W)^T (+ bias)), f32 accumulation, on AMX tiles."""

    name = "dense_bf16_amx"
    version = 2

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        self.check_target(target)
        kernel: FusedOp = problem.kernel_op
        anchor = next(o for o in kernel.body_ops
                      if isinstance(o, (LinearOp, MatmulOp)) or pointwise_conv(o))
        n = int(problem["N"])
        packed = self.packed(problem)
        order, group = str(config["ORDER"]), int(config["ROW_GROUP"])
        pack = self.pack(as_matrix, bool(problem["transposed"]))
        fused = self.fused(problem, config, anchor, packed, pack)
        if fused is not None:
            return fused

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            acc = gemm_extern(self.precision, args[0], packed, n, order, row_group=group)
            return _dense_rows(acc, args[0], n, args[2] if len(args) > 2 else None)
        return self.finish(problem, config, target, anchor, rule, packed, pack)


@register_template
class ConvGemmBf16Amx(_Amx, ConvGemm):
    """An NHWC convolution as an implicit GEMM on AMX tiles: the kernel gathers each output
    pixel's window (kernel rows, columns, input channels) from the padded input into bf16
    rows, then runs `amx.gemm_bf16`; f32 accumulation."""

    name = "conv_gemm_bf16_amx"
    version = 1

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        self.check_target(target)
        kernel: FusedOp = problem.kernel_op
        conv = next(o for o in kernel.body_ops if isinstance(o, Conv2dOp))
        n = int(problem["N"])
        kh, kw, cin, _ = (int(d) for d in conv.operands[1].type.shape)
        (sh, sw), (dh, dw) = conv.stride, conv.dilation
        packed = self.packed(problem)
        order, group = str(config["ORDER"]), int(config["ROW_GROUP"])

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            xp = padded_input(args[0], op)
            batch, oh, ow = (int(d) for d in op.result.type.shape[:3])

            def window(xb: Any, i: Any, g: Any, ic: Any) -> Any:  # pixel i, kernel position g
                pix = i % (oh * ow)
                return xb[i // (oh * ow), pix // ow * sh + g // kw * dh,
                          pix % ow * sw + g % kw * dw, ic]
            acc = gemm_extern(self.precision, xp, packed, n, order,
                                   rows=(batch * oh * ow, kh * kw, cin, window),
                                   row_group=group)
            out = compute(lo.shape(op.result.type),
                          lambda b, y, xx, c: acc[(b * oh + y) * ow + xx, c], name="dense_rows")
            if len(args) > 2:
                out = topi.add(out, args[2])
            return out
        return self.finish(problem, config, target, conv, rule, packed,
                           self.pack(lambda w: w.reshape(-1, w.shape[-1]), False))


@register_template
class DenseInt8Amx(DenseBf16Amx):
    """out = epilogue(dequant(int8(x) @ int8(W)^T) (+ bias)): each row of x on its own
    scale (dynamic, per token), W per output channel, int32 sums, on AMX tiles."""

    name = "dense_int8_amx"
    version = 1
    precision = "int8"


@register_template
class ConvGemmInt8Amx(ConvGemmBf16Amx):
    """An NHWC convolution as an implicit GEMM on AMX tiles in int8: each output pixel's
    window quantized on its own scale, the weight per output channel, int32 sums."""

    name = "conv_gemm_int8_amx"
    version = 1
    precision = "int8"


PRECISIONS = ("f32", "bf16", "int8")
"""What `compile(precision=)` takes."""

TEMPLATES = {"bf16": (DenseBf16Amx(), ConvGemmBf16Amx()),
             "int8": (DenseInt8Amx(), ConvGemmInt8Amx())}


def mark_precision(kernels: list[FusedOp], target: Target,
                   precision: str) -> tuple[list[str], str | None]:
    """Mark every kernel an AMX template of `precision` ("bf16" or "int8") computes (a linear
    layer, a matmul against a weight or an NHWC convolution, static shapes)
    `precision = ...`; the names marked, and a one-line note when this CPU cannot run them
    (nothing is marked: the model stays f32)."""
    if not has_amx(target, precision):
        unit = "AMX-BF16" if precision == "bf16" else "AMX-INT8"
        return [], (f"precision={precision!r}: this CPU has no {unit} tile unit, so every "
                    "kernel stays f32")
    marked = []
    for op in kernels:
        if op.attributes.get("precision") is not None:
            continue
        op.attributes["precision"] = precision
        if all(t.match(op) is None for t in TEMPLATES[precision]):
            del op.attributes["precision"]
            continue
        marked.append(op.kernel_name)
    return marked, None
