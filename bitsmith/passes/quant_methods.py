"""Weight quantizers: round-to-nearest (with a clipping search) and GPTQ.

Everything works on a weight W [N, K] (rows are output channels, as torch's linear weight)
and a `QuantType`; the result is the codes, scales and zero points that `quant.dequantize`
turns back into weights (its semantics are the ones used here, through `ir.dialects.quant`).

- RTN picks each group's range from its min/max, shrunk by the factor in `SHRINK` that gives
  the smallest squared error (llama.cpp and AWQ search the clipping range the same way).
- GPTQ (Frantar et al., 2022) quantizes one input column at a time and spreads each column's
  error over the columns not yet quantized, through the inverse Hessian H = X^T X of the
  layer's calibration inputs; columns go in order of decreasing H diagonal with act-order.
  Groups stay contiguous in the original column order: with per-output-channel scales they
  are fitted on W before the sweep ("static groups", as AutoGPTQ does with act-order), with
  per-input-channel scales each column's scales are fitted when the sweep reaches it.
- Rotation (QuaRot, Ashkboos et al., 2024; QuIP#'s incoherence processing): W is quantized as
  W R, R block-diagonal with one randomized Hadamard block R_b = diag(signs) H_b / sqrt(b)
  repeated along K, and the layer runs on x R, so (x R)(W R)^T = x W^T. The rotation spreads
  each block's outlier columns over the whole block, so a group's range is not set by a few
  large weights; it costs one [b, b] matmul per block of activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import PassError
from ..ir.dialects.quant import dequantize, expand_groups, quantize, scale_shape, zero_dtype
from ..ir.dtypes import DType, IntType
from ..ir.types import GroupAxis, QuantType, ZeroPoint

SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
"""Range factors the RTN clipping search tries."""
GPTQ_BLOCK = 128
"""Columns GPTQ updates lazily as one block (the paper's B)."""
GPTQ_DAMP = 0.1
"""Added to H's diagonal, as a fraction of its mean. The paper uses 0.01; on MiniLM 0.1 gave
better embeddings at every width tried (W4 and W3, with and without rotation)."""


@dataclass
class Quantized:
    """A quantized weight: codes [N, K] (uint8 bit codes), scales and zero points per group."""

    qtype: QuantType
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None

    def weight(self) -> np.ndarray:
        """The dequantized f32 weight."""
        return dequantize(self.codes, self.scale, self.zero, self.qtype)


def _grouped(w: np.ndarray, qtype: QuantType) -> np.ndarray:
    """W [N, K] as [groups..., members] with NaN padding in a short last group: rows of
    [N, G, g] for axis=out, [G, K, g] (members along N) for axis=in."""
    n, k = w.shape
    if qtype.axis is GroupAxis.IN:
        return _grouped(w.T, QuantType(qtype.storage, qtype.group_size)).transpose(1, 0, 2)
    g = qtype.group_size or k
    groups = -(-k // g)
    padded = np.full((n, groups * g), np.nan, np.float32)
    padded[:, :k] = w
    return padded.reshape(n, groups, g)


def fit_params(w: np.ndarray, qtype: QuantType, shrink: float | np.ndarray = 1.0
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales and zero points of every group of W, from its range shrunk by `shrink` (a
    number, or an array that broadcasts against the params' shape)."""
    grouped = _grouped(np.asarray(w, np.float32), qtype)
    lo = np.minimum(np.nanmin(grouped, axis=-1), 0.0) * shrink
    hi = np.maximum(np.nanmax(grouped, axis=-1), 0.0) * shrink
    storage = qtype.storage
    scale_dt = qtype.scale_dtype
    top = float(scale_dt.max_value)
    zero = None
    if qtype.zero_point is ZeroPoint.NONE:
        absmax = np.maximum(-lo, hi)
        levels = max(1, storage.max_value) if isinstance(storage, IntType) else storage.max_value
        scale = absmax / levels
    else:
        levels = storage.max_value - storage.min_value
        scale = (hi - lo) / levels
        scale = scale_dt.cast(np.clip(scale, 0.0, top)).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)
        z = storage.min_value - lo / safe
        if qtype.zero_point is ZeroPoint.INT:
            z = np.clip(np.rint(z), storage.min_value, storage.max_value)
        zero = _zero_dtype(qtype).cast(z)
    scale = scale_dt.cast(np.clip(scale, 0.0, top))
    return scale, zero


def _zero_dtype(qtype: QuantType) -> DType:
    """The element type of an asymmetric `qtype`'s zero points."""
    dtype = zero_dtype(qtype)
    if dtype is None:
        raise PassError(f"{qtype} is symmetric: it has no zero points")
    return dtype


def _param_shape(qtype: QuantType, n: int, k: int) -> tuple[int, int]:
    """The shape of the scales of a static [n, k] weight."""
    rows, cols = scale_shape(qtype, (n, k))
    return int(rows), int(cols)


def _sq_error(w: np.ndarray, q: Quantized, hdiag: np.ndarray | None) -> np.ndarray:
    """Squared error per group (weighted per input column by diag(H) when given)."""
    d = (q.weight() - w) ** 2
    if hdiag is not None:
        d = d * hdiag[None, :]
    grouped = _grouped(d, q.qtype)
    return np.nansum(grouped, axis=-1)


def rtn(w: np.ndarray, qtype: QuantType, hdiag: np.ndarray | None = None) -> Quantized:
    """Round to nearest, each group's clipping chosen from SHRINK by (H-weighted) error."""
    w = np.asarray(w, np.float32)
    best = _rtn_candidate(w, qtype, SHRINK[0])
    best_err = _sq_error(w, best, hdiag)
    for factor in SHRINK[1:]:
        cand = _rtn_candidate(w, qtype, factor)
        err = _sq_error(w, cand, hdiag)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best.scale = np.where(better, cand.scale, best.scale)
        if best.zero is not None and cand.zero is not None:
            best.zero = np.where(better, cand.zero, best.zero)
    best.codes = quantize(w, best.scale, best.zero, qtype)
    return best


def _rtn_candidate(w: np.ndarray, qtype: QuantType, factor: float) -> Quantized:
    """W quantized with every group's range shrunk by `factor`."""
    scale, zero = fit_params(w, qtype, factor)
    return Quantized(qtype, quantize(w, scale, zero, qtype), scale, zero)


def _column_rtn(col: np.ndarray, qtype: QuantType) -> tuple[np.ndarray, np.ndarray,
                                                             np.ndarray | None]:
    """Per-input-channel params of one column [N] (groups along N) by the clipping search,
    every SHRINK factor at once (the GPTQ sweep calls this once per column)."""
    factors = np.asarray(SHRINK, np.float32)
    cand = np.repeat(col[:, None], len(factors), axis=1)  # [N, factors]
    scale, zero = fit_params(cand, qtype, factors)          # [groups, factors]
    deq = dequantize(quantize(cand, scale, zero, qtype), scale, zero, qtype)
    err = np.nansum(_grouped((deq - cand) ** 2, qtype), axis=-1)
    best = np.argmin(err, axis=1)  # the first factor of least error, as `rtn` picks
    groups = np.arange(len(best))
    member = np.minimum(np.arange(len(col)) // max(qtype.group_size, 1), len(best) - 1)
    return (deq[np.arange(len(col)), best[member]], scale[groups, best][:, None],
            None if zero is None else zero[groups, best][:, None])


def gptq(w: np.ndarray, hessian: np.ndarray, qtype: QuantType, *, act_order: bool = True,
         damp: float = GPTQ_DAMP) -> Quantized:
    """GPTQ with the layer Hessian H = X^T X ([K, K], from calibration inputs)."""
    w = np.array(w, np.float64)
    n, k = w.shape
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    params = (_ColumnGroups.empty(qtype, n, k) if qtype.axis is GroupAxis.IN
              else _StaticGroups.fit(w, np.diag(h), qtype))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w = w[:, order]
    h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # upper Cholesky factor of H^-1: row i holds how column i's error spreads to later ones
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    qw = np.zeros_like(w)
    for start in range(0, k, GPTQ_BLOCK):
        stop = min(start + GPTQ_BLOCK, k)
        block = w[:, start:stop].copy()
        errs = np.zeros_like(block)
        for i in range(stop - start):
            col = block[:, i]
            deq = params.quantize_column(col, int(order[start + i]))  # index in W
            qw[:, start + i] = deq
            err = (col - deq) / hinv[start + i, start + i]
            block[:, i:] -= np.outer(err, hinv[start + i, start + i:stop])
            errs[:, i] = err
        w[:, stop:] -= errs @ hinv[start:stop, stop:]
    inverse = np.argsort(order)
    qw = qw[:, inverse].astype(np.float32)
    scale, zero = params.fitted()
    # the sweep's dequantized columns are exactly representable with these params
    return Quantized(qtype, quantize(qw, scale, zero, qtype), scale, zero)


@dataclass
class _StaticGroups:
    """GPTQ's per-output-channel params: fitted on W before the sweep, in the original column
    order ("static groups")."""

    fitted_on_w: Quantized
    scale: np.ndarray  # the scales repeated out to [N, K]
    zero: np.ndarray | None  # the zero points repeated out to [N, K]

    @classmethod
    def fit(cls, w: np.ndarray, hdiag: np.ndarray, qtype: QuantType) -> _StaticGroups:
        """Params of W [N, K] by the clipping search, weighted by diag(H)."""
        n, k = w.shape
        static = rtn(w.astype(np.float32), qtype, hdiag)
        s_full = expand_groups(static.scale, qtype, (n, k))
        z_full = None if static.zero is None else expand_groups(static.zero, qtype, (n, k))
        return cls(static, s_full, z_full)

    def quantize_column(self, col: np.ndarray, j: int) -> np.ndarray:
        """Column `j` of W [N] quantized with its params, dequantized."""
        qtype = self.fitted_on_w.qtype
        one = QuantType(qtype.storage, 0, GroupAxis.OUT, qtype.scale_dtype, qtype.zero_point)
        sc = self.scale[:, j:j + 1]
        zc = None if self.zero is None else self.zero[:, j:j + 1]
        return dequantize(quantize(col[:, None].astype(np.float32), sc, zc, one),
                          sc, zc, one)[:, 0]

    def fitted(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The scales and zero points per group."""
        return self.fitted_on_w.scale, self.fitted_on_w.zero


@dataclass
class _ColumnGroups:
    """GPTQ's per-input-channel params: each column's are fitted when the sweep reaches it."""

    qtype: QuantType
    scale: np.ndarray
    zero: np.ndarray | None

    @classmethod
    def empty(cls, qtype: QuantType, n: int, k: int) -> _ColumnGroups:
        """Zeroed params of an [n, k] weight, to be filled column by column."""
        shape = _param_shape(qtype, n, k)
        zero = None
        if qtype.zero_point is not ZeroPoint.NONE:
            zero = np.zeros(shape, _zero_dtype(qtype).numpy_dtype)
        return cls(qtype, np.zeros(shape, np.float32), zero)

    def quantize_column(self, col: np.ndarray, j: int) -> np.ndarray:
        """Column `j` of W [N] quantized by the clipping search (its params kept), dequantized."""
        deq, s, z = _column_rtn(col.astype(np.float32), self.qtype)
        self.scale[:, j] = s[:, 0]
        if self.zero is not None and z is not None:
            self.zero[:, j] = z[:, 0]
        return deq

    def fitted(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The scales and zero points per group, in their dtypes."""
        scale = self.qtype.scale_dtype.cast(self.scale)
        zero = None if self.zero is None else _zero_dtype(self.qtype).cast(self.zero)
        return scale, zero


def rotation_block(block: int) -> np.ndarray:
    """R_b [b, b]: the Sylvester-Hadamard matrix with rows of random sign (a fixed seed per
    size, so a model quantizes the same way every time), scaled to be orthogonal."""
    signs = np.random.default_rng(block).choice(np.array([-1.0, 1.0]), block)
    return (signs[:, None] * scipy.linalg.hadamard(block) / np.sqrt(block)).astype(np.float32)


def rotate_columns(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """W [N, K] @ blockdiag(r, r, ...), block by block along K."""
    n, k = w.shape
    b = r.shape[0]
    return (w.reshape(n, k // b, b) @ r).reshape(n, k)


def rotate_hessian(h: np.ndarray, r: np.ndarray) -> np.ndarray:
    """R^T H R for R = blockdiag(r, r, ...): the Hessian of the rotated inputs x R."""
    k, b = h.shape[0], r.shape[0]
    blocks = h.reshape(k // b, b, k // b, b)
    return np.einsum("ai,xayc,cj->xiyj", r, blocks, r, optimize=True).reshape(k, k)


def relative_error(w: np.ndarray, q: Quantized, hessian: np.ndarray | None) -> float:
    """Output error of the quantized layer relative to the layer's output:
    tr(dW H dW^T) / tr(W H W^T) with calibration, ||dW||^2 / ||W||^2 without."""
    w = np.asarray(w, np.float64)
    dw = q.weight().astype(np.float64) - w
    if hessian is None:
        return float((dw ** 2).sum() / max((w ** 2).sum(), 1e-30))
    h = np.asarray(hessian, np.float64)
    # (A H) . A through a BLAS GEMM: einsum's three-operand loop ran unblocked on one core
    # (minutes a layer at 2048 x 5632)
    return float(((dw @ h) * dw).sum() / max(((w @ h) * w).sum(), 1e-30))
