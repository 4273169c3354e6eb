"""`qdense`: the fused dequant-GEMV/GEMM template for `quant.linear` (any width 1..8, low-bit
floats), codes unpacked in registers and accumulated in f32.

The weight is re-packed at compile time into the lanes layout (`ir.packing.pack_lanes` with
one lane per f32 vector lane): a vector load gives every lane the same 32 bits of its own code
stream, so each code is extracted with the same constant shifts in every lane, and position i
of a block multiplies the contiguous activations [i*lanes, (i+1)*lanes).

With per-output-channel scales the scale and zero point come out of the inner loop:

    y[m, n] = sum_g s[n, g] * sum_{k in g} (w[n, k] - d[n, g]) x[m, k]

where w is the decoded code and d what it is off its integer value (the zero point, and the
offsets the decodes below add). Per lane the chunk's activations are summed once per call
(`xlane`), so a chunk (a group, or a block of a longer group) costs a decode and one FMA per
weight vector, one FMA for d and one for the scale; the lanes are added once per output, as
a tree. K is padded with zero codes (and zero activations) to whole blocks of 32 * lanes.

How integer codes become f32 (the DECODE knob):
- `subnormal` (the default on CPUs that handle subnormal floats at full speed, such as AMD
  Zen): the code is masked where it lies in its word, and the word read
  as a subnormal float, u * 2**(p - 149) for a code at bit p: one AND per weight (codes in
  the top half of a word are masked out of the word shifted down by 16, one shift per word).
  The activations are pre-scaled once per call by 2**(126 - e - p), e the row's largest
  exponent, so the products are u * x * 2**(-23 - e): exact, normal floats, the scale undone
  on the output. It needs subnormals to be honoured; a thread that treats them as zero (DAZ,
  `torch.set_flush_denormal(True)`) gets NaN outputs from a probe, never silent zeros.
- `magic` (the default where subnormals cost a microcode assist, as on Intel cores: measured
  once per process, `runtime.host.subnormal_penalty`): the code is moved to the top of the
  mantissa of 1.0 (1 + u / 2**bits): a shift and one ternary-logic op per weight; 2**bits
  rides on the activations, the offset on d.
- `convert`: shift, mask and an int-to-float conversion.
Low-bit floats decode by moving their bits into a float32 (exact); the constant factor that
leaves out rides on the activations.

Every decode scales each activation row once per call by a power of two, 2**-e with e the
row's largest exponent (with the constant factors above folded in), and the sums are scaled
back on the output: products, chunk sums and d * x stay well inside the f32 range for any
activations, subnormal to the largest float: an output is inf only where the true one
overflows, and tiny activations (or a low-bit float's tiny decoded values) keep full precision.

Knobs: TILE_N (weight rows sharing each activation vector), TILE_M (activation rows sharing
each decoded weight vector), UNROLL (unroll the positions of a chunk), PARALLEL, DECODE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te, topi

from ...ir import Operation
from ...ir.dialects import quant
from ...ir.dialects.kernel import FusedOp
from ...ir.dtypes import IntType
from ...ir.packing import CHUNK, WORD, lane_blocks, rows_to_lanes
from ...ir.types import GroupAxis, QuantType, ZeroPoint
from ..template import Config, Knob, KnobSpace, Problem, Target, register_template
from .lower import Lowering, lower_kernel
from .lower_quant import decode, decode_factor
from .schedule import block_name, inline_injective, root_blocks
from .target import host_target, vector_lanes
from .templates import TvmKernel, TvmTemplate, _constant_input, _static, inlinable
from .typed import compute, reorder

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


def _chain(terms: list) -> Any:
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _tree(terms: list, combine: Any = None) -> Any:
    """The terms added (or combined by `combine`) pairwise, as a tree."""
    while len(terms) > 1:
        terms = [(combine(terms[i], terms[i + 1]) if combine else terms[i] + terms[i + 1])
                 if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


MAGIC_ONE = 0x3F800000  # the bits of 1.0f: a code in the top mantissa bits gives 1 + code/2**b


def _signed_codes(qtype: QuantType) -> bool:
    """Whether the codes are two's complement integers."""
    storage = qtype.storage
    return isinstance(storage, IntType) and storage.signed


def _magic(code: Any, qtype: QuantType) -> Any:
    """1 + u / 2**bits as f32 with no conversion instruction: the code moved into the top of
    the mantissa of 1.0, where u is the unsigned code, or for signed codes the code with its
    sign bit flipped (two's complement c -> c + 2**(bits-1)); one XOR does the flip and sets
    the exponent, as the bits are disjoint."""
    bits = qtype.bits
    top = MAGIC_ONE | ((1 << 22) if _signed_codes(qtype) else 0)
    return tvm.tirx.reinterpret("float32", (code << tvm.tirx.const(23 - bits, U32))
                                ^ tvm.tirx.const(top, U32))


def _magic_offset(qtype: QuantType) -> float:
    """What to subtract from 2**bits * _magic(code) for the integer code: 2**bits, plus the
    2**(bits-1) that the sign flip added to signed codes."""
    bits = qtype.bits
    return float((1 << bits) + ((1 << (bits - 1)) if _signed_codes(qtype) else 0))


def _placement(i: Any, bits: int) -> tuple[Any, Any, Any]:
    """Where code i of a lane lies: (word, bit offset in the word, whether it straddles two
    words), as numbers for a numeric i, as expressions (folded once unrolled) otherwise."""
    bit = i * bits
    word, off = bit // WORD, bit % WORD
    return word, off, off + bits > WORD


def _if(cond: Any, then: Any, other: Any) -> Any:
    """then/other by a condition that is a number (chosen now) or an expression (a Select)."""
    return (then if cond else other) if isinstance(cond, bool) else \
        tvm.tirx.Select(cond, then, other)


def _subnormal(words: te.Tensor, n: Any, blk: Any, i: Any, lane: Any, qtype: QuantType) -> Any:
    """u * 2**(p - 149) as f32, exactly: the code masked where it lies (bit p of its word, if
    it ends below the exponent field at bit 23) and the word read as a subnormal float, one AND
    per weight; a code in the top half ends below bit 23 once the word is shifted down by 16,
    one shift per word that all its top codes share; a code split over two words is put
    together at bit 0. Signed codes get their sign bit flipped by an XOR that the ternary-logic
    instruction merges with the AND: u = c + 2**(bits-1). p is `_subnormal_bit`."""
    bits = qtype.bits
    mask = tvm.tirx.const((1 << bits) - 1, U32)
    word, off, straddle = _placement(i, bits)
    high = off + bits > 23

    def u32(v: Any) -> Any:
        return tvm.tirx.const(v, U32) if isinstance(v, int) else v.astype(U32)
    lo = words[n, blk, word, lane]
    joined = ((lo >> u32(off)) | (words[n, blk, tvm.tirx.min(word + 1, bits - 1), lane]
                                  << u32(WORD - off))) & mask
    # the bit the code starts at in the word it is masked from (unused when it straddles)
    at = _if(high, tvm.tirx.max(off - 16, 0), off) if not isinstance(off, int) else \
        (max(off - 16, 0) if high else off)
    source = _if(high, lo >> tvm.tirx.const(16, U32), lo)
    raw = _if(straddle, joined, source & (mask << u32(at)))
    if _signed_codes(qtype):
        sign = tvm.tirx.const(1 << (bits - 1), U32)
        raw = raw ^ _if(straddle, sign, sign << u32(at))
    return tvm.tirx.reinterpret("float32", raw)


def _subnormal_bit(i: Any, bits: int) -> Any:
    """The bit p where `_subnormal` leaves code i of a lane."""
    _, off, straddle = _placement(i, bits)
    return _if(straddle, tvm.tirx.const(0, "int32"), _if(off + bits > 23, off - 16, off))


def _pow2(e: Any) -> Any:
    """2**e as f32 for an int32 e in [-126, 127], from its bits."""
    return tvm.tirx.reinterpret("float32", ((e + 127).astype(U32)) << tvm.tirx.const(23, U32))


def _pow2_half(e: Any, h: Any) -> Any:
    """Half h (0 or 1) of 2**e, for an int32 e in [-252, 254]: two normal powers of two of the
    same sign whose product is 2**e, which need not be a normal float itself (and a subnormal
    factor would read as 0 on a thread that flushes them); multiplying by both is exact
    unless the result is subnormal or overflows."""
    half = e >> tvm.tirx.const(1, "int32")
    return _pow2(tvm.tirx.Select(h == 0, half, e - half))


def _pad_blocks(words: Any, blocks: int) -> Any:
    """Lanes-layout words [N, b, bits, lanes] padded with zero blocks to `blocks`."""
    extra = blocks - words.shape[1]
    if extra == 0:
        return words
    pad = np.zeros((words.shape[0], extra) + words.shape[2:], words.dtype)
    return np.ascontiguousarray(np.concatenate([words, pad], axis=1))


@dataclass(frozen=True, slots=True)
class _Blocking:
    """How qdense cuts K: blocks of CHUNK * lanes codes (K padded with zero codes to whole
    blocks, or to whole groups of whole blocks), scale groups of `g` codes, and chunks (a group,
    or a block of a longer group) of `positions` vectors, `per_block` chunks to a block."""

    k: int
    lanes: int
    block: int
    blocks: int
    g: int
    groups: int
    chunk: int
    per_block: int
    positions: int

    @classmethod
    def of(cls, qtype: QuantType, k: int, lanes: int) -> _Blocking:
        """The blocking of a weight of in_features `k` for `lanes` f32 lanes."""
        block = CHUNK * lanes
        blocks = lane_blocks(k, lanes)
        g = qtype.group_size if 0 < qtype.group_size < k else blocks * block
        if g > block:  # whole groups of whole blocks
            blocks = -(-k // g) * (g // block)
        chunk = min(g, block)  # elements of one chunk: a group, or a block of a longer group
        return cls(k=k, lanes=lanes, block=block, blocks=blocks, g=g, groups=-(-k // g),
                   chunk=chunk, per_block=block // chunk, positions=chunk // lanes)

    @property
    def kp(self) -> int:
        """K padded to whole blocks."""
        return self.blocks * self.block

    @property
    def full(self) -> int:
        """Blocks that hold only codes of K (the rest is the tail block, if any)."""
        return self.k // self.block if self.g <= self.block else self.blocks

    @property
    def tail(self) -> int:
        """Chunks of the last, partial block that hold codes of K: only those are read (a K
        of 576 in blocks of 512 reads 576 + 64 codes a row, not 1024)."""
        return -(-(self.k - self.full * self.block) // self.chunk) if self.g <= self.block \
            else 0

    def group_of(self, cb: Any, cs: Any) -> Any:
        """The scale group of chunk cs of block cb (padding chunks past K: any group will do)."""
        return tvm.tirx.min((cb * self.block + cs * self.chunk) // self.g, self.groups - 1)


@dataclass(frozen=True, slots=True)
class _Decode:
    """How the DECODE knob turns a code into f32: the decoded weights times `factor` (folded
    into the activations) are the codes' values off by `offset` (corrected with the zero
    point)."""

    mode: str
    qtype: QuantType
    factor: float
    offset: float

    @classmethod
    def of(cls, mode: str, qtype: QuantType) -> _Decode:
        """The decode of `qtype`'s codes by `mode` (subnormal, magic or convert)."""
        bits = qtype.bits
        if mode == "magic":  # w = 1 + u / 2**bits; the 2**bits and offset ride on scale, zero
            return cls(mode, qtype, float(1 << bits), _magic_offset(qtype))
        if mode == "subnormal":  # w = u * 2**(p-149), x pre-scaled by 2**(126-e-p): _Units
            return cls(mode, qtype, 1.0, float(1 << (bits - 1)) if _signed_codes(qtype) else 0.0)
        return cls(mode, qtype, decode_factor(qtype), 0.0)

    def weight(self, words: te.Tensor, j: Any, cb: Any, i: Any, lane: Any) -> Any:
        """The decoded weight at stream position i of a lane of row j, block cb."""
        if self.mode == "subnormal":
            return _subnormal(words, j, cb, i, lane, self.qtype)
        code = _code(words, j, cb, i, lane, self.qtype.bits)
        if self.mode == "magic":
            return _magic(code, qtype=self.qtype)
        return decode(code, qtype=self.qtype)


@dataclass(frozen=True, slots=True)
class _Units:
    """The activations the decoded weights multiply (`xs`), and the unit the chunk sums come
    out in, per row: 2**(shift + e), e the row's largest exponent (|x| < 2**(e + 1)); the sums
    are their true value divided by it. Scaling each row by its own power of two keeps the
    products and sums well inside the f32 range whatever the activations' magnitude, from
    subnormal to near the largest float; `shift` is 23 with the subnormal decode (products
    u * x * 2**(-23 - e)), 0 otherwise. `down` [rows, 2] holds the halves of 2**-e, `up` those
    of the unit (`_pow2_half`), computed once per row."""

    xs: te.Tensor
    down: te.Tensor
    up: te.Tensor
    shift: int

    def to_true(self, v: Any, m: Any) -> Any:
        """v, in the units of row m, as its true value."""
        return v * self.up[m, 0] * self.up[m, 1]

    def normalized(self, v: Any, m: Any) -> Any:
        """A true value v of row m times 2**-e."""
        return v * self.down[m, 0] * self.down[m, 1]

    def from_true(self, v: Any, m: Any) -> Any:
        """A true value v of row m in the row's units."""
        v = self.normalized(v, m)
        return v * tvm.tirx.const(2.0 ** -self.shift, "float32") if self.shift else v


@dataclass(frozen=True, slots=True)
class _ChunkTerm:
    """One (row m, output j, block cb, chunk cs, lane) term of the accumulation: the chunk's
    decoded weights times its activations, less d * x, d what each code is off its integer
    value (zero point, sign flip, magic offset), when there is such a d (`xlane` is then the
    chunk's activations summed per lane, in the units of the chunk sums)."""

    cut: _Blocking
    decode: _Decode
    words: te.Tensor
    xs: te.Tensor
    xlane: te.Tensor | None
    zero: te.Tensor | None

    def __call__(self, m: Any, j: Any, cb: Any, cs: Any, lane: Any) -> Any:
        total = self.chunk_sum(m, j, cb, cs, lane)
        if self.xlane is None:
            return total
        return total - self.off_by(j, self.cut.group_of(cb, cs)) * \
            self.xlane[m, cb * self.cut.per_block + cs, lane]

    def chunk_sum(self, m: Any, j: Any, cb: Any, cs: Any, lane: Any) -> Any:
        """The chunk's decoded weights times its activations, in lane `lane`."""
        cut = self.cut
        terms = []
        for p in range(cut.positions):
            # cs is unrolled by the schedule, so i is a constant there too
            i = cs * cut.positions + p if cut.per_block > 1 else p
            w = self.decode.weight(self.words, j, cb, i, lane)
            terms.append(w * self.xs[m, cb * cut.block + i * cut.lanes + lane])
        # two interleaved chains: the FMAs of a chunk need not wait on each other
        chains = [terms[0::2], terms[1::2]] if len(terms) > 1 else [terms]
        return _tree([_chain(c) for c in chains])

    def off_by(self, j: Any, gi: Any) -> Any:
        """d of output j in group gi: the zero point, plus the decode's offset."""
        d = tvm.tirx.const(self.decode.offset, "float32")
        if self.zero is None:
            return d
        z = self.zero[j, gi].astype("float32")
        return z if not self.decode.offset else z + d


@dataclass(frozen=True, slots=True)
class _QLinear:
    """qdense's lowering of its quant.linear: x @ dequantize(W)^T from the lanes-layout `words`
    [N, blocks, bits, lanes], accumulated per lane in f32, the lanes added once per output."""

    n: int
    cut: _Blocking
    decode: _Decode
    words: te.Tensor

    def __call__(self, op: Operation, args: list, lo: Lowering) -> te.Tensor:
        x, _, scale, *zero = args
        lead = list(x.shape[:-1])
        rows = 1
        for d in lead:
            rows = rows * d
        k, cut, n = self.cut.k, self.cut, self.n
        flat = topi.reshape(x, (rows, k)) if lead else topi.reshape(x, (1, k))
        xp = compute((rows, cut.kp), lambda m, kk: tvm.tirx.if_then_else(
            kk < k, flat[m, tvm.tirx.min(kk, k - 1)], tvm.tirx.const(0.0, "float32")),
            name="xpad")
        units = self.units(xp, rows)
        # the correction d * x is one more FMA per chunk: the chunk's activations are summed
        # per lane once per call (in the units of the chunk sums, scaled by powers of two)
        xlane = self.lane_sums(xp, rows, units) if zero or self.decode.offset else None
        # zero_point=min: w = v * s + m, so the chunk adds m * (its activations) after the
        # scale; the zero-point operand is then no offset of the codes
        minimum = zero[0] if zero and self.decode.qtype.zero_point is ZeroPoint.MIN else None
        term = _ChunkTerm(cut, self.decode, self.words, units.xs, xlane,
                          zero[0] if zero and minimum is None else None)

        def chunk(m: Any, j: Any, cb: Any, cs: Any, lane: Any) -> Any:
            gi = cut.group_of(cb, cs)
            value = scale[j, gi].astype("float32") * term(m, j, cb, cs, lane)
            if minimum is None or xlane is None:
                return value
            return value + minimum[j, gi].astype("float32") * \
                xlane[m, cb * cut.per_block + cs, lane]

        parts = []
        if cut.full:
            rcb = te.reduce_axis((0, cut.full), name="cb")
            rcs = te.reduce_axis((0, cut.per_block), name="cs")
            parts.append(compute((rows, n, cut.lanes), lambda m, j, lane: te.sum(
                chunk(m, j, rcb, rcs, lane), axis=[rcb, rcs]), name="acc"))
        if cut.tail:  # the chunks of the last block that hold codes, the padding skipped
            rct = te.reduce_axis((0, cut.tail), name="ct")
            parts.append(compute((rows, n, cut.lanes), lambda m, j, lane: te.sum(
                chunk(m, j, cut.full, rct, lane), axis=[rct]), name="acc_tail"))
        # the lanes are added as a tree (a reduction loop would be a serial chain of adds)
        dot = compute((rows, n), lambda m, j: _tree([
            _tree([p[m, j, lane] for p in parts]) for lane in range(cut.lanes)]), name="dot")
        dot = self.in_true_units(dot, xp, rows, units)
        return topi.reshape(dot, lead + [n]) if lead else topi.reshape(dot, (n,))

    def units(self, xp: te.Tensor, rows: Any) -> _Units:
        """The activations the decoded weights multiply, and the unit of the chunk sums: each
        row scaled by 2**-e, e its largest exponent, so that the decoded weights times the
        activations are the true products over 2**e, never overflowing or underflowing."""
        cut, decode = self.cut, self.decode
        # |x| maximised per lane (a serial reduction over the row is as slow as the whole
        # GEMV of a small layer), then over the lanes as a tree
        lanes = cut.lanes
        rk = te.reduce_axis((0, cut.kp // lanes), name="kx")
        xmax_lanes = compute((rows, lanes), lambda m, lane: te.max(
            tvm.tirx.abs(xp[m, rk.var * lanes + lane]), axis=rk), name="xmax_lanes")
        xmax = compute((rows,), lambda m: _tree([xmax_lanes[m, lane] for lane in range(lanes)],
                                                tvm.tirx.max), name="xmax")
        # e in [-127, 127] (-127 for a row of zeros or subnormals; inf and NaN give 127)
        xexp = compute((rows,), lambda m: tvm.tirx.min(
            (tvm.tirx.reinterpret(U32, xmax[m]) >> tvm.tirx.const(23, U32))
            .astype("int32") - 127, 127), name="xexp")
        shift = 23 if decode.mode == "subnormal" else 0
        down = compute((rows, 2), lambda m, h: _pow2_half(-xexp[m], h), name="xdown")
        up = compute((rows, 2), lambda m, h: _pow2_half(xexp[m] + shift, h), name="xup")
        units = _Units(xp, down, up, shift)
        if decode.mode == "subnormal":
            # x * 2**(126 - e - p) for |x| < 2**(e+1) over the row: below 2**127 for every
            # placement p, and the products come out as u * x * 2**(-23 - e), normal floats
            bits = decode.qtype.bits
            xs = compute((rows, cut.kp), lambda m, kk: units.normalized(xp[m, kk], m) * _pow2(
                126 - _subnormal_bit((kk % cut.block) // cut.lanes, bits)), name="xscaled")
        else:
            # x * factor * 2**-e, the decode's constant factor folded in: the products are the
            # true ones (code, zero point and offsets) times 2**-e, of the magnitude of codes
            factor = tvm.tirx.const(decode.factor, "float32")
            xs = compute((rows, cut.kp), lambda m, kk: units.normalized(xp[m, kk], m) * factor,
                         name="xscaled")
        return _Units(xs, down, up, shift)

    def lane_sums(self, xp: te.Tensor, rows: Any, units: _Units) -> te.Tensor:
        """Each chunk's activations summed per lane, in the units of the chunk sums (each
        scaled before the sum, which then cannot overflow)."""
        cut = self.cut
        return compute((rows, cut.blocks * cut.per_block, cut.lanes), lambda m, c, lane: _chain(
            [units.from_true(xp[m, c * cut.chunk + p * cut.lanes + lane], m)
             for p in range(cut.positions)]), name="xlane")

    def in_true_units(self, dot: te.Tensor, xp: te.Tensor, rows: Any,
                      units: _Units) -> te.Tensor:
        """The dot products times their unit."""
        n = self.n
        if self.decode.mode == "subnormal":
            # NaN if this thread treats subnormals as zero (DAZ, e.g.
            # torch.set_flush_denormal(True)): then every weight would read as 0
            probe = tvm.tirx.reinterpret("float32", tvm.tirx.const(1, U32) + (
                tvm.tirx.reinterpret(U32, xp[0, 0]) >> tvm.tirx.const(31, U32)))
            live = probe * tvm.tirx.const(2.0 ** 126, "float32") > tvm.tirx.const(
                0.0, "float32")
            return compute((rows, n), lambda m, j: tvm.tirx.Select(
                live, units.to_true(dot[m, j], m), tvm.tirx.const(float("nan"), "float32")),
                name="dot_scaled")
        return compute((rows, n), lambda m, j: units.to_true(dot[m, j], m), name="dot_scaled")


def default_decode(int_codes: bool, target: Target) -> str:
    """The DECODE an untuned kernel runs: `subnormal` (one AND per weight) where this CPU
    handles subnormal floats at full speed, `magic` where they cost a microcode assist (30-50x
    on Intel cores); low-bit float codes always `convert`."""
    if not int_codes:
        return "convert"
    return "magic" if target.attrs.get("slow_subnormals", True) else "subnormal"


@register_template
class QDense(TvmTemplate):
    """out = epilogue(x @ dequantize(W)^T) for a packed constant W: fused dequant-GEMV/GEMM."""

    name = "qdense"
    version = 2
    space = KnobSpace(Knob("TILE_N", (4, 1, 2, 8)),
                      Knob("TILE_M", (1, 2, 4)),
                      Knob("UNROLL", (True, False)),
                      Knob("PARALLEL", (True, False)),
                      Knob("DECODE", ("subnormal", "magic", "convert")))
    key = ("M", "N", "K", "qtype", "epilogue")

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        anchors = [o for o in op.body_ops if isinstance(o, quant.LinearOp)]
        if len(anchors) != 1 or any(not inlinable(o) for o in op.body_ops
                                    if o is not anchors[0]):
            return None
        anchor = anchors[0]
        if anchor.act != "f32":  # int8 activations: qdense_i8, or the generic lowering
            return None
        qtype = anchor.weight.type.dtype
        w_index, *others = [_constant_input(op, v) for v in anchor.operands[1:]]
        x = anchor.x
        n, k = anchor.weight.type.shape
        if (w_index is None or any(i is None for i in others) or not _static((n, k))
                or x.type.rank < 1 or not _static(x.type.shape[1:])):
            return None
        if not fast_groups(qtype, k, vector_lanes(host_target())):
            return None
        rows = x.type.shape[0] if x.type.rank > 1 else 1
        for d in x.type.shape[1:-1]:
            rows = rows * d
        epilogue = ",".join(o.name.split(".")[1] for o in op.body_ops if o is not anchor)
        return Problem(self.name, {"M": str(rows), "N": n, "K": k, "qtype": str(qtype),
                                   "epilogue": epilogue, "w_index": w_index,
                                   "int_codes": isinstance(qtype.storage, IntType),
                                   "row_factor": rows if isinstance(rows, int) else 1}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        return (int(problem["N"]) % int(config["TILE_N"]) == 0
                and int(problem["row_factor"]) % int(config["TILE_M"]) == 0
                and (config["DECODE"] == "convert" or bool(problem["int_codes"])))

    def default_config(self, problem: Problem, target: Target) -> Config:
        # one weight row at a time measured fastest for GEMV here (no spills, the x vector
        # loads fold into the FMAs); several activation rows share each decoded weight vector
        # (a batch-8 decode step decoded every weight 8 times with TILE_M=1); the tuner tries
        # the other tiles
        rows = int(problem["row_factor"])
        tile_m = next(t for t in (4, 2, 1) if rows % t == 0)
        return Config({"TILE_N": 1, "TILE_M": tile_m,
                       "UNROLL": True,
                       "PARALLEL": int(problem["N"]) * int(problem["K"]) >= 1 << 16,
                       "DECODE": default_decode(bool(problem["int_codes"]), target)})

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        kernel: FusedOp = problem.kernel_op
        anchor = next(o for o in kernel.body_ops if isinstance(o, quant.LinearOp))
        qtype: QuantType = anchor.weight.type.dtype
        n, k, bits = int(problem["N"]), int(problem["K"]), qtype.bits
        lanes = vector_lanes(target)
        cut = _Blocking.of(qtype, k, lanes)
        words = te.placeholder((n, cut.blocks, bits, lanes), U32, name="packed")
        rule = _QLinear(n, cut, _Decode.of(str(config["DECODE"]), qtype), words)
        w_index = int(problem["w_index"])
        func, _, _ = lower_kernel(kernel, rules={anchor: rule}, placeholders={w_index: words})
        sch = s_tir.Schedule(func)
        self._schedule(sch, config, target, cut.per_block)
        blocks = cut.blocks
        return TvmKernel(sch.mod["main"], self.name, config, packs={
            w_index: (f"lanes{lanes}", lambda w: _pad_blocks(
                rows_to_lanes(w, bits, k, lanes), blocks))})

    @staticmethod
    def _schedule(sch: s_tir.Schedule, config: Config, target: Target, per_block: int) -> None:
        inline_injective(sch, keep={"acc", "acc_tail", "dot", "xpad", "xlane", "xmax",
                                    "xscaled", "xdown", "xup"})
        blocks = {block_name(sch, b): b for b in root_blocks(sch)}
        dot, xmax = blocks["dot"], blocks["xmax_lanes"]
        _, lane, kx = sch.get_loops(xmax)
        reorder(sch, kx, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(xmax, kx)
        # the per-call passes over the activations, a vector at a time
        _, kk = sch.get_loops(blocks["xscaled"])
        sch.vectorize(sch.split(kk, [None, vector_lanes(target)])[1])
        if "xlane" in blocks:
            sch.vectorize(sch.get_loops(blocks["xlane"])[-1])
        tn, tm = int(config["TILE_N"]), int(config["TILE_M"])
        m, j = sch.get_loops(dot)
        mo, mi = sch.split(m, [None, tm])
        jo, ji = sch.split(j, [None, tn])
        reorder(sch, jo, mo, mi, ji)
        if config["PARALLEL"]:
            sch.parallel(jo)
        for name in ("acc", "acc_tail"):
            if name not in blocks:
                continue
            acc = blocks[name]
            sch.compute_at(acc, mo)
            # compute_at regenerates acc's loops under mo: the spatial ones of the tile (a
            # unit extent is dropped), then the reductions ((cb, cs), or the tail's ct)
            own = sch.get_loops(acc)[2:]
            spatial = (tm > 1) + (tn > 1) + 1
            tile, red = own[:spatial], own[spatial:]
            reorder(sch, *red, *tile)
            sch.vectorize(tile[-1])
            if config["UNROLL"]:
                for loop in tile[:-1]:
                    sch.unroll(loop)
            # the chunk loop: unrolled, its code positions become constants
            if red and (per_block > 1 or name == "acc_tail"):
                sch.unroll(red[-1])
            if red:
                sch.decompose_reduction(acc, red[0])
