"""Normalizations, softmax and scaled dot-product attention."""
from __future__ import annotations

import math

import numpy as np

from ....errors import VerifyError
from ...core import Anchor, Operation, Trait, attr, register_op
from ...dtypes import boolean
from ...interpreter import EvalContext
from ...shapes import ShapeError, broadcast_shapes
from ...types import TensorType, dims_equal, format_dim
from .elementwise import checked_axis, in_float, plain_dtype


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


class AxisOp(Operation):
    """Base of float ops along one axis that keep the input's type."""

    TRAITS = frozenset({Trait.REDUCTION})

    OPERANDS = ("x",)
    ATTRS = {"axis": attr("int")}

    def infer_types(self) -> list[TensorType]:
        checked_axis(self, self.axis, self.x.type.rank)
        return [self.x.type]

    def verify_(self) -> None:
        if not plain_dtype(self, self.x.type).is_float:
            raise VerifyError(self, f"expected a float operand, got {self.x.type.dtype}")


@register_op
class SoftmaxOp(AxisOp):
    """exp(x - max) / sum(exp(x - max)) along an axis."""

    name = "graph.softmax"

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        return in_float(lambda v: _softmax(v, self.axis), self.x.type.dtype, x)


@register_op
class LogSoftmaxOp(AxisOp):
    """x - max - log(sum(exp(x - max))) along an axis."""

    name = "graph.log_softmax"

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        def fn(v: np.ndarray) -> np.ndarray:
            shifted = v - v.max(axis=self.axis, keepdims=True)
            return shifted - np.log(np.exp(shifted).sum(axis=self.axis, keepdims=True))
        return in_float(fn, self.x.type.dtype, x)


class NormOp(Operation):
    """Base of normalizations over the last `ndim` axes with an optional affine weight/bias."""

    TRAITS = frozenset({Trait.REDUCTION})

    ATTRS = {"ndim": attr("int", 1), "eps": attr("float", 1e-5)}

    def infer_types(self) -> list[TensorType]:
        x = self.x.type
        if not 1 <= self.ndim <= x.rank:
            raise VerifyError(self, f"ndim must be in 1..{x.rank}, got {self.ndim}")
        norm_shape = x.shape[x.rank - self.ndim:]
        for value in self.operands[1:]:
            t = value.type
            if t.rank != self.ndim or not all(dims_equal(a, b)
                                              for a, b in zip(t.shape, norm_shape, strict=True)):
                raise VerifyError(self, f"affine parameter {t} does not match the normalized "
                                        f"shape of {x}")
            if t.dtype != x.dtype:
                raise VerifyError(self, f"parameter dtype {t.dtype} differs from x {x.dtype}")
        return [x]

    def verify_(self) -> None:
        if not plain_dtype(self, self.x.type).is_float:
            raise VerifyError(self, f"expected a float operand, got {self.x.type.dtype}")

    def axes(self, x: np.ndarray) -> tuple[int, ...]:
        """The normalized axes of an array."""
        return tuple(range(x.ndim - self.ndim, x.ndim))


@register_op
class LayerNormOp(NormOp):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last `ndim` axes."""

    name = "graph.layer_norm"
    OPERANDS = ("x", "weight?", "bias?")

    def evaluate(self, ctx: EvalContext, x: np.ndarray, *affine: np.ndarray) -> np.ndarray:
        def fn(v: np.ndarray, *p: np.ndarray) -> np.ndarray:
            axes = self.axes(v)
            mean = v.mean(axis=axes, keepdims=True)
            var = np.square(v - mean).mean(axis=axes, keepdims=True)
            out = (v - mean) / np.sqrt(var + np.float32(self.eps))
            out = out * p[0] if len(p) > 0 else out
            return out + p[1] if len(p) > 1 else out
        return in_float(fn, self.x.type.dtype, x, *affine)


@register_op
class RmsNormOp(NormOp):
    """x / sqrt(mean(x^2) + eps) * weight over the last `ndim` axes."""

    name = "graph.rms_norm"
    OPERANDS = ("x", "weight?")
    ATTRS = {"ndim": attr("int", 1), "eps": attr("float", 1e-6)}

    def evaluate(self, ctx: EvalContext, x: np.ndarray, *affine: np.ndarray) -> np.ndarray:
        def fn(v: np.ndarray, *p: np.ndarray) -> np.ndarray:
            ms = np.square(v).mean(axis=self.axes(v), keepdims=True)
            out = v / np.sqrt(ms + np.float32(self.eps))
            return out * p[0] if p else out
        return in_float(fn, self.x.type.dtype, x, *affine)


@register_op
class BatchNormOp(Operation):
    """Inference batch norm with running statistics over the channel `axis`.

    `axis` is 1 for NCHW-style inputs (torch's convention) and -1 for channels-last (NHWC);
    mean, var, weight and bias are all [C] with C = x.shape[axis].
    """

    name = "graph.batch_norm"
    TRAITS = frozenset({Trait.BROADCAST})
    OPERANDS = ("x", "mean", "var", "weight?", "bias?")
    ATTRS = {"eps": attr("float", 1e-5), "axis": attr("int", 1)}

    def infer_types(self) -> list[TensorType]:
        x = self.x.type
        if x.rank < 2:
            raise VerifyError(self, f"expected rank >= 2 (a batch and a channel axis), got {x}")
        channels = x.shape[checked_axis(self, self.axis, x.rank)]
        for value in self.operands[1:]:
            if value.type.rank != 1 or not dims_equal(value.type.shape[0], channels):
                raise VerifyError(self, f"per-channel parameter does not match x {x} on axis "
                                        f"{self.axis}: expected [{format_dim(channels)}], "
                                        f"got {value.type}")
            if value.type.dtype != x.dtype:
                raise VerifyError(self, f"parameter dtype {value.type.dtype} differs from x "
                                        f"{x.dtype}")
        return [x]

    def verify_(self) -> None:
        if not plain_dtype(self, self.x.type).is_float:
            raise VerifyError(self, f"expected a float operand, got {self.x.type.dtype}")

    def evaluate(self, ctx: EvalContext, x: np.ndarray, mean: np.ndarray, var: np.ndarray,
                 *affine: np.ndarray) -> np.ndarray:
        shape = [1] * x.ndim
        shape[checked_axis(self, self.axis, x.ndim)] = -1

        def fn(v: np.ndarray, m: np.ndarray, s: np.ndarray, *p: np.ndarray) -> np.ndarray:
            out = (v - m.reshape(shape)) / np.sqrt(s.reshape(shape) + np.float32(self.eps))
            out = out * p[0].reshape(shape) if len(p) > 0 else out
            return out + p[1].reshape(shape) if len(p) > 1 else out
        return in_float(fn, self.x.type.dtype, x, mean, var, *affine)


@register_op
class AttentionOp(Operation):
    """softmax(q k^T * scale + mask) v over [..., heads, L, E] (torch SDPA semantics).

    `mask` is bool (True keeps) or additive float; `is_causal` keeps the lower triangle
    aligned at the top-left; `gqa` repeats each k/v head for a group of query heads.
    """

    name = "graph.attention"
    TRAITS = frozenset({Trait.ANCHOR})
    ANCHOR = Anchor.ATTENTION
    OPERANDS = ("q", "k", "v", "mask?")
    ATTRS = {"is_causal": attr("bool", False), "scale": attr("float", None, optional=True),
             "gqa": attr("bool", False)}

    def infer_types(self) -> list[TensorType]:
        q, k, v = self.q.type, self.k.type, self.v.type
        if not q.rank == k.rank == v.rank or q.rank < 2:
            raise VerifyError(self, f"q, k, v must share a rank >= 2, got {q}, {k}, {v}")
        if not dims_equal(q.shape[-1], k.shape[-1]) or not dims_equal(k.shape[-2],
                                                                       v.shape[-2]):
            raise VerifyError(self, f"q/k head dims or k/v lengths differ: {q}, {k}, {v}")
        if q.rank >= 3 and not self.gqa and not dims_equal(q.shape[-3], k.shape[-3]):
            raise VerifyError(self, f"q has {q.shape[-3]} heads, k has {k.shape[-3]}; "
                                    "set gqa=true for grouped-query attention")
        if self.gqa and q.rank >= 3:
            for t in (k, v):
                hq, hk = q.shape[-3], t.shape[-3]
                if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
                    raise VerifyError(self, f"q has {hq} heads, not a multiple of the "
                                            f"{hk} heads of {t}")
        batch = tuple(q.shape[:-2])
        if self.mask is not None:
            try:
                broadcast_shapes(self.mask.type.shape, batch + (q.shape[-2], k.shape[-2]))
            except ShapeError as exc:
                raise VerifyError(self, f"mask does not broadcast: {exc}") from None
        return [q.with_shape(batch + (q.shape[-2], v.shape[-1]))]

    def verify_(self) -> None:
        for t in (self.k.type, self.v.type):
            if t.dtype != self.q.type.dtype:
                raise VerifyError(self, f"q/k/v element types differ: {self.q.type.dtype} vs "
                                        f"{t.dtype}")
        if self.mask is not None and self.mask.type.dtype not in (boolean, self.q.type.dtype):
            raise VerifyError(self, f"mask must be bool or {self.q.type.dtype}, got "
                                    f"{self.mask.type.dtype}")

    def evaluate(self, ctx: EvalContext, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                 mask: np.ndarray | None = None) -> np.ndarray:
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        if self.gqa and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
            k = np.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
            v = np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)
        bias = np.zeros((q.shape[-2], k.shape[-2]), np.float32)
        if self.is_causal:
            bias[~np.tril(np.ones(bias.shape, bool))] = -np.inf
        if mask is not None:
            bias = (bias + np.where(mask, 0.0, -np.inf).astype(np.float32)
                    if mask.dtype == np.bool_ else bias + mask.astype(np.float32))

        def fn(q: np.ndarray, k: np.ndarray, v: np.ndarray, b: np.ndarray) -> np.ndarray:
            scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(scale) + b
            # torch's SDPA gives zeros, not NaN, for a query that every key is masked from
            hidden = np.isneginf(scores).all(axis=-1, keepdims=True)
            return np.matmul(np.where(hidden, 0.0, _softmax(scores, -1)), v)
        return in_float(fn, self.q.type.dtype, q, k, v, bias)
