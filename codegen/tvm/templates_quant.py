"""`qdense`: the fused dequant-GEMV/GEMM template for `quant.linear` (any width 1..8, low-bit
floats), codes unpacked in registers and accumulated in f32.

The weight is re-packed at compile time into the lanes layout (`ir.packing.pack_lanes` with
one lane per f32 vector lane): a vector load gives every lane the same 32 bits of its own code
stream, so each code is extracted with the same constant shifts in every lane, and position i
of a block multiplies the contiguous activations [i*lanes, (i+1)*lanes).

With per-output-channel scales the scale and zero point come out of the inner loop:

    y[m, n] = sum_g s[n, g] * (sum_{k in g} q[n, k] x[m, k]) - sum_g s[n, g] z[n, g] xsum[m, g]

so the loop over a group is a decode and one FMA per weight; the group's partial sums (a
vector per row) are scaled into the row's accumulator vector with one more FMA per group, and
the lanes are added once per row. K is padded with zero codes (and zero activations) to whole
blocks of 32 * lanes. Low-bit floats decode by moving their bits into a float32 (exact); the
constant factor that leaves out rides on the scale.

Knobs: TILE_N (weight rows sharing each activation vector), TILE_M (activation rows sharing
each decoded weight vector), UNROLL (unroll the positions of a chunk), PARALLEL.
"""
from __future__ import annotations

from typing import Any

import numpy as np

import tvm
import tvm.s_tir as s_tir
from tvm import te, topi

from ...ir import Operation
from ...ir.dialects.kernel import FusedOp
from ...ir.packing import CHUNK, WORD, lane_blocks, rows_to_lanes
from ...ir.types import GroupAxis, QuantType
from ..template import Config, Knob, KnobSpace, Problem, Target, register_template
from .lower import Lowering, lower_kernel
from .lower_quant import decode, decode_factor
from .schedule import block_name, inline_injective, root_blocks
from .target import host_target, vector_lanes
from .templates import INJECTIVE, TvmKernel, TvmTemplate, _constant_input, _static

U32 = "uint32"


def fast_groups(qtype: QuantType, k: int, lanes: int) -> bool:
    """Whether the fused schedule handles this grouping: per output channel, with groups that
    are whole vectors dividing a block or whole blocks (per channel always)."""
    if qtype.axis is not GroupAxis.OUT:
        return False
    g, block = qtype.group_size, CHUNK * lanes
    if g == 0 or g >= k:
        return True
    return (g % lanes == 0 and block % g == 0) or g % block == 0


def _code(words: te.Tensor, n: Any, blk: Any, i: Any, lane: Any, bits: int) -> Any:
    """Code at stream position i of one lane. With i a Python int (or a loop variable the
    schedule unrolls, which TIR then folds) the word index and shifts are constants."""
    if not isinstance(i, int):
        bit = i * bits
        word, off = bit // WORD, (bit % WORD).astype(U32)
        lo = words[n, blk, word, lane] >> off
        hi = tvm.tirx.if_then_else(off + tvm.tirx.const(bits, U32) > tvm.tirx.const(WORD, U32),
                                   words[n, blk, tvm.tirx.min(word + 1, bits - 1), lane]
                                   << (tvm.tirx.const(WORD, U32) - off),
                                   tvm.tirx.const(0, U32))
        return (lo | hi) & tvm.tirx.const((1 << bits) - 1, U32)
    word, off = divmod(i * bits, WORD)
    v = words[n, blk, word, lane]
    if off:
        v = v >> tvm.tirx.const(off, U32)
    if off + bits > WORD:
        v = v | (words[n, blk, word + 1, lane] << tvm.tirx.const(WORD - off, U32))
    if off + bits != WORD:  # the code ends below the top bit: clear what lies above it
        v = v & tvm.tirx.const((1 << bits) - 1, U32)
    return v


def _pad_blocks(words: Any, blocks: int) -> Any:
    """Lanes-layout words [N, b, bits, lanes] padded with zero blocks to `blocks`."""
    extra = blocks - words.shape[1]
    if extra == 0:
        return words
    pad = np.zeros((words.shape[0], extra) + words.shape[2:], words.dtype)
    return np.ascontiguousarray(np.concatenate([words, pad], axis=1))


@register_template
class QDense(TvmTemplate):
    """out = epilogue(x @ dequantize(W)^T) for a packed constant W: fused dequant-GEMV/GEMM."""

    name = "qdense"
    version = 1
    space = KnobSpace(Knob("TILE_N", (4, 1, 2, 8)),
                      Knob("TILE_M", (1, 2, 4)),
                      Knob("UNROLL", (True, False)),
                      Knob("PARALLEL", (True, False)))
    key = ("M", "N", "K", "qtype", "epilogue")

    def match(self, op: Operation) -> Problem | None:
        if op.name != "kernel.fused":
            return None
        anchors = [o for o in op.body_ops if o.name == "quant.linear"]
        if len(anchors) != 1 or any(o.name not in INJECTIVE for o in op.body_ops
                                    if o is not anchors[0]):
            return None
        anchor = anchors[0]
        qtype = anchor.weight.type.dtype
        indices = [_constant_input(op, v) for v in anchor.operands[1:]]
        x = anchor.x
        n, k = anchor.weight.type.shape
        if (any(i is None for i in indices) or not _static((n, k)) or x.type.rank < 1
                or not _static(x.type.shape[1:])):
            return None
        if not fast_groups(qtype, k, vector_lanes(host_target())):
            return None
        rows = x.type.shape[0] if x.type.rank > 1 else 1
        for d in x.type.shape[1:-1]:
            rows = rows * d
        epilogue = ",".join(o.name.split(".")[1] for o in op.body_ops if o is not anchor)
        return Problem(self.name, {"M": str(rows), "N": n, "K": k, "qtype": str(qtype),
                                   "epilogue": epilogue, "w_index": indices[0],
                                   "row_factor": rows if isinstance(rows, int) else 1}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        return (problem["N"] % config["TILE_N"] == 0
                and problem["row_factor"] % config["TILE_M"] == 0)

    def default_config(self, problem: Problem, target: Target) -> Config:
        n = problem["N"]
        return Config({"TILE_N": next(t for t in (4, 2, 1) if n % t == 0), "TILE_M": 1,
                       "UNROLL": True, "PARALLEL": n * problem["K"] >= 1 << 16})

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        kernel: FusedOp = problem.op
        anchor = next(o for o in kernel.body_ops if o.name == "quant.linear")
        qtype: QuantType = anchor.weight.type.dtype
        n, k, bits = problem["N"], problem["K"], qtype.bits
        lanes = vector_lanes(target)
        block = CHUNK * lanes
        blocks = lane_blocks(k, lanes)
        g = qtype.group_size if 0 < qtype.group_size < k else blocks * block
        if g > block:  # whole groups of whole blocks
            blocks = -(-k // g) * (g // block)
        kp = blocks * block
        groups = -(-k // g)
        chunk = min(g, block)  # elements of one chunk: a group, or a block of a longer group
        per_block, positions = block // chunk, chunk // lanes
        words = te.placeholder((n, blocks, bits, lanes), U32, name="packed")
        factor = decode_factor(qtype)

        def rule(op: Operation, args: list, lo: Lowering) -> te.Tensor:
            x, _, scale, *zero = args
            lead = list(x.shape[:-1])
            rows = 1
            for d in lead:
                rows = rows * d
            flat = topi.reshape(x, (rows, k)) if lead else topi.reshape(x, (1, k))
            xp = te.compute((rows, kp), lambda m, kk: tvm.tirx.if_then_else(
                kk < k, flat[m, tvm.tirx.min(kk, k - 1)], tvm.tirx.const(0.0, "float32")),
                name="xpad")

            def group_of(cb: Any, cs: Any) -> Any:  # padding chunks past K: any group will do
                return tvm.tirx.min((cb * block + cs * chunk) // g, groups - 1)

            def chunk_sum(m: Any, j: Any, cb: Any, cs: Any, lane: Any) -> Any:
                terms = []
                for p in range(positions):
                    # cs is unrolled by the schedule, so i is a constant there too
                    i = cs * positions + p if per_block > 1 else p
                    code = _code(words, j, cb, i, lane, bits)
                    terms.append(decode(code, qtype)
                                 * xp[m, cb * block + i * lanes + lane])
                out = terms[0]
                for t in terms[1:]:
                    out = out + t
                return out
            rcb = te.reduce_axis((0, blocks), name="cb")
            rcs = te.reduce_axis((0, per_block), name="cs")
            acc = te.compute((rows, n, lanes), lambda m, j, lane: te.sum(
                scale[j, group_of(rcb, rcs)].astype("float32") * chunk_sum(m, j, rcb, rcs, lane),
                axis=[rcb, rcs]), name="acc")
            rl = te.reduce_axis((0, lanes), name="lane")
            dot = te.compute((rows, n), lambda m, j: te.sum(acc[m, j, rl], axis=rl), name="dot")
            if factor != 1.0:
                dot = te.compute((rows, n), lambda m, j: dot[m, j] * tvm.tirx.const(
                    factor, "float32"), name="dot_scaled")
            if zero:
                rg = te.reduce_axis((0, g), name="kg")
                xsum = te.compute((rows, groups), lambda m, gi: te.sum(
                    xp[m, gi * g + rg], axis=rg), name="xsum")
                rz = te.reduce_axis((0, groups), name="gz")
                corr = te.compute((rows, n), lambda m, j: te.sum(
                    scale[j, rz].astype("float32") * zero[0][j, rz].astype("float32")
                    * xsum[m, rz], axis=rz), name="corr")
                dot = te.compute((rows, n), lambda m, j: dot[m, j] - corr[m, j], name="qdot")
            return topi.reshape(dot, lead + [n]) if lead else topi.reshape(dot, (n,))

        func, _, _ = lower_kernel(kernel, rules={anchor: rule},
                                  placeholders={problem["w_index"]: words})
        sch = s_tir.Schedule(func)
        self._schedule(sch, config, target, per_block)
        return TvmKernel(sch.mod["main"], self.name, config, packs={
            problem["w_index"]: (f"lanes{lanes}", lambda w: _pad_blocks(
                rows_to_lanes(w, bits, k, lanes), blocks))})

    @staticmethod
    def _schedule(sch: s_tir.Schedule, config: Config, target: Target, per_block: int) -> None:
        inline_injective(sch, keep={"acc", "dot", "xpad", "xsum", "corr"})
        blocks = {block_name(sch, b): b for b in root_blocks(sch)}
        acc, dot = blocks["acc"], blocks["dot"]
        tn, tm = int(config["TILE_N"]), int(config["TILE_M"])
        m, j, rl = sch.get_loops(dot)
        mo, mi = sch.split(m, [None, tm])
        jo, ji = sch.split(j, [None, tn])
        sch.reorder(jo, mo, mi, ji, rl)
        sch.compute_at(acc, mo)
        # compute_at regenerates acc's loops under mo: the spatial ones of the tile (a unit
        # extent is dropped), then the reductions (cb, cs)
        own = sch.get_loops(acc)[2:]
        spatial = (tm > 1) + (tn > 1) + 1
        tile, red = own[:spatial], own[spatial:]
        sch.reorder(*red, *tile)
        if config["PARALLEL"]:
            sch.parallel(jo)
        sch.vectorize(tile[-1])
        if config["UNROLL"]:
            for loop in tile[:-1]:
                sch.unroll(loop)
        if per_block > 1:  # the chunk loop: unrolled, its code positions become constants
            sch.unroll(red[-1])
        if red:
            sch.decompose_reduction(acc, red[0])
