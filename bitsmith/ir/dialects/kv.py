"""The `kv` dialect: a paged KV cache as explicit tensors, appended to and attended over.

The cache of a whole model is one tensor `[L, P, 2, H_kv, S, D]`: L layers, P pages of S token
positions each, K (index 0) and V (index 1), H_kv heads of D lanes. A sequence owns a list of
pages, given in CSR form (`page_indptr [B + 1]`, `page_indices`): token position p of sequence
b lives in page `page_indices[page_indptr[b] + p // S]` at offset `p % S`. The host decides
every page (`bitsmith.llm.blocks`); the ops only read and write where the tables say.

An `i8` cache holds each K/V row quantized per token and per head: a scale per (layer, page, K
or V, head, slot) in the `scales` operand `[L, P, 2, H_kv, S]` (f32), s = max|x| / 127 over
the row's D lanes (1 for a row of zeros), codes round-half-even(x / s) in [-127, 127]; a row
reads back as code * s.

A `u8` cache holds 4-bit codes, two to a byte (the cache's last dim is D / 2; element 2i in
the low nibble of byte i, 2i + 1 in the high one), quantized per token, per head and per
group of `int4_group(D)` lanes (32, or D when 32 does not divide it), asymmetric as KIVI and
QServe do: per group a scale s = (max - min) / 15 (1 when max = min) and the minimum m, held
in `scales` `[L, P, 2, H_kv, S, D / group, 2]` (f32: s, then m); codes round-half-even((x -
m) / s) in [0, 15]; a lane reads back as code * s + m.

A step's query tokens are flattened over the batch (a ragged batch, as FlashInfer and vLLM
lay it out): the chunk of sequence b is rows `seq_indptr[b] .. seq_indptr[b + 1] - 1`, at
positions `kv_len[b] - n_b .. kv_len[b] - 1` (n_b its chunk length, kv_len[b] its length once
the chunk is in). A prefill chunk and a decode step (n_b = 1) are the same op. Rows past
`seq_indptr[B]` are padding: nothing is written for them and their output is zero.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from ...errors import IndexOutOfRangeError, VerifyError
from ..core import Operation, attr, register_op
from ..dtypes import DType, f16, f32, i32
from ..interpreter import EvalContext
from ..types import TensorType, dims_equal, symbol

CACHE_DTYPES = ("f32", "f16", "bf16", "i8", "u8")
"""Element types a cache may hold (`i8`, and `u8` holding packed 4-bit codes, with a
`scales` operand)."""

INT4_GROUP = 32


def int4_group(head_dim: int) -> int:
    """The lanes of one scale group of a 4-bit cache row."""
    return INT4_GROUP if head_dim % INT4_GROUP == 0 else head_dim


@register_op
class PagedAttentionOp(Operation):
    """Append this step's K/V rows to the paged cache, then attend every query row over its
    sequence's cache: causal (a token sees positions up to its own), GQA (query head h reads
    KV head h // (H_q / H_kv)), optionally within a sliding `window` of positions.

    Writes its `cache` operand in place (`WRITES`): the host owns the cache tensor and passes
    the same one to every step. Its one result is the attention output `[T, H_q, D]`.
    """

    name = "kv.paged_attention"
    OPERANDS = ("q", "k", "v", "cache", "seq_indptr", "kv_len", "page_indptr", "page_indices",
                "scales?")
    ATTRS = {"layer": attr("int"), "scale": attr("float"), "window": attr("int", 0)}
    WRITES: ClassVar[tuple[str, ...]] = ("cache", "scales")

    def infer_types(self) -> list[TensorType]:
        q, k, v, cache = self.q.type, self.k.type, self.v.type, self.cache.type
        if q.rank != 3 or k.rank != 3 or v.rank != 3:
            raise VerifyError(self, f"q, k, v must be [tokens, heads, head_dim], got {q}, {k}, "
                                    f"{v}")
        if cache.rank != 6:
            raise VerifyError(self, f"cache must be [layers, pages, 2, kv_heads, page_size, "
                                    f"head_dim], got {cache}")
        tokens, heads, dim = q.shape
        for t, what in ((k, "k"), (v, "v")):
            if not (dims_equal(t.shape[0], tokens) and dims_equal(t.shape[2], dim)):
                raise VerifyError(self, f"{what} {t} does not match q {q} in tokens or head_dim")
            if not dims_equal(t.shape[1], cache.shape[3]):
                raise VerifyError(self, f"{what} has {t.shape[1]} heads, the cache "
                                        f"{cache.shape[3]}")
        packed = str(cache.dtype) == "u8"  # two 4-bit codes a byte
        lanes = dim // 2 if packed and isinstance(dim, int) else dim
        if packed and isinstance(dim, int) and dim % 2:
            raise VerifyError(self, f"a 4-bit cache needs an even head_dim, got {dim}")
        if not (dims_equal(cache.shape[2], 2) and dims_equal(cache.shape[5], lanes)):
            raise VerifyError(self, f"cache {cache} must hold K and V (dim 2 of size 2) of "
                                    f"{lanes} {'bytes' if packed else 'lanes'} (head_dim {dim})")
        kv_heads = cache.shape[3]
        if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
            raise VerifyError(self, f"q has {heads} heads, not a multiple of the cache's "
                                    f"{kv_heads} KV heads")
        return [q]

    def verify_(self) -> None:
        for name in ("q", "k", "v"):
            if getattr(self, name).type.dtype != f32:
                raise VerifyError(self, f"{name} must be f32, got {getattr(self, name).type}")
        if str(self.cache.type.dtype) not in CACHE_DTYPES:
            raise VerifyError(self, f"cache element type must be one of {CACHE_DTYPES}, got "
                                    f"{self.cache.type.dtype}")
        for name in self.OPERANDS[4:8]:
            t = getattr(self, name).type
            if t.rank != 1 or t.dtype != i32:
                raise VerifyError(self, f"{name} must be a 1-d i32 tensor, got {t}")
        quantized = str(self.cache.type.dtype) in ("i8", "u8")
        if quantized != (self.scales is not None):
            raise VerifyError(self, "an i8 or u8 (4-bit) cache needs a scales operand of f32, "
                                    "and only those take one")
        if self.scales is not None:
            want = scales_type(self.cache.type, self.q.type.shape[2])
            if not self.scales.type.same_as(want):
                raise VerifyError(self, f"scales must be {want}, got {self.scales.type}")
        layers = self.cache.type.shape[0]
        if self.layer < 0 or (isinstance(layers, int) and self.layer >= layers):
            raise VerifyError(self, f"layer {self.layer} is outside the cache's {layers} layers")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise VerifyError(self, f"scale must be a positive finite float, got {self.scale}")
        if self.window < 0:
            raise VerifyError(self, f"window must be >= 0 (0: none), got {self.window}")

    def evaluate(self, ctx: EvalContext, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                 cache: np.ndarray, seq_indptr: np.ndarray, kv_len: np.ndarray,
                 page_indptr: np.ndarray, page_indices: np.ndarray,
                 scales: np.ndarray | None = None) -> np.ndarray:
        layer = cache[self.layer]
        row_scales = scales[self.layer] if scales is not None else None
        page_size = layer.shape[3]
        out = np.zeros(q.shape, np.float32)
        group = q.shape[1] // k.shape[1]
        held = layer.dtype
        for b, (first, positions, pages) in enumerate(_sequences(
                seq_indptr, kv_len, page_indptr, page_indices, q.shape[0], layer.shape[0],
                page_size)):
            n = len(positions)
            if n == 0:  # a sequence with no rows in this step (a padded batch slot)
                continue
            new = slice(first, first + n)
            slots = pages[positions // page_size], positions % page_size
            for kv, rows in ((0, k[new]), (1, v[new])):
                if row_scales is None:
                    layer[slots[0], kv, :, slots[1], :] = rows.astype(held)
                elif held == np.uint8:
                    codes, params = quantize_rows_int4(rows)
                    layer[slots[0], kv, :, slots[1], :] = codes
                    row_scales[slots[0], kv, :, slots[1]] = params
                else:
                    codes, s = quantize_rows(rows)
                    layer[slots[0], kv, :, slots[1], :] = codes
                    row_scales[slots[0], kv, :, slots[1]] = s
            length = int(kv_len[b])
            everything = np.arange(length)
            where = pages[everything // page_size], everything % page_size
            if held == np.uint8 and row_scales is not None:  # verify_ pairs them
                keys = dequantize_rows_int4(layer[where[0], 0, :, where[1], :],
                                            row_scales[where[0], 0, :, where[1]])
                values = dequantize_rows_int4(layer[where[0], 1, :, where[1], :],
                                              row_scales[where[0], 1, :, where[1]])
            else:
                keys = layer[where[0], 0, :, where[1], :].astype(np.float32)  # [len, H_kv, D]
                values = layer[where[0], 1, :, where[1], :].astype(np.float32)
            if row_scales is not None and held != np.uint8:
                keys = keys * row_scales[where[0], 0, :, where[1]][..., None]
                values = values * row_scales[where[0], 1, :, where[1]][..., None]
            keys = np.repeat(keys, group, axis=1).transpose(1, 0, 2)  # [H_q, len, D]
            values = np.repeat(values, group, axis=1).transpose(1, 0, 2)
            scores = np.einsum("thd,hld->thl", q[new], keys) * np.float32(self.scale)
            visible = everything[None, :] <= positions[:, None]
            if self.window:
                visible &= everything[None, :] > positions[:, None] - self.window
            scores = np.where(visible[:, None, :], scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            out[new] = np.einsum("thl,hld->thd", probs, values)
        return out


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and f32 scales of rows [..., D]: s = max|x| / 127 (1 for zeros), codes
    round-half-even(x / s)."""
    amax = np.abs(rows).max(axis=-1)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(rows / s[..., None]), -127, 127).astype(np.int8)
    return codes, s


def quantize_rows_int4(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed 4-bit codes [..., D / 2] and (scale, min) per group [..., D / group, 2] of rows
    [..., D] (see the module docstring)."""
    dim = rows.shape[-1]
    group = int4_group(dim)
    g = rows.reshape(*rows.shape[:-1], dim // group, group).astype(np.float32)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    s = np.where(hi > lo, (hi - lo) / np.float32(15), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint((g - lo[..., None]) / s[..., None]), 0, 15).astype(np.uint8)
    codes = codes.reshape(rows.shape)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, np.stack([s, lo], axis=-1).astype(np.float32)


def dequantize_rows_int4(packed: np.ndarray, params: np.ndarray) -> np.ndarray:
    """f32 rows [..., D] of packed codes and their (scale, min) groups."""
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.float32)
    codes[..., 0::2] = packed & 15
    codes[..., 1::2] = packed >> 4
    groups = params.shape[-2]
    g = codes.reshape(*codes.shape[:-1], groups, -1)
    return (g * params[..., 0:1] + params[..., 1:2]).reshape(codes.shape).astype(np.float32)


def _sequences(seq_indptr: np.ndarray, kv_len: np.ndarray, page_indptr: np.ndarray,
               page_indices: np.ndarray, tokens: int, num_pages: int, page_size: int):
    """Per sequence: (first row, positions of its chunk, its pages), after checking that the
    tables are consistent (what a crafted or buggy host would get wrong)."""
    batch = len(kv_len)
    if len(seq_indptr) != batch + 1 or len(page_indptr) != batch + 1:
        raise IndexOutOfRangeError(f"kv.paged_attention: seq_indptr and page_indptr need "
                                   f"{batch + 1} entries for {batch} sequences, got "
                                   f"{len(seq_indptr)} and {len(page_indptr)}")
    for name, ptr, end in (("seq_indptr", seq_indptr, tokens),
                           ("page_indptr", page_indptr, len(page_indices))):
        if ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] > end:
            raise IndexOutOfRangeError(f"kv.paged_attention: {name} must rise from 0 to at "
                                       f"most {end}, got {ptr.tolist()}")
    for b in range(batch):
        first, n = int(seq_indptr[b]), int(seq_indptr[b + 1] - seq_indptr[b])
        length = int(kv_len[b])
        pages = page_indices[page_indptr[b]:page_indptr[b + 1]]
        if length < n or len(pages) * page_size < length:
            raise IndexOutOfRangeError(f"kv.paged_attention: sequence {b} holds {length} "
                                       f"position(s) after a chunk of {n} in {len(pages)} "
                                       f"page(s) of {page_size}")
        if np.any(pages < 0) or np.any(pages >= num_pages):
            raise IndexOutOfRangeError(f"kv.paged_attention: sequence {b} names pages "
                                       f"{pages.tolist()}, the cache has {num_pages}")
        yield first, np.arange(length - n, length), pages.astype(np.int64)


def scales_type(cache: TensorType, head_dim: Any) -> TensorType:
    """The type of a quantized cache's scales: one f32 per (layer, page, K or V, head, slot)
    for i8; (scale, min) per group of the slot's lanes for u8 (4-bit)."""
    if str(cache.dtype) == "u8" and isinstance(head_dim, int):
        return TensorType((*cache.shape[:5], head_dim // int4_group(head_dim), 2), f32)
    return TensorType(cache.shape[:5], f32)


def cache_type(layers: int, pages: int | str, kv_heads: int, page_size: int, head_dim: int,
               dtype: DType = f16) -> TensorType:
    """The type of a model's cache tensor (pages may be a symbol: sized at run time); a `u8`
    (4-bit) cache packs two lanes a byte."""
    lanes = head_dim // 2 if str(dtype) == "u8" else head_dim
    dims = (layers, symbol(pages) if isinstance(pages, str) else pages, 2, kv_heads, page_size,
            lanes)
    return TensorType(dims, dtype)
