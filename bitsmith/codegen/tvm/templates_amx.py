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

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te, topi

from ...errors import CodegenError
from ...ir import Module, Operation
from ...ir.dialects import quant
from ...ir.dialects.graph import Conv2dOp, LinearOp, MatmulOp
from ...ir.dialects.kernel import FusedOp
from ...ir.interpreter import kernel_calls
from ..template import Config, Knob, KnobSpace, Problem, Target, register_template
from . import templates_a8 as a8
from .amx import (
    BLOCK,
    KINDS,
    gemm,
    gemm_extern,
    has_amx,
    pack_bf16_panels,
    pack_int8_panels,
)
from .epilogue import dense_rows, gemm_epilogue
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
        panels = -(-int(problem["N"]) // BLOCK) + (1 if self.smooth(problem) is not None else 0)
        return te.placeholder((panels, rows, BLOCK, kind.group), kind.storage, name="packed")

    def smooth(self, problem: Problem) -> np.ndarray | None:
        """The SmoothQuant factors s [K] an int8 kernel was calibrated with (its `smooth`
        attribute, `calibrate_smoothing`), or None."""
        factors = problem.kernel_op.attributes.get("smooth")
        if self.precision != "int8" or not factors:
            return None
        s = np.asarray(factors, np.float64)
        low, high = SMOOTH_RANGE
        if not (np.isfinite(s).all() and ((s >= low) & (s <= high)).all()):
            raise CodegenError(f"kernel '{problem.kernel_op.kernel_name}': SmoothQuant "
                               f"factors must lie in [{low:g}, {high:g}]")
        return s.astype(np.float32)

    def pack(self, problem: Problem, matrix: Any, transposed: bool) -> tuple[str, Any]:
        """The weight's packing: its layout name and function (of the stored weight)."""
        if self.precision == "bf16":
            return "amx_bf16_panels", lambda w: pack_bf16_panels(matrix(w), transposed)
        s = self.smooth(problem)
        # a weight shared by kernels smoothed apart is packed once per factor vector
        name = ("amx_int8_panels" if s is None else
                f"amx_int8_smooth_{hashlib.sha256(s.tobytes()).hexdigest()[:12]}")
        return name, lambda w: pack_int8_panels(matrix(w), transposed, smooth=s)

    def fused(self, problem: Problem, config: Config, anchor: Operation, packed: te.Tensor,
              pack: tuple[str, Any]) -> TvmKernel | None:
        """The kernel as one AMX GEMM whose epilogue (bias, activation, residual, reshapes)
        runs on each 32 x 32 block of sums while it is in L1 (`amx.gemm`'s `store`); None
        when the kernel is not of that shape (`epilogue.gemm_epilogue`): the caller then
        builds it unfused."""
        m, n, w_index = int(problem["M"]), int(problem["N"]), int(problem["w_index"])
        found = gemm_epilogue(problem.kernel_op, anchor, m, n,
                              acc_shape=(-(-m // BLOCK) * BLOCK, -(-n // BLOCK) * BLOCK),
                              placeholders={w_index: packed}, operands=(w_index,))
        if found is None:
            return None
        main: Any = gemm(self.precision, tuple(int(d) for d in found.inputs[found.x_index].shape),
                         n, str(config["ORDER"]), tuple(shape_of(packed)),
                         row_group=int(config["ROW_GROUP"]),
                         store=(tuple(found.out.shape), found.put),
                         smooth=self.smooth(problem) is not None)
        x_buf, w_buf, out_buf = main.params
        own = [x_buf if i == found.x_index else w_buf if i == w_index else buf
               for i, buf in enumerate(found.inputs)]
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
        pack = self.pack(problem, as_matrix, bool(problem["transposed"]))
        smooth = self.smooth(problem) is not None
        fused = self.fused(problem, config, anchor, packed, pack)
        if fused is not None:
            return fused

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            acc = gemm_extern(self.precision, args[0], packed, n, order, row_group=group,
                              smooth=smooth)
            return dense_rows(acc, args[0], n, args[2] if len(args) > 2 else None)
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
        smooth = self.smooth(problem) is not None

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            xp = padded_input(args[0], op)
            batch, oh, ow = (int(d) for d in op.result.type.shape[:3])

            def window(xb: Any, i: Any, g: Any, ic: Any) -> Any:  # pixel i, kernel position g
                pix = i % (oh * ow)
                return xb[i // (oh * ow), pix // ow * sh + g // kw * dh,
                          pix % ow * sw + g % kw * dw, ic]
            acc = gemm_extern(self.precision, xp, packed, n, order,
                              rows=(batch * oh * ow, kh * kw, cin, window),
                              row_group=group, smooth=smooth)
            out = compute(lo.shape(op.result.type),
                          lambda b, y, xx, c: acc[(b * oh + y) * ow + xx, c], name="dense_rows")
            if len(args) > 2:
                out = topi.add(out, args[2])
            return out
        return self.finish(problem, config, target, conv, rule, packed,
                           self.pack(problem, lambda w: w.reshape(-1, w.shape[-1]), False))


@register_template
class DenseInt8Amx(DenseBf16Amx):
    """out = epilogue(dequant(int8(x) @ int8(W)^T) (+ bias)): each row of x on its own
    scale (dynamic, per token), W per output channel, int32 sums, on AMX tiles."""

    name = "dense_int8_amx"
    version = 2
    precision = "int8"


@register_template
class ConvGemmInt8Amx(ConvGemmBf16Amx):
    """An NHWC convolution as an implicit GEMM on AMX tiles in int8: each output pixel's
    window quantized on its own scale, the weight per output channel, int32 sums."""

    name = "conv_gemm_int8_amx"
    version = 2
    precision = "int8"


PRECISIONS = ("f32", "bf16", "int8")
"""What `compile(precision=)` takes."""

TEMPLATES = {"bf16": (DenseBf16Amx(), ConvGemmBf16Amx()),
             "int8": (DenseInt8Amx(), ConvGemmInt8Amx())}


def mark_precision(kernels: list[FusedOp], target: Target,
                   precision: str) -> tuple[list[str], str | None]:
    """Mark every kernel an AMX template of `precision` ("bf16" or "int8") computes (a linear
    layer, a matmul against a weight or an NHWC convolution, static shapes)
    `precision = ...`; with "int8", a quantized linear layer (`quant.linear` of integer codes
    in whole activation blocks) multiplies its codes by int8 activation blocks instead
    (`act="i8"`: W4A8/W8A8 on AVX-512 VNNI). The names marked, and a one-line note when this
    CPU cannot run some of them (those stay f32)."""
    amx = has_amx(target, precision)
    vnni = precision == "int8" and a8.has_vnni(target)
    marked: list[str] = []
    skipped = {"tile": 0, "vnni": 0}
    for op in kernels:
        anchor = op.body_ops[0] if op.body_ops else None
        if isinstance(anchor, quant.LinearOp):
            if precision == "int8" and anchor.act == "f32" and \
                    a8.supported(anchor.weight.type.dtype):
                if vnni:
                    anchor.attributes["act"] = "i8"
                    marked.append(op.kernel_name)
                else:
                    skipped["vnni"] += 1
            continue
        if op.attributes.get("precision") is not None:
            continue
        op.attributes["precision"] = precision
        if all(t.match(op) is None for t in TEMPLATES[precision]):
            del op.attributes["precision"]
            continue
        if not amx:
            del op.attributes["precision"]
            skipped["tile"] += 1
            continue
        marked.append(op.kernel_name)
    units = {"tile": f"AMX-{precision.upper()} tile unit", "vnni": "AVX-512 VNNI"}
    lacks = [f"no {units[u]} ({n} kernels)" for u, n in skipped.items() if n]
    if not lacks:
        return marked, None
    return marked, (f"precision={precision!r}: this CPU has {' and '.join(lacks)}, so those "
                    "kernels stay f32")


SMOOTH_ALPHA = 0.5
"""SmoothQuant's migration strength: s = max|x|^a / max|W|^(1 - a) per reduction index."""

SMOOTH_RANGE = (1e-4, 1e4)
"""s is clipped to this range (an x * (1 / s) that overflows comes out NaN, never wrong)."""


def calibrate_smoothing(module: Module, batches: Sequence[Sequence[np.ndarray]]) -> list[str]:
    """SmoothQuant for the int8 linear layers of a fused module: each reduction index's
    largest |x| over the calibration `batches` (input tuples in the module's order) and
    largest |W| set the kernel's `smooth` factors (`SMOOTH_ALPHA`), which move the range of
    an activation's outlier channels into the weight before both are quantized. The names of
    the kernels calibrated."""
    template = DenseInt8Amx()
    wanted: dict[Operation, tuple[int, int, bool]] = {}
    for op in module.ops:
        if not isinstance(op, FusedOp) or op.attributes.get("precision") != "int8":
            continue
        problem = template.match(op)
        anchor = next((o for o in op.body_ops if isinstance(o, (LinearOp, MatmulOp))
                       or pointwise_conv(o)), None)
        x_index = next((i for i, a in enumerate(op.regions[0].block.args)
                        if anchor is not None and a is anchor.operands[0]), None)
        if problem is None or x_index is None:
            continue
        wanted[op] = (x_index, int(problem["w_index"]), bool(problem["transposed"]))
    big_x: dict[Operation, np.ndarray] = {}
    big_w: dict[Operation, np.ndarray] = {}
    for batch in batches:
        for op, inputs, _ in kernel_calls(module, batch):
            if op not in wanted:
                continue
            xi, wi, transposed = wanted[op]
            x = np.abs(np.asarray(inputs[xi], np.float32))
            x = np.where(np.isfinite(x), x, 0).reshape(-1, x.shape[-1]).max(axis=0)
            big_x[op] = np.maximum(big_x[op], x) if op in big_x else x
            w = np.abs(as_matrix(np.asarray(inputs[wi], np.float32)))
            big_w[op] = w.max(axis=0 if transposed else 1)
    for op, x in big_x.items():
        w = big_w[op]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = x ** SMOOTH_ALPHA / w ** (1 - SMOOTH_ALPHA)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        op.attributes["smooth"] = tuple(float(v) for v in np.clip(s, *SMOOTH_RANGE))
    return [str(op.attributes["name"]) for op in big_x]
