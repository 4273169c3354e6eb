"""Generic lowering of the `quant` dialect: packed codes -> values -> f32 weights, in TIR.

A quantized kernel input is the packed weight (uint32 [N, ceil(K*bits/32)], the IR's rows
layout). These are the expression builders the quantized templates share: extracting a code,
decoding it (integers by sign extension, low-bit floats by moving their exponent and mantissa
bits into a float32's and scaling by 2**(127 - bias), which is exact for normal and subnormal
codes), and applying scale and zero point.
"""
from __future__ import annotations

from typing import Any

import tvm
from tvm import te

from ...ir import Operation
from ...ir.dialects import quant
from ...ir.dtypes import IntType, LowFloatType
from ...ir.packing import WORD
from ...ir.types import GroupAxis, QuantType, ZeroPoint
from .lower import RULES, Lowering
from .lower_nn import conv2d_compute
from .typed import compute

U32 = "uint32"


def _u32(v: int) -> Any:
    return tvm.tirx.const(v, U32)


def extract(words: te.Tensor, n: Any, k: Any, bits: int) -> Any:
    """Code k of row n of a rows-layout packed weight, as uint32."""
    bit = k * bits
    word, off = bit // WORD, (bit % WORD).astype(U32)
    lo = words[n, word] >> off
    # a code that straddles two words takes its high bits from the next one
    hi = tvm.tirx.if_then_else(off + _u32(bits) > _u32(WORD),
                               words[n, word + 1] << (_u32(WORD) - off), _u32(0))
    return (lo | hi) & _u32((1 << bits) - 1)


def decode(code: Any, qtype: QuantType) -> Any:
    """The f32 value of a uint32 code in the storage format; low-bit floats come out
    multiplied by `decode_factor` (folded into the scale by the callers)."""
    storage = qtype.storage
    if isinstance(storage, IntType):
        if not storage.signed:
            return code.astype("float32")
        shift = tvm.tirx.const(32 - storage.width, "int32")
        return ((code.astype("int32") << shift) >> shift).astype("float32")
    assert isinstance(storage, LowFloatType)
    b, m = storage.bits, storage.man_bits
    magnitude = (code & _u32((1 << (b - 1)) - 1)) << _u32(23 - m)
    sign = (code >> _u32(b - 1)) << _u32(31)
    return tvm.tirx.reinterpret("float32", magnitude | sign)


def decode_factor(qtype: QuantType) -> float:
    """What `decode` leaves out of a low-bit float's value: 2**(127 - bias) (1 for ints)."""
    storage = qtype.storage
    if isinstance(storage, LowFloatType):
        return 2.0 ** (127 - ((1 << (storage.exp_bits - 1)) - 1))
    return 1.0


def group_index(qtype: QuantType, n: Any, k: Any) -> tuple[Any, Any]:
    """The scale / zero-point element of weight element (n, k)."""
    g = qtype.group_size
    if qtype.axis is GroupAxis.OUT:
        return n, (0 if g == 0 else k // g)
    return (0 if g == 0 else n // g), k


def weight_at(qtype: QuantType, words: te.Tensor, scale: te.Tensor, zero: te.Tensor | None,
              n: Any, k: Any) -> Any:
    """The f32 dequantized weight element (n, k)."""
    v = decode(extract(words, n, k, qtype.bits), qtype)
    factor = decode_factor(qtype)
    if factor != 1.0:
        v = v * tvm.tirx.const(factor, "float32")
    gi = group_index(qtype, n, k)
    if zero is not None and qtype.zero_point is ZeroPoint.MIN:
        return v * scale(*gi).astype("float32") + zero(*gi).astype("float32")
    if zero is not None:
        v = v - zero(*gi).astype("float32")
    return v * scale(*gi).astype("float32")


def lower_dequantize(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """quant.dequantize: every weight element, materialised."""
    words, scale, *zero = args
    qtype = op.weight.type.dtype
    return compute(lo.shape(op.result.type), lambda n, k: weight_at(
        qtype, words, scale, zero[0] if zero else None, n, k), name="dequantize")


def lower_linear(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """quant.linear: x @ W^T with W dequantized inside the reduction."""
    x, words, scale, *zero = args
    qtype = op.weight.type.dtype
    k = te.reduce_axis((0, op.weight.type.shape[1]), name="k")
    z = zero[0] if zero else None
    if op.act == "i8":
        return _linear_i8(op, x, words, scale, z, lo)
    return compute(lo.shape(op.result.type), lambda *i: te.sum(
        x(*i[:-1], k) * weight_at(qtype, words, scale, z, i[-1], k), axis=k), name="qlinear")


def _linear_i8(op: Operation, x: Any, words: te.Tensor, scale: te.Tensor,
               zero: te.Tensor | None, lo: Lowering) -> te.Tensor:
    """quant.linear with act=i8 on any host (the op's semantics, in f32: a block's integer
    codes times its int8 activations sum exactly): (d * xq) @ (w - m)^T + x @ m^T."""
    qtype = op.weight.type.dtype
    kdim = int(op.weight.type.shape[1])
    blocks = -(-kdim // quant.ACT_BLOCK)
    lead = list(x.shape[:-1])
    f32 = "float32"

    def xat(idx: list, kk: Any) -> Any:
        return tvm.tirx.if_then_else(kk < kdim, x(*idx, tvm.tirx.min(kk, kdim - 1)),
                                     tvm.tirx.const(0.0, f32))

    r = te.reduce_axis((0, quant.ACT_BLOCK), name="r")
    amax = compute((*lead, blocks), lambda *i: te.max(tvm.tirx.abs(xat(
        list(i[:-1]), i[-1] * quant.ACT_BLOCK + r)), axis=r), name="act_amax")
    rk = te.reduce_axis((0, kdim), name="rk")
    bad = compute(tuple(lead), lambda *i: te.max(tvm.tirx.Select(
        tvm.tirx.isfinite(x(*i, rk)), tvm.tirx.const(0.0, f32), tvm.tirx.const(1.0, f32)),
        axis=rk), name="act_bad")
    one, zero_f = tvm.tirx.const(1.0, f32), tvm.tirx.const(0.0, f32)

    def dx(idx: list, kk: Any) -> Any:  # d * xq
        d = amax(*idx, kk // quant.ACT_BLOCK) / tvm.tirx.const(127.0, f32)
        inv = tvm.tirx.Select(d >= tvm.tirx.const(quant.ACT_TINY, f32), one / d, zero_f)
        q = tvm.tirx.max(tvm.tirx.min(tvm.tirx.nearbyint(x(*idx, kk) * inv),
                                      tvm.tirx.const(127.0, f32)), tvm.tirx.const(-127.0, f32))
        return q * d

    k = te.reduce_axis((0, kdim), name="k")
    minimum = zero if qtype.zero_point is ZeroPoint.MIN else None

    def term(i: tuple, kk: Any) -> Any:
        n, idx = i[-1], list(i[:-1])
        if minimum is None:
            return dx(idx, kk) * weight_at(qtype, words, scale, zero, n, kk)
        gi = group_index(qtype, n, kk)
        m = minimum(*gi).astype(f32)
        return dx(idx, kk) * (weight_at(qtype, words, scale, zero, n, kk) - m) + x(*idx, kk) * m

    y = compute(lo.shape(op.result.type), lambda *i: te.sum(term(i, k), axis=k),
                name="qlinear_i8")
    return compute(lo.shape(op.result.type), lambda *i: tvm.tirx.Select(
        bad(*i[:-1]) > zero_f, tvm.tirx.const(float("nan"), f32), y(*i)), name="qlinear_act")


def lower_conv2d(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """quant.conv2d: the direct convolution with each weight element dequantized in place."""
    x, words, scale, *zero = args
    qtype = op.weight.type.dtype
    z = zero[0] if zero else None
    _, cin_g, kh, kw = op.weight_oihw()
    return conv2d_compute(op, x, lambda oc, rc, ry, rx: weight_at(
        qtype, words, scale, z, oc, (rc * kh + ry) * kw + rx), (kh, kw, cin_g), lo)


RULES[quant.DequantizeOp.name] = lower_dequantize
RULES[quant.Conv2dOp.name] = lower_conv2d
RULES[quant.LinearOp.name] = lower_linear
