"""The `quant` dialect: quantized weights, quantize/dequantize, and a linear layer on them.

A quantized weight is a 2-d tensor `tensor<NxKx!quant.weight<...>>` ([out, in], as torch's
linear weight) whose element type (`QuantType`) records the storage format (iN/uN of 1..8 bits,
or a low-bit float fBeEmM), the group size, the grouping axis, the scale dtype and the
zero-point mode. The interpreter holds such a tensor as its bit codes (uint8, shape [N, K],
the format's `to_bits`); a module weight holds it packed (`ir.packing` rows layout, uint32
[N, ceil(K*bits/32)]) and `graph.constant` unpacks it.

Scales (and zero points) come as separate operands, one per group:

- `axis=out` (per output channel, the usual GPTQ/AWQ grouping): every output channel n has its
  own scales, one per run of `group` consecutive input channels: shape [N, ceil(K/group)].
- `axis=in` (per input channel, AdaDim's alternative): every input channel k has its own
  scales, one per run of `group` consecutive output channels: shape [ceil(N/group), K].
- `group=0` means one group over the whole axis (per channel): [N, 1] or [1, K].
- When K (axis=out) or N (axis=in) is not a multiple of the group, the last group is shorter:
  it holds the remaining channels, and its scale was chosen for them alone.

Semantics (f32 throughout): `dequantize` is w = (decode(q) - z) * s, where decode gives the
format's value of the code and z is 0 for symmetric weights, or, for `zero_point=min` (a
scale and a minimum per group, as llama.cpp's Q4_1 stores them), w = decode(q) * s + m with
the minimum m in the zero-point operand (computed in that order, so that a GGUF file's weights
dequantize bit for bit as gguf's own dequantizer gives them); `quantize` is
q = clamp(round_half_even(x / s + z)) for integer storage, and the format's round-to-nearest-
even, saturating cast of x / s + z for low-bit floats (a zero scale gives code of 0 + z).
`quant.linear` is x @ dequantize(w)^T; with `act="i8"` (W4A8/W8A8, as llama.cpp's vector dots
run) its activations are quantized first, per row in blocks of `ACT_BLOCK` = 32 along K:
d = max|x| / 127 over the block, xq = clamp(round_half_even(x * (1/d)), -127, 127) (0 where
d < 2**-126, the smallest normal float), and the integer part of each weight (its code, less
an integer zero point) multiplies d * xq while a `zero_point=min` weight's minimum multiplies
the exact x (so the minimum costs no precision): y = (d * xq) @ (w - m)^T + x @ m^T, m the
expanded minimum (0 for other weights).
Integer codes times xq sum exactly in int32 over a block, which is what VNNI's vpdpbusd does; a
NaN or an infinite activation makes every output of its row NaN. `quant.conv2d` is graph.conv2d
of x by dequantize(w) reshaped to OIHW: its quantized weight is the conv's OIHW weight flattened to
[O, I/groups * KH * KW] (input channel, then kernel row, then column), whatever the layout of
its input (`layout` NCHW or NHWC, as graph.conv2d), with the kernel size as an attribute.
"""
from __future__ import annotations

import numpy as np

from ...errors import VerifyError
from ..core import Anchor, Operation, Trait, Value, attr, register_op
from ..dtypes import DType, IntType, f32
from ..interpreter import EvalContext
from ..types import Dim, GroupAxis, QuantType, TensorType, ZeroPoint, dims_equal, format_dim
from .graph.linalg import LAYOUT_ATTR, Window2dOp, conv2d_oihw, layout_shape


def scale_shape(qtype: QuantType, shape: tuple[Dim, Dim]) -> tuple[Dim, Dim]:
    """Shape of the scales (and zero points) of a quantized [N, K] weight."""
    n, k = shape
    g = qtype.group_size
    if qtype.axis is GroupAxis.OUT:
        return (n, 1 if g == 0 else -(-k // g))
    return (1 if g == 0 else -(-n // g), k)


def zero_dtype(qtype: QuantType) -> DType | None:
    """Element type of the zero points: u8/i8 (of the storage's signedness) holding values in
    the storage range (int), the scale type (float), or None for symmetric weights."""
    if qtype.zero_point is ZeroPoint.INT:
        return IntType(8, qtype.storage.is_signed)
    if qtype.zero_point in (ZeroPoint.FLOAT, ZeroPoint.MIN):
        return qtype.scale_dtype
    return None


def expand_groups(param: np.ndarray, qtype: QuantType, shape: tuple[int, int]) -> np.ndarray:
    """Per-group parameters [N, G] or [G, K] repeated out to every element of [N, K]."""
    n, k = shape
    g = qtype.group_size
    p = np.asarray(param, np.float32)
    if qtype.axis is GroupAxis.OUT:
        return np.broadcast_to(p, (n, k)) if g == 0 else np.repeat(p, g, axis=1)[:, :k]
    return np.broadcast_to(p, (n, k)) if g == 0 else np.repeat(p, g, axis=0)[:n]


def decode(codes: np.ndarray, qtype: QuantType) -> np.ndarray:
    """Values of bit codes in the storage format, as float32."""
    return np.asarray(qtype.storage.from_bits(codes), np.float32)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
               qtype: QuantType) -> np.ndarray:
    """w = (decode(q) - z) * s, in float32, for codes [N, K]."""
    shape = codes.shape
    v = decode(codes, qtype)
    if qtype.zero_point is ZeroPoint.MIN and zero is not None:
        return v * expand_groups(scale, qtype, shape) + expand_groups(zero, qtype, shape)
    if zero is not None:
        v = v - expand_groups(zero, qtype, shape)
    return v * expand_groups(scale, qtype, shape)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
             qtype: QuantType) -> np.ndarray:
    """Codes of x [N, K]: round(x / s + z) clamped to the storage range (or the low-bit
    float's saturating cast), as the format's bit codes."""
    shape = x.shape
    s = expand_groups(scale, qtype, shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(s != 0, np.asarray(x, np.float32) / s, np.float32(0))
    if qtype.zero_point is ZeroPoint.MIN and zero is not None:  # (x - m) / s
        s = expand_groups(scale, qtype, shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(s != 0, (np.asarray(x, np.float32) - expand_groups(
                zero, qtype, shape)) / s, np.float32(0))
    elif zero is not None:
        t = t + expand_groups(zero, qtype, shape)
    storage = qtype.storage
    if isinstance(storage, IntType):
        t = np.clip(np.rint(t), storage.min_value, storage.max_value)
    return storage.to_bits(storage.cast(t))


ACT_TYPES = ("f32", "i8")
"""What `quant.linear` multiplies the weights by: the f32 activations, or their int8 blocks."""
ACT_BLOCK = 32
"""Activations of `act="i8"` share a scale per run of this many along K."""
ACT_TINY = 2.0 ** -126
"""A block scale below this (the smallest normal float, where 1/d would overflow) quantizes
its block to zeros."""


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 blocks of `act="i8"`: codes xq [..., K] (float32 holding integers in
    [-127, 127]) and scales d [..., ceil(K / 32)]; a short last block is padded with zeros."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    blocks = -(-k // ACT_BLOCK)
    padded = np.zeros((*x.shape[:-1], blocks * ACT_BLOCK), np.float32)
    padded[..., :k] = x
    xb = padded.reshape(*x.shape[:-1], blocks, ACT_BLOCK)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = np.max(np.abs(xb), axis=-1) / np.float32(127)
        live = d >= np.float32(ACT_TINY)
        inv = np.where(live, np.float32(1) / np.where(live, d, np.float32(1)),
                       np.float32(0)).astype(np.float32)
        xq = np.clip(np.rint(xb * inv[..., None]), -127, 127)
    xq = np.nan_to_num(xq).reshape(padded.shape)[..., :k]
    return xq.astype(np.float32), d.astype(np.float32)


def act_dequantized(x: np.ndarray) -> np.ndarray:
    """d * xq of `act="i8"`, with every element of a row NaN where a block of the row held a
    NaN or an infinity."""
    x = np.asarray(x, np.float32)
    xq, d = quantize_activations(x)
    with np.errstate(invalid="ignore"):
        out = np.asarray(xq * np.repeat(d, ACT_BLOCK, axis=-1)[..., :x.shape[-1]], np.float32)
    bad = ~np.isfinite(x).all(axis=-1, keepdims=True)
    return np.where(bad, np.float32(np.nan), out)


def check_params(op: Operation, weight: Value, scale: Value, zero: Value | None) -> QuantType:
    """Verify a quantized weight operand with its scale and zero-point operands."""
    wt = weight.type
    if not isinstance(wt.dtype, QuantType):
        raise VerifyError(op, f"weight must have a !quant.weight element type, got {wt}")
    if wt.rank != 2:
        raise VerifyError(op, f"a quantized weight is 2-d [out, in], got {wt}")
    q, (n, k) = wt.dtype, wt.shape
    want = TensorType(scale_shape(q, (n, k)), q.scale_dtype)
    if not scale.type.same_as(want):
        raise VerifyError(op, f"scale must be {want} for {wt}, got {scale.type}")
    zdt = zero_dtype(q)
    if zdt is None and zero is not None:
        raise VerifyError(op, f"{q} is symmetric (zero_point=none) but a zero point was given")
    if zdt is not None:
        if zero is None:
            raise VerifyError(op, f"{q} needs a zero-point operand of type "
                                  f"{want.with_dtype(zdt)}")
        if not zero.type.same_as(want.with_dtype(zdt)):
            raise VerifyError(op, f"zero point must be {want.with_dtype(zdt)}, "
                                  f"got {zero.type}")
    return q


class _QuantParams(Operation):
    """Shared: the `weight, scale, zero?` operands."""

    def _quant(self) -> QuantType:
        return check_params(self, self.weight, self.scale, self.zero)


@register_op
class DequantizeOp(_QuantParams):
    """The f32 weight of a quantized one: (decode(q) - z) * s."""

    name = "quant.dequantize"
    TRAITS = frozenset({Trait.INJECTIVE})
    OPERANDS = ("weight", "scale", "zero?")

    def infer_types(self) -> list[TensorType]:
        self._quant()
        return [self.weight.type.with_dtype(f32)]

    def evaluate(self, ctx: EvalContext, codes: np.ndarray, scale: np.ndarray,
                 zero: np.ndarray | None = None) -> np.ndarray:
        return dequantize(codes, scale, zero, self.weight.type.dtype)


@register_op
class QuantizeOp(Operation):
    """Codes of an f32 [N, K] tensor in the result's quantized type (scales are operands)."""

    name = "quant.quantize"
    OPERANDS = ("x", "scale", "zero?")
    RESULT_TYPES_GIVEN = True

    def verify_(self) -> None:
        x, out = self.x.type, self.result.type
        if x.dtype != f32:
            raise VerifyError(self, f"quantize takes an f32 tensor, got {x}")
        if x.rank != 2 or out.rank != 2 or not all(
                dims_equal(a, b) for a, b in zip(x.shape, out.shape, strict=True)):
            raise VerifyError(self, f"x and the result must be 2-d [N, K] of one shape, got "
                                    f"x {x} and result {out}")
        check_params(self, self.result, self.scale, self.zero)

    def evaluate(self, ctx: EvalContext, x: np.ndarray, scale: np.ndarray,
                 zero: np.ndarray | None = None) -> np.ndarray:
        qtype = self.result.type.dtype
        if not isinstance(qtype, QuantType):
            raise VerifyError(self, f"result must have a !quant.weight element type, got "
                                    f"{self.result.type}")
        return quantize(x, scale, zero, qtype)


@register_op
class LinearOp(_QuantParams):
    """x @ dequantize(weight)^T for an f32 x [..., K] and a quantized weight [N, K]."""

    name = "quant.linear"
    TRAITS = frozenset({Trait.ANCHOR})
    ANCHOR = Anchor.MATMUL
    OPERANDS = ("x", "weight", "scale", "zero?")
    ATTRS = {"act": attr("str", "f32", choices=ACT_TYPES)}

    def infer_types(self) -> list[TensorType]:
        q = self._quant()
        if self.act == "i8" and (not isinstance(q.storage, IntType)
                                 or q.zero_point is ZeroPoint.FLOAT):
            raise VerifyError(self, f"act=i8 needs integer codes with no zero point, an integer "
                                    f"one or a minimum, got {q}; use act=f32 for this weight")
        x, w = self.x.type, self.weight.type
        if x.dtype != f32 or x.rank < 1:
            raise VerifyError(self, f"x must be an f32 tensor of rank >= 1, got {x}")
        if not dims_equal(x.shape[-1], w.shape[1]):
            raise VerifyError(self, f"in_features differ: x {x} vs weight {w} "
                                    f"({format_dim(x.shape[-1])} vs {format_dim(w.shape[1])})")
        return [x.with_shape(tuple(x.shape[:-1]) + (w.shape[0],))]

    def evaluate(self, ctx: EvalContext, x: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                 zero: np.ndarray | None = None) -> np.ndarray:
        qtype = self.weight.type.dtype
        w = dequantize(codes, scale, zero, qtype)
        if self.act == "f32":
            return np.asarray(np.matmul(x, w.T), np.float32)
        if qtype.zero_point is not ZeroPoint.MIN or zero is None:
            return np.asarray(np.matmul(act_dequantized(x), w.T), np.float32)
        minimum = expand_groups(zero, qtype, w.shape)
        return np.asarray(np.matmul(act_dequantized(x), (w - minimum).T)
                          + np.matmul(x, minimum.T), np.float32)


@register_op
class Conv2dOp(Window2dOp, _QuantParams):
    """graph.conv2d of an f32 x by a quantized weight [O, I/groups*KH*KW] (OIHW flattened)."""

    name = "quant.conv2d"
    TRAITS = frozenset({Trait.ANCHOR, Trait.NCHW})
    ANCHOR = Anchor.CONV
    OPERANDS = ("x", "weight", "scale", "zero?")
    ATTRS = {"kernel": attr("ints"), "stride": attr("ints", (1, 1)),
             "padding": attr("ints", (0, 0)), "dilation": attr("ints", (1, 1)),
             "groups": attr("int", 1), "layout": LAYOUT_ATTR}

    def weight_oihw(self) -> tuple[int, int, int, int]:
        """The OIHW shape the flat weight stands for."""
        kh, kw = self.kernel
        o, k = self.weight.type.shape
        return int(o), int(k) // (kh * kw), kh, kw

    def infer_types(self) -> list[TensorType]:
        self._quant()
        x, w = self.x.type, self.weight.type
        if x.dtype != f32:
            raise VerifyError(self, f"x must be f32, got {x}")
        if len(self.kernel) != 2 or min(self.kernel) < 1:
            raise VerifyError(self, f"kernel must be (KH, KW) >= 1, got {self.kernel}")
        o, k = w.shape
        if not isinstance(o, int) or not isinstance(k, int):
            raise VerifyError(self, f"a quantized conv weight must be static, got {w}")
        n, c, _, _ = self.nchw_dims()
        kh, kw = self.kernel
        g = self.groups
        if g < 1 or o % g or not dims_equal(c, g * (k // (kh * kw))) or k % (kh * kw):
            raise VerifyError(self, f"weight {w} does not fit input {x} with kernel {kh}x{kw} "
                                    f"and groups={g}: expected in = {format_dim(c)}/{g}*{kh}*"
                                    f"{kw} and out a multiple of {g}")
        oh, ow = self.out_hw((kh, kw))
        return [x.with_shape(layout_shape(self.layout, n, o, oh, ow))]

    def evaluate(self, ctx: EvalContext, x: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                 zero: np.ndarray | None = None) -> np.ndarray:
        w = dequantize(codes, scale, zero, self.weight.type.dtype).reshape(self.weight_oihw())
        return conv2d_oihw(self, ctx, x, w, None)
