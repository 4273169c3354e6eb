"""CPU kernel templates: a `kernel.fused` region -> a scheduled TensorIR PrimFunc.

Every template starts from the generic lowering of the region (so its numerics are the generic
lowering's, which the tests hold to the interpreter) and adds a schedule with knobs:

- `dense`: linear / matmul against a constant weight, with any elementwise epilogue. The weight
  is pre-packed at compile time into column panels `[N/nr, K, nr]`, so the micro-kernel reads it
  contiguously; an mr x nr output tile is accumulated in vector registers.
- `conv2d_nhwc`: NHWC convolution with HWIO weights (the `layout` pass's choice), the same
  register tile over (output column, output channel).
- `attention`: `graph.attention`, or two matmuls around a softmax, in one parallel loop over
  (batch, head).
- `rows`: reductions over rows (softmax, layer/RMS norm, reduce_*) and everything else with a
  reduction (pooling, depthwise or NCHW conv, a matmul of two activations outside attention),
  one parallel loop per block.
- `elementwise`: injective kernels (elementwise chains, reshapes, gathers/embedding), inlined
  into one loop nest, vectorised and parallelised.

`select` picks the first template that matches; `elementwise` and `rows` between them match
every region, so every model compiles.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te, topi
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.s_tir.schedule.schedule import ScheduleError

from ...ir import Operation, Trait
from ...ir.dialects.graph import AttentionOp, Conv2dOp, LinearOp, MatmulOp, SoftmaxOp
from ...ir.dialects.kernel import FusedOp
from ...ir.dtypes import DType
from ..template import (
    CodegenError,
    Config,
    KernelTemplate,
    Knob,
    KnobSpace,
    Problem,
    Target,
    match_templates,
    register_template,
)
from .lower import Lowering, lower_kernel, tvm_dtype
from .lower_nn import ROW_LANES
from .schedule import (
    auto_schedule,
    block_name,
    inline_injective,
    is_reduction,
    panel_gemm,
    parallel_vectorize,
    root_blocks,
    spatial_count,
    static_extent,
    tile_contraction,
    try_vectorize,
)
from .target import vector_lanes
from .typed import block_of, compute, fuse, loop_of, reorder, shape_of


def inlinable(op: Operation) -> bool:
    """Ops whose TE computes inline into the consumer's loop nest (elementwise, broadcasts,
    data movement, sources): what an epilogue or an `elementwise` kernel may hold."""
    return op.has(Trait.ELEMENTWISE, Trait.BROADCAST, Trait.INJECTIVE, Trait.SOURCE)



@dataclass
class TvmKernel:
    """A scheduled kernel: its PrimFunc and how to pre-pack constant inputs (by input index:
    a name for the packed layout and the numpy function that packs)."""

    func: tvm.tirx.PrimFunc
    template: str
    config: Config
    packs: dict[int, tuple[str, Callable[[np.ndarray], np.ndarray]]] = field(
        default_factory=dict)
    isa: tuple[str, ...] = ()
    """CPU flags the kernel needs beyond what LLVM emits for the host on its own (AMX)."""


class TvmTemplate(KernelTemplate):
    """A CPU template: `schedule` turns the region's PrimFunc into a scheduled one."""

    def default_config(self, problem: Problem, target: Target) -> Config:
        """The config used untuned: the space's defaults (templates refine by problem)."""
        return self.space.default()

    def build(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        config = self.space.check(config)
        if not self.valid(problem, config):
            raise CodegenError(f"template {self.name}: config {config} is not valid for "
                               f"{dict(problem.params)}")
        try:
            return self.schedule(problem, config, target)
        except (tvm.error.InternalError, ValueError, RuntimeError, ScheduleError) as exc:
            raise CodegenError(f"template {self.name} failed on kernel "
                               f"'{problem.kernel_op.kernel_name}' with {config}: "
                               f"{str(exc).strip().splitlines()[-1]}") from exc

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        raise NotImplementedError


def _constant_input(kernel: FusedOp, value: Any) -> int | None:
    """The kernel input index of a region value that is a block argument fed by a weight."""
    block = kernel.regions[0].block
    for i, arg in enumerate(block.args):
        if arg is value:
            outer = kernel.operands[i]
            producer = getattr(outer, "op", None)
            if producer is not None and producer.name == "graph.constant":
                return i
    return None


def _static(dims: Any) -> bool:
    return all(isinstance(d, int) for d in dims)


def _is_float(dtype: object) -> bool:
    """Whether an element type is a float type (a quantized type is not)."""
    return isinstance(dtype, DType) and dtype.is_float


def pack_panels(weight: np.ndarray, nr: int, transposed: bool) -> np.ndarray:
    """[N, K] (transposed=True, torch's linear weight) or [K, N] -> panels [ceil(N/nr), K, nr],
    zero-padded past N."""
    w = weight if transposed else weight.T
    n, k = w.shape
    padded = np.zeros((-(-n // nr) * nr, k), dtype=w.dtype)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(-1, nr, k).transpose(0, 2, 1))


def pointwise_conv(op: Operation) -> bool:
    """An NHWC 1x1 convolution of stride 1 without padding or groups: a matmul of the
    [N*H*W, I] pixels by the [I, O] weight, which the `dense` templates compute."""
    return (isinstance(op, Conv2dOp) and getattr(op, "layout", "NCHW") == "NHWC"
            and op.groups == 1 and tuple(op.stride) == (1, 1)
            and tuple(op.padding) == (0, 0) and op.operands[1].type.rank == 4
            and tuple(op.operands[1].type.shape[:2]) == (1, 1))


def padded_input(x: te.Tensor, conv: Operation) -> te.Tensor:
    """An NHWC convolution's input with its padding, materialised once (its own block, named
    "conv_input"), so that no bounds check sits in the contraction's inner loop."""
    from .lower_nn import _padded  # noqa: PLC0415 - lower_nn imports after lower

    xp = _padded(x, conv, 0.0, (1, 2))
    if xp is x:
        return x
    return compute(shape_of(xp), lambda *i: xp(*i), name="conv_input")


def as_matrix(weight: np.ndarray) -> np.ndarray:
    """A dense weight as it is; a 1x1 conv's HWIO [1, 1, I, O] as [I, O]."""
    return weight.reshape(weight.shape[-2:]) if weight.ndim == 4 else weight


def row_tile(rows: int) -> int:
    """The default register-tile height: 4 rows if it divides `rows`, else the nearest that
    does (a partial tile would put a predicate on the vectorised epilogue)."""
    return next(m for m in (4, 5, 6, 3, 8, 7, 2, 1) if rows % m == 0)


def column_tile(columns: int, lanes: int) -> int:
    """The default register-tile width: 4, 2 or 1 vectors, the widest that divides `columns`
    (4 vectors, padded, when none does and there are that many columns)."""
    fallback = 4 * lanes if columns >= 4 * lanes else lanes
    return next((c for c in (4 * lanes, 2 * lanes, lanes) if columns % c == 0), fallback)


def register_tile_shape(lanes: int) -> tuple[int, int]:
    """The default GEMM register tile (rows, columns) for a vector width: as many accumulator
    vectors as the register file holds beside one panel row and a broadcast (AVX-512 and NEON:
    32 registers, 6 x 4 vectors; AVX2: 16 registers, 6 x 2)."""
    vectors = 2 if lanes == 8 else 4
    return 6, vectors * lanes


@register_template
class Dense(TvmTemplate):
    """out = epilogue(x @ W^T (+ bias)) for a constant W: the cache-blocked GEMM of
    `schedule.panel_gemm` over panels packed at compile time, register tiles of TILE_M rows
    (the rows padded to whole tiles) x TILE_N columns, reduction slices of TILE_K (0: whole),
    work items of ROW_BLOCK row tiles (0: every row) x one panel."""

    name = "dense"
    version = 3
    space = KnobSpace(Knob("TILE_M", (6, 4, 8, 5, 3, 2, 1, 7, 12)),
                      Knob("TILE_N", (64, 16, 32, 48, 128)),
                      Knob("TILE_K", (0, 64, 128, 256, 512)),  # 0: no split of the reduction
                      Knob("ROW_BLOCK", (0, 4, 8, 16, 32)),  # row tiles per work item; 0: all
                      Knob("ORDER", ("nm", "mn")),
                      Knob("PARALLEL", (True, False)))
    key = ("M", "N", "K", "epilogue", "dtype")

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        if (op.attributes.get("precision") or "f32") != self.precision:
            return None
        anchors = [o for o in op.body_ops if isinstance(o, (LinearOp, MatmulOp))
                   or pointwise_conv(o)]
        if len(anchors) != 1 or any(not inlinable(o) for o in op.body_ops
                                    if o is not anchors[0]):
            return None
        anchor = anchors[0]
        if isinstance(anchor, MatmulOp) and anchor.transpose_lhs:
            return None
        x, w = anchor.operands[0], anchor.operands[1]
        w_index = _constant_input(op, w)
        conv = isinstance(anchor, Conv2dOp)  # HWIO [1, 1, I, O]: a [K, N] weight
        if w_index is None or (w.type.rank != 2 and not conv) or x.type.rank < 2:
            return None
        if not _static(x.type.shape[1:]) or not _is_float(x.type.dtype):
            return None
        transposed = anchor.name == "graph.linear" or (
            isinstance(anchor, MatmulOp) and anchor.transpose_rhs)
        shape = w.type.shape[2:] if conv else w.type.shape
        n, k = (shape if transposed else shape[::-1])
        if not isinstance(n, int) or not isinstance(k, int):  # a weight's shape is static
            return None
        rows = x.type.shape[0]
        for d in x.type.shape[1:-1]:
            rows = rows * d
        # a work item's rows must not cross from one sample into the next in an output that
        # keeps the batch axis (their footprint there is not a box): with a row block, its
        # rows must divide one sample's
        sample = math.prod(int(d) for d in x.type.shape[1:-1]) if x.type.rank > 2 else 0
        epilogue = ",".join(o.name.split(".")[1] for o in op.body_ops if o is not anchor)
        return Problem(self.name, {"M": str(rows), "N": n, "K": k, "epilogue": epilogue,
                                   "dtype": str(x.type.dtype), "w_index": w_index,
                                   "sample_rows": sample,
                                   "transposed": transposed}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        n, k, m = int(problem["N"]), int(problem["K"]), str(problem["M"])
        mr, block, kc = int(config["TILE_M"]), int(config["ROW_BLOCK"]), int(config["TILE_K"])
        sample = int(problem["sample_rows"])
        if block and sample and sample % (mr * block):
            return False
        if block and m.isdigit() and mr * block >= int(m):
            return False  # one block holds every row: ROW_BLOCK 0 says it
        if m.isdigit() and mr > max(int(m), 1) and mr != 1:
            return False  # a tile taller than the rows only computes padding
        return int(config["TILE_N"]) <= -(-n // 16) * 16 and (kc == 0 or kc < k)

    def default_config(self, problem: Problem, target: Target) -> Config:
        n, k, m = int(problem["N"]), int(problem["K"]), str(problem["M"])
        lanes = vector_lanes(target)
        mr, nr = register_tile_shape(lanes)
        nr = column_tile(n, lanes) if n < nr else nr
        rows = int(m) if m.isdigit() else 64
        if m.isdigit():
            mr = min(mr, rows)
        elif mr > 4:
            mr = 4  # a symbolic row count may be small: less padding at one row
        panels = -(-n // nr)
        block = 0
        if panels < 2 * target.cores and m.isdigit():
            # too few panels to share out: split the rows as well, in blocks of whole tiles
            # that divide a sample's rows (`valid`); a tile height the register budget allows
            # that does (ResNet's 56 x 56 pixels: 7 rows, not 6), or else every row in one
            # work item on one core (measured 2.2x slower on ResNet-50's 3x3 convs)
            vectors = max(1, nr // lanes)
            # vector registers: AVX-512 32 (an FMA broadcasts x from memory), NEON 32, AVX2
            # 16 (and x's broadcast takes one)
            registers, broadcast = (32, 0) if lanes >= 16 else (32, 1) if lanes == 4 \
                else (16, 1)
            for height in dict.fromkeys((mr, 7, 4, 8, 5)):
                if height > rows or (height + 1) * vectors + broadcast > registers or \
                        height * vectors < 8:
                    continue  # accumulators that would spill, or too few to hide FMA latency
                want = -(-rows // height) // (2 * target.cores)
                block = next((b for b in (32, 16, 8, 4) if b <= want and self.valid(
                    problem, Config({"TILE_M": height, "TILE_N": nr, "TILE_K": 0,
                                     "ROW_BLOCK": b, "ORDER": "nm", "PARALLEL": True}))), 0)
                if block:
                    mr = height
                    break
        return Config({"TILE_M": mr, "TILE_N": nr, "TILE_K": 0, "ROW_BLOCK": block,
                       "ORDER": "nm", "PARALLEL": rows * n * k >= 1 << 17})

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        kernel: FusedOp = problem.kernel_op
        anchor = next(o for o in kernel.body_ops
                      if isinstance(o, (LinearOp, MatmulOp)) or pointwise_conv(o))
        nr, n, k = int(config["TILE_N"]), int(problem["N"]), int(problem["K"])
        mr = int(config["TILE_M"])
        dtype = tvm_dtype(anchor, anchor.result.type.dtype)
        packed = te.placeholder((-(-n // nr), k, nr), dtype, name="packed")

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            x = args[0]
            lead = list(x.shape[:-1])
            rows = lead[0]
            for d in lead[1:]:
                rows = rows * d
            trailing = [int(d) for d in lead[1:]]
            index = lo.index
            r = te.reduce_axis((tvm.tirx.const(0, index), tvm.tirx.const(k, index)), name="k")
            exact = isinstance(rows, tvm.tirx.IntImm) and int(rows) % mr == 0
            # rows padded to whole tiles; a padding row reads the last real row (in bounds,
            # its results are never read)
            tiles = rows if exact else tvm.tirx.floordiv(rows + (mr - 1), mr) * mr

            def x_at(m: Any, kk: Any) -> Any:
                if not exact:
                    m = tvm.tirx.min(m, rows - 1)
                idx = []
                for d in reversed(trailing):
                    idx.append(m % d)
                    m = m // d
                return x(m, *reversed(idx), kk)
            padded = -(-n // nr) * nr  # the packed weight's zero columns past N
            dense = compute((tiles, tvm.tirx.const(padded, index)), lambda m, j: te.sum(
                x_at(m, r) * packed[j // nr, r, j % nr], axis=r), name="dense")

            def view(*i: Any) -> Any:
                m = i[0]
                for axis, d in zip(i[1:-1], trailing, strict=True):
                    m = m * d + axis
                return dense[m, i[-1]]
            out = compute(lead + [tvm.tirx.const(n, index)], view, name="dense_rows")
            if len(args) > 2:  # a linear's or a conv's bias
                out = topi.add(out, args[2])
            return out
        w_index = int(problem["w_index"])
        func, _, _ = lower_kernel(kernel, rules={anchor: rule}, placeholders={w_index: packed})
        sch = s_tir.Schedule(func)
        inline_injective(sch, keep={"dense"})
        blocks = root_blocks(sch)
        names = [block_name(sch, b) for b in blocks]
        dense = blocks[names.index("dense")]
        panel_gemm(sch, dense, [b for b in blocks if b is not dense], columns=n, mr=mr, nr=nr,
                   kc=int(config["TILE_K"]), mc=int(config["ROW_BLOCK"]),
                   order=str(config["ORDER"]), parallel=bool(config["PARALLEL"]),
                   lanes=vector_lanes(target), cores=target.cores)
        transposed = bool(problem["transposed"])
        return TvmKernel(sch.mod["main"], self.name, config, packs={
            w_index: (f"panels{nr}", lambda w: pack_panels(as_matrix(w), nr, transposed))})


@register_template
class ConvGemm(Dense):
    """An NHWC convolution (groups 1) as an implicit GEMM on `panel_gemm`: rows are output
    pixels (N*OH*OW, padded to whole tiles), columns output channels in panels of the HWIO
    weight packed as [KH*KW*I, O], the reduction the window's rows, columns and input
    channels (channels innermost, read contiguously from the padded input, which is
    materialised once)."""

    name = "conv_gemm"
    version = 1
    key = ("x", "w", "stride", "padding", "dilation", "epilogue", "dtype")

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp) or \
                (op.attributes.get("precision") or "f32") != self.precision:
            return None
        convs = [o for o in op.body_ops if isinstance(o, Conv2dOp)]
        if len(convs) != 1 or any(not inlinable(o) for o in op.body_ops if o is not convs[0]):
            return None
        conv = convs[0]
        if (getattr(conv, "layout", "NCHW") != "NHWC" or conv.groups != 1
                or pointwise_conv(conv)):
            return None
        w_index = _constant_input(op, conv.operands[1])
        x, y = conv.operands[0].type, conv.result.type
        if w_index is None or not _static(x.shape[1:]) or not _static(y.shape[1:]) \
                or not _is_float(x.dtype):
            return None
        kh, kw, cin, cout = (int(d) for d in conv.operands[1].type.shape)
        _, oh, ow, _ = y.shape
        rows = y.shape[0] * oh * ow
        epilogue = ",".join(o.name.split(".")[1] for o in op.body_ops if o is not conv)
        return Problem(self.name, {
            "x": str(x), "w": str(conv.operands[1].type), "stride": str(conv.stride),
            "padding": str(conv.padding), "dilation": str(conv.dilation),
            "epilogue": epilogue, "dtype": str(x.dtype), "M": str(rows), "N": cout,
            "K": kh * kw * cin, "w_index": w_index, "sample_rows": int(oh) * int(ow),
            "transposed": False}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        return int(config["TILE_K"]) == 0 and super().valid(problem, config)

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        kernel: FusedOp = problem.kernel_op
        conv = next(o for o in kernel.body_ops if isinstance(o, Conv2dOp))
        nr, n, mr = int(config["TILE_N"]), int(problem["N"]), int(config["TILE_M"])
        kh, kw, cin, _ = (int(d) for d in conv.operands[1].type.shape)
        dtype = tvm_dtype(conv, conv.result.type.dtype)
        packed = te.placeholder((-(-n // nr), kh * kw * cin, nr), dtype, name="packed")
        (sh, sw), (dh, dw) = conv.stride, conv.dilation

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            xp = padded_input(args[0], op)
            batch, oh, ow = (lo.shape(op.result.type)[i] for i in range(3))
            rows = batch * oh * ow
            index = lo.index
            exact = isinstance(rows, tvm.tirx.IntImm) and int(rows) % mr == 0
            tiles = rows if exact else tvm.tirx.floordiv(rows + (mr - 1), mr) * mr
            ry: Any = te.reduce_axis((tvm.tirx.const(0, index), tvm.tirx.const(kh, index)), "ry")
            rx: Any = te.reduce_axis((tvm.tirx.const(0, index), tvm.tirx.const(kw, index)), "rx")
            rc: Any = te.reduce_axis((tvm.tirx.const(0, index), tvm.tirx.const(cin, index)),
                                     "rc")

            def element(m: Any, j: Any) -> Any:
                if not exact:
                    m = tvm.tirx.min(m, rows - 1)
                b, pix = m // (oh * ow), m % (oh * ow)
                y, xx = pix // ow, pix % ow
                return te.sum(xp[b, y * sh + ry * dh, xx * sw + rx * dw, rc]
                              * packed[j // nr, (ry * kw + rx) * cin + rc, j % nr],
                              axis=[ry, rx, rc])
            padded = -(-n // nr) * nr
            dense = compute((tiles, tvm.tirx.const(padded, index)), element, name="dense")
            out = compute(lo.shape(op.result.type),
                          lambda b, y, xx, c: dense[(b * oh + y) * ow + xx, c],
                          name="dense_rows")
            if len(args) > 2:
                out = topi.add(out, args[2])
            return out
        w_index = int(problem["w_index"])
        func, _, _ = lower_kernel(kernel, rules={conv: rule}, placeholders={w_index: packed})
        sch = s_tir.Schedule(func)
        inline_injective(sch, keep={"dense", "conv_input"})
        blocks = root_blocks(sch)
        names = [block_name(sch, b) for b in blocks]
        dense = blocks[names.index("dense")]
        lanes = vector_lanes(target)
        if "conv_input" in names:
            parallel_vectorize(sch, blocks[names.index("conv_input")], lanes=lanes,
                               min_parallel=1 << 14, cores=target.cores)
        panel_gemm(sch, dense, [b for i, b in enumerate(blocks)
                                if names[i] not in ("dense", "conv_input")], columns=n, mr=mr,
                   nr=nr, kc=0, mc=int(config["ROW_BLOCK"]), order=str(config["ORDER"]),
                   parallel=bool(config["PARALLEL"]), lanes=lanes, cores=target.cores)
        return TvmKernel(sch.mod["main"], self.name, config, packs={
            w_index: (f"conv_panels{nr}",
                      lambda w: pack_panels(w.reshape(-1, w.shape[-1]), nr, False))})


@register_template
class Conv2dNHWC(TvmTemplate):
    """NHWC convolution with HWIO weights (output channels contiguous, so no packing), with its
    padding prologue and elementwise epilogue: an (output column x output channel) register
    tile, the window and input channels reduced inside it."""

    name = "conv2d_nhwc"
    version = 2
    space = KnobSpace(Knob("TILE_W", (4, 1, 2, 3, 5, 6, 7, 8)),
                      Knob("TILE_C", (64, 16, 32, 48, 128)),
                      Knob("ORDER", ("mn", "nm")),  # tiles along the row first, or channels
                      Knob("PARALLEL", (True, False)))
    key = ("x", "w", "stride", "padding", "dilation", "epilogue")

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        convs = [o for o in op.body_ops if isinstance(o, Conv2dOp)]
        if len(convs) != 1 or any(not inlinable(o) for o in op.body_ops if o is not convs[0]):
            return None
        conv = convs[0]
        if getattr(conv, "layout", "NCHW") != "NHWC" or conv.groups != 1:
            return None
        if _constant_input(op, conv.operands[1]) is None:
            return None
        _, oh, ow, oc = conv.result.type.shape
        if not (isinstance(oh, int) and isinstance(ow, int) and isinstance(oc, int)):
            return None
        epilogue = ",".join(o.name.split(".")[1] for o in op.body_ops if o is not conv)
        return Problem(self.name, {
            "x": str(conv.operands[0].type), "w": str(conv.operands[1].type), "OW": ow, "OC": oc,
            "stride": str(conv.stride), "padding": str(conv.padding),
            "dilation": str(conv.dilation), "epilogue": epilogue}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        ow, oc = int(problem["OW"]), int(problem["OC"])
        return (ow % int(config["TILE_W"]) == 0
                and int(config["TILE_C"]) <= -(-oc // 16) * 16)

    def default_config(self, problem: Problem, target: Target) -> Config:
        return Config({"TILE_W": row_tile(int(problem["OW"])),
                       "TILE_C": column_tile(int(problem["OC"]), vector_lanes(target)),
                       "ORDER": "mn", "PARALLEL": True})

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        func, _, _ = lower_kernel(problem.kernel_op)
        sch = s_tir.Schedule(func)
        inline_injective(sch, keep={"conv2d"})
        blocks = root_blocks(sch)
        conv = next(b for b in blocks if block_name(sch, b) == "conv2d")
        consumers = [b for b in blocks if not block_of(sch, b).same_as(block_of(sch, conv))]
        nr = int(config["TILE_C"])
        fits = (len(consumers) == 1 and int(problem["OC"]) % nr == 0
                and len(sch.get_loops(consumers[0])) == 4)
        tile_contraction(sch, conv, consumers, fits, rows=1, mr=int(config["TILE_W"]), nr=nr,
                         kc=0, order=str(config["ORDER"]), parallel=bool(config["PARALLEL"]),
                         lanes=vector_lanes(target), cores=target.cores)
        return TvmKernel(sch.mod["main"], self.name, config)


def signature_problem(template: str, op: FusedOp) -> Problem:
    """The problem of a template keyed by the region's ops and result types."""
    sig = ";".join(f"{o.name}:{o.results[0].type}" if o.results else o.name
                   for o in op.body_ops)
    return Problem(template, {"signature": sig}, op)


SOFTMAX_BLOCKS = frozenset({"exp", "probs", "T_softmax_exp", "T_softmax_norm"})
"""Blocks that compute exponentials: materialised, never recomputed inside a contraction."""


def _points_under(sch: s_tir.Schedule, block: Any, outer: Any) -> int | None:
    """How many points `block`'s loops inside `outer` iterate (None: a symbolic extent)."""
    loops = sch.get_loops(block)
    target = loop_of(sch, outer)
    at = next((i for i, lp in enumerate(loops) if loop_of(sch, lp).same_as(target)), None)
    if at is None:
        return None
    inner = loops[at + 1:]
    extents = [static_extent(sch, lp) for lp in inner]
    return None if any(e is None for e in extents) else math.prod(e or 1 for e in extents)


def _exact_under(sch: s_tir.Schedule, consumer: Any, pv: Any, outer: Any) -> bool:
    """Whether moving `consumer` under `outer` makes each iteration compute exactly what that
    iteration's P.V wrote. TVM covers the region a consumer reads with one box: a consumer that
    interleaves the batch with the rows (sequence-first attention, `[S*B, H*D]`) gets a box
    over other batches' rows, which it would fill from P.V values not computed yet. Such a
    consumer stays at the root, after the parallel loop."""
    trial = sch.copy()
    try:
        trial.reverse_compute_at(consumer, outer)
    except ScheduleError:
        return False
    rows, cols = [static_extent(trial, lp) for lp in trial.get_loops(pv)[-3:-1]]
    moved = _points_under(trial, consumer, outer)
    return moved is not None and rows is not None and cols is not None and moved <= rows * cols


@register_template
class Attention(TvmTemplate):
    """softmax(q k^T ...) v, as `graph.attention` or decomposed (two matmuls around a softmax):
    every block runs inside one parallel loop over (batch, head); the probabilities are
    computed once per row and the P.V contraction is vectorised over the head dim."""

    name = "attention"
    version = 4
    space = KnobSpace(Knob("VECTORIZE_PV", (True, False)), Knob("PARALLEL", (True, False)),
                      Knob("ROW_CHUNKS", (1, 2, 4, 8)), Knob("VECTORIZE_QK", (True, False)))
    """ROW_CHUNKS: the query rows split into that many chunks, each its own iteration of the
    parallel loop (more, smaller pieces of work when batch x heads is small). VECTORIZE_QK:
    q.k^T vectorised over the keys, reading K from a per-(batch, head) copy with the keys
    innermost (otherwise LLVM vectorises it with gathers across the keys)."""
    key = ("signature",)

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        ops = op.body_ops
        fused = sum(isinstance(o, AttentionOp) for o in ops) == 1
        decomposed = (sum(isinstance(o, MatmulOp) for o in ops) == 2
                      and any(isinstance(o, SoftmaxOp) for o in ops))
        if not (fused or decomposed):
            return None
        if any(not (inlinable(o) or isinstance(o, (AttentionOp, MatmulOp, SoftmaxOp)))
               for o in ops):
            return None
        problem = signature_problem(self.name, op)
        rows = op.results[0].type.shape[-2] if op.results[0].type.rank >= 2 else None
        return Problem(self.name, {**problem.params, "rows": rows if isinstance(rows, int)
                                   else 0}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        chunks, rows = int(config["ROW_CHUNKS"]), int(problem["rows"])
        return chunks == 1 or (rows >= 2 * chunks and rows % chunks == 0)

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        func, _, _ = lower_kernel(problem.kernel_op)
        sch = s_tir.Schedule(func)
        inline_injective(sch, keep=SOFTMAX_BLOCKS)
        blocks = root_blocks(sch)
        reductions = [b for b in blocks if is_reduction(sch, b)]
        pv = reductions[-1]
        loops = sch.get_loops(pv)
        lead = spatial_count(sch, pv) - 2
        if lead < 1:
            raise CodegenError("attention: expected batch/head loops before the rows")
        chunks = int(config["ROW_CHUNKS"])
        if chunks > 1:
            if static_extent(sch, loops[lead]) != problem["rows"]:
                raise CodegenError(f"attention: expected {problem['rows']} query rows in the "
                                   f"P.V loop, got extent {loop_of(sch, loops[lead]).extent}")
            chunk, _ = sch.split(loops[lead], [chunks, None])
            loops = [*loops[:lead], chunk]
            lead += 1
        outer = fuse(sch, *loops[:lead]) if lead > 1 else loops[0]
        if config["PARALLEL"]:
            sch.parallel(outer)
        # producers whose every consumer is under the loop move in first, then the consumers
        # of P.V, then the producers that were waiting on them (the row sums)
        waiting = []
        for block in reversed(blocks[:blocks.index(pv)]):
            try:
                sch.compute_at(block, outer)
            except ScheduleError:
                waiting.append(block)
        for block in blocks[blocks.index(pv) + 1:]:
            if _exact_under(sch, block, pv, outer):
                sch.reverse_compute_at(block, outer)
        for block in waiting:
            sch.compute_at(block, outer)
        if config["VECTORIZE_QK"] and reductions[0] is not pv:
            _vectorize_over_keys(sch, reductions[0], outer, vector_lanes(target))
        if config["VECTORIZE_PV"]:  # the softmax: row reductions in lanes, rows vectorised
            _vectorize_softmax(sch, pv, reductions[0], vector_lanes(target))
        rows, cols, red = sch.get_loops(pv)[-3:]
        if config["VECTORIZE_PV"] and static_extent(sch, cols) is not None and \
                not _register_tiled(sch, pv, vector_lanes(target)):
            reorder(sch, rows, red, cols)
            sch.decompose_reduction(pv, red)
            try_vectorize(sch, sch.get_loops(pv)[-1])
        return TvmKernel(sch.mod["main"], self.name, config)


def _uses(expr: Any, var: Any) -> bool:
    """True when `expr` mentions `var`."""
    return any(v.same_as(var) for v in tvm.tirx.analysis.undefined_vars(expr))


def _vectorize_over_keys(sch: s_tir.Schedule, qk: SBlockRV, outer: LoopRV,
                         lanes: int) -> None:
    """q.k^T with the keys innermost: K copied under `outer` into a buffer whose last axis is
    the keys (when it is not already), then the depth reduction outside the keys loop and the
    keys vectorised."""
    loops = sch.get_loops(qk)
    at = [i for i, loop in enumerate(loops) if loop_of(sch, loop).same_as(loop_of(sch, outer))]
    inner = loops[at[0] + 1:] if at else []
    if len(inner) != 3:
        return  # not under `outer`, or a unit rows/keys/depth loop was dropped: leave it
    block = block_of(sch, qk)
    keys_var = block.iter_vars[spatial_count(sch, qk) - 1].var
    reads = [i for i, r in enumerate(block.reads)
             if any(_uses(rng.min, keys_var) for rng in r.region)]
    if len(reads) != 1:
        return  # not the q.k^T shape this expects: leave it as it is
    region = block.reads[reads[0]].region
    axis = next(d for d, rng in enumerate(region) if _uses(rng.min, keys_var))
    if axis != len(region) - 1:
        cached = sch.cache_read(qk, reads[0], "global")
        sch.compute_at(cached, outer)
        sch.transform_layout(qk, ("read", reads[0]),
                             lambda *i: (*i[:axis], *i[axis + 1:], i[axis]))
    if _register_tiled(sch, qk, lanes):
        return
    rows, keys, depth = inner
    reorder(sch, rows, depth, keys)
    sch.decompose_reduction(qk, depth)
    try_vectorize(sch, sch.get_loops(qk)[-1])


def _vectorize_softmax(sch: s_tir.Schedule, pv: SBlockRV, qk: SBlockRV, lanes: int) -> None:
    """The softmax's blocks under the parallel loop, vectorised along each row: the
    elementwise ones (the exponentials, the division), and the row max and sum's partials
    (`lower_nn._row_reduce`'s `*_lanes` blocks: a vector of partial results per row, its
    reduction loop moved outside the lanes). TVM's rfactor cannot do the latter: it refuses
    a block that is not the first child of its loop."""
    for block in sch.get_child_blocks(sch.get_loops(pv)[0]):
        if block_name(sch, block).endswith("_lanes") and is_reduction(sch, block):
            *_, part, red = sch.get_loops(block)
            if static_extent(sch, part) == ROW_LANES and ROW_LANES % lanes == 0:
                reorder(sch, red, part)
                if try_vectorize(sch, part):  # before the init is split off, as TVM wants
                    init = sch.decompose_reduction(block, red)
                    try_vectorize(sch, sch.get_loops(init)[-1])
            continue
        if block_of(sch, block).same_as(block_of(sch, pv)) or \
                block_of(sch, block).same_as(block_of(sch, qk)) or is_reduction(sch, block):
            continue
        if block_name(sch, block).endswith(("_local", "_init", "_global")):
            continue
        loops = sch.get_loops(block)
        extent = static_extent(sch, loops[-1]) if loops else None
        if extent is not None and extent % lanes == 0:
            _, last = sch.split(loops[-1], [None, lanes])
            try_vectorize(sch, last)


def _register_tiled(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> bool:
    """A per-(batch, head) contraction (its last loops: rows, columns, reduction) as register
    tiles: up to 6 rows x up to 4 vectors of columns accumulated in registers (a local tile)
    over the reduction, written back once. False (nothing changed) when the extents do not
    allow whole tiles or TensorIR refuses."""
    loops = sch.get_loops(block)
    extents = [static_extent(sch, lp) for lp in loops[-3:]]
    if len(loops) < 3 or any(e is None for e in extents):
        return False
    rows, cols, _ = (int(e) for e in extents if e is not None)
    mr = next((m for m in (6, 4, 5, 3, 2) if rows % m == 0), 1)
    vectors = next((v for v in (4, 2, 1) if cols % (v * lanes) == 0), 0)
    if not vectors:
        return False
    trial = sch.copy()
    try:
        _tile_block(trial, block, mr, vectors, lanes)
    except (ScheduleError, ValueError, RuntimeError):
        return False
    _tile_block(sch, block, mr, vectors, lanes)
    return True


def _tile_block(sch: s_tir.Schedule, block: SBlockRV, mr: int, vectors: int,
                lanes: int) -> None:
    r, c, k = sch.get_loops(block)[-3:]
    ro, ri = sch.split(r, [None, mr])
    co, cv, cl = sch.split(c, [None, vectors, lanes])
    reorder(sch, ro, co, k, ri, cv, cl)
    written = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(written, co)
    sch.unroll(ri)
    sch.unroll(cv)
    sch.vectorize(cl)
    init = sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(written)[-1])


class _Auto(TvmTemplate):
    """Inline injective blocks; vectorise and parallelise each block that is left."""

    version = 2
    space = KnobSpace(Knob("VECTORIZE", (True, False)),
                      Knob("MIN_PARALLEL", (16384, 4096, 65536, 1 << 40)),
                      Knob("VECTOR_FACTOR", (4, 1, 2)))
    """VECTOR_FACTOR: vectors per iteration of a vectorised loop (its extent, in vectors)."""
    key = ("signature",)

    def valid(self, problem: Problem, config: Config) -> bool:
        return bool(config["VECTORIZE"]) or config["VECTOR_FACTOR"] == 4  # no vectors, no factor


    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        func, _, _ = lower_kernel(problem.kernel_op)
        sch = s_tir.Schedule(func)
        lanes = vector_lanes(target) if config["VECTORIZE"] else 1
        auto_schedule(sch, lanes=lanes, cores=target.cores,
                      min_parallel=int(config["MIN_PARALLEL"]),
                      vector_factor=int(config["VECTOR_FACTOR"]))
        return TvmKernel(sch.mod["main"], self.name, config)


@register_template
class Elementwise(_Auto):
    """Injective kernels: one loop nest after inlining."""

    name = "elementwise"

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp) or not all(inlinable(o) for o in op.body_ops):
            return None
        return signature_problem(self.name, op)


@register_template
class Rows(_Auto):
    """Any kernel with a reduction: each block parallel over its outer spatial loops."""

    name = "rows"

    def match(self, op: Operation) -> Problem | None:
        return signature_problem(self.name, op) if isinstance(op, FusedOp) else None


def select(op: FusedOp, target: Target) -> tuple[TvmTemplate, Problem]:
    """The first template matching `op` (registration order: specific to general)."""
    matches = [(t, p) for t, p in match_templates(op) if isinstance(t, TvmTemplate)]
    matches.sort(key=lambda tp: isinstance(tp[0], _Auto))  # the catch-alls last
    if not matches:
        raise CodegenError(f"no CPU template matches kernel '{op.kernel_name}'")
    return matches[0]


def build_kernel(op: FusedOp, target: Target, config: Config | None = None) -> TvmKernel:
    """Build `op` with its template and `config` (a tuned one), or the template's default."""
    template, problem = select(op, target)
    return template.build(problem, config or template.default_config(problem, target), target)



from . import (  # noqa: E402,F401 - registers their templates
    paged_attention,
    templates_a8,
    templates_amx,
    templates_quant,
)
