"""`dense_bf16_amx`: a linear layer in bf16 on the AMX tile unit, for kernels that
`compile(precision="bf16")` marked (`kernel.fused {precision = "bf16"}`).

The contraction is `amx.gemm_bf16` (x rounded to bf16 by the kernel, the weight packed to bf16
panels at compile time, f32 accumulation) as a `te.extern` writing a padded f32 tile buffer;
the rest of the kernel (bias, activation, residual, reshapes) is the generic lowering reading
it, scheduled like any elementwise block. Static shapes only; a host without AMX-BF16 never
gets these kernels (`compile` keeps such models in f32 and says so).
"""
from __future__ import annotations

from typing import Any

import tvm
import tvm.s_tir as s_tir
from tvm import te, topi

from ...ir import Operation
from ...ir.dialects.graph import Conv2dOp, LinearOp, MatmulOp
from ...ir.dialects.kernel import FusedOp
from ..template import Config, Knob, KnobSpace, Problem, Target, register_template
from .amx import BLOCK, gemm_bf16_extern, has_amx_bf16, pack_bf16_panels
from .lower import Lowering, lower_kernel
from .schedule import auto_schedule
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
from .typed import compute


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


class _Amx(TvmTemplate):
    """What the AMX templates share: bf16 kernels of static rows, work-item knobs."""

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

    @staticmethod
    def packed(problem: Problem) -> te.Tensor:
        """The weight's placeholder: bf16 bits in [N/32, K/2, 32, 2] panels."""
        up = lambda v: -(-v // BLOCK) * BLOCK  # noqa: E731
        return te.placeholder((up(int(problem["N"])) // BLOCK, up(int(problem["K"])) // 2,
                               BLOCK, 2), "uint16", name="packed")

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
                         isa=("amx_bf16", "amx_tile"))


@register_template
class DenseBf16Amx(_Amx, Dense):
    """out = epilogue(bf16(x) @ bf16(W)^T (+ bias)), f32 accumulation, on AMX tiles."""

    name = "dense_bf16_amx"
    version = 1

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        if not has_amx_bf16(target):
            raise ValueError(f"{self.name} needs a CPU with AMX-BF16; the target has "
                             f"{', '.join(target.isa) or 'no extensions'}")
        kernel: FusedOp = problem.kernel_op
        anchor = next(o for o in kernel.body_ops
                      if isinstance(o, (LinearOp, MatmulOp)) or pointwise_conv(o))
        n = int(problem["N"])
        packed = self.packed(problem)
        order, group = str(config["ORDER"]), int(config["ROW_GROUP"])

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            x = args[0]
            lead = list(x.shape[:-1])
            trailing = [int(d) for d in lead[1:]]
            acc = gemm_bf16_extern(x, packed, n, order, row_group=group)

            def view(*i: Any) -> Any:
                row = i[0]
                for axis, d in zip(i[1:-1], trailing, strict=True):
                    row = row * d + axis
                return acc[row, i[-1]]
            out = compute(lead + [tvm.tirx.const(n, lo.index)], view, name="dense_rows")
            if len(args) > 2:  # a linear's or a conv's bias
                out = topi.add(out, args[2])
            return out
        transposed = bool(problem["transposed"])
        return self.finish(problem, config, target, anchor, rule, packed, (
            "amx_bf16_panels", lambda w: pack_bf16_panels(as_matrix(w), transposed)))


@register_template
class ConvGemmBf16Amx(_Amx, ConvGemm):
    """An NHWC convolution as an implicit GEMM on AMX tiles: the kernel gathers each output
    pixel's window (kernel rows, columns, input channels) from the padded input into bf16
    rows, then runs `amx.gemm_bf16`; f32 accumulation."""

    name = "conv_gemm_bf16_amx"
    version = 1

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        if not has_amx_bf16(target):
            raise ValueError(f"{self.name} needs a CPU with AMX-BF16")
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
            acc = gemm_bf16_extern(xp, packed, n, order,
                                   rows=(batch * oh * ow, kh * kw, cin, window),
                                   row_group=group)
            out = compute(lo.shape(op.result.type),
                          lambda b, y, xx, c: acc[(b * oh + y) * ow + xx, c], name="dense_rows")
            if len(args) > 2:
                out = topi.add(out, args[2])
            return out
        return self.finish(problem, config, target, conv, rule, packed, (
            "amx_bf16_conv_panels",
            lambda w: pack_bf16_panels(w.reshape(-1, w.shape[-1]), False)))


PRECISIONS = ("f32", "bf16")
"""What `compile(precision=)` takes."""


def mark_bf16(kernels: list[FusedOp], target: Target) -> tuple[list[str], str | None]:
    """Mark every kernel the bf16 template computes (a linear layer or a matmul against a
    weight, static shapes) `precision = "bf16"`; the names marked, and a one-line note when
    this CPU cannot run them (nothing is marked: the model stays f32)."""
    if not has_amx_bf16(target):
        return [], ("precision='bf16': this CPU has no AMX-BF16 tile unit, so every kernel "
                    "stays f32")
    templates = (DenseBf16Amx(), ConvGemmBf16Amx())
    marked = []
    for op in kernels:
        if op.attributes.get("precision") is not None:
            continue
        op.attributes["precision"] = "bf16"
        if all(t.match(op) is None for t in templates):
            del op.attributes["precision"]
            continue
        marked.append(op.kernel_name)
    return marked, None
