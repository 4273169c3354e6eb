# pyright: reportInvalidTypeForm=false, reportMissingModuleSource=false
# (TVMScript: buffer annotations are calls that the TVMScript parser reads, not types)
"""The CPU kernel of `kv.paged_attention`: append the step's K/V to the paged cache, then
attend each query row over its sequence's pages.

Written as TensorIR by hand (TVMScript): the loop bounds come from the page tables at run
time, which no TE compute expresses. A first parallel loop over (sequence, KV head) writes the
sequence's new rows into their slots; a second runs over (sequence, KV head, every `parts`-th
query row of the chunk, so that one sequence's prefill keeps every core busy): each query row
walks the sequence's pages a page at a time: the page's K is read once for the whole GQA
group (transposed, so that a page's scores are one vector, each lane summing over the head
dim in order), and an online softmax (running max and sum, the accumulator rescaled once per
page) folds the page's V in, vectorised over the head dim. Rows past the batch's last
sequence (padding) are zeroed.
"""
from __future__ import annotations

import functools
from typing import Any

import tvm
from tvm.script import tirx as T

from ...ir import Operation
from ...ir.dialects.kernel import FusedOp
from ...ir.dialects.kv import PagedAttentionOp, int4_group
from ..template import Config, KnobSpace, Problem, Target, register_template
from .templates import TvmKernel, TvmTemplate

_STORAGE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i8": "int8",
            "u8": "uint8"}


def paged_attention_func(*, layer: int, **sizes: Any) -> tvm.tirx.PrimFunc:
    """The PrimFunc `(q, k, v, cache, seq_indptr, kv_len, page_indptr, page_indices[,
    scales], out)` of one layer; the cache's page count is symbolic (sized at run time). An
    `i8` cache takes its scales, rows quantized as they are written (the op's semantics).
    The TVMScript is parsed once per set of sizes and specialised to each layer."""
    func: Any = _layer_generic(**sizes)  # TVM's stubs lack PrimFunc.params
    return func.specialize({func.params[-1]: tvm.tirx.IntImm("int32", layer)})


def _bounds(seq_indptr: Any, kv_len: Any, page_indptr: Any, b: Any, tt: int,
            ns: int) -> tuple[Any, Any, Any, Any, Any]:
    """Sequence b's rows (start, count), its first new position, and its pages (base, count)
    in the tables, bounded: rows inside [0, T), pages inside page_indices (the engine builds
    consistent tables, the interpreter refuses the others; these bounds keep a crafted one
    from reaching memory outside the buffers). TIR expressions, for the kernel's TVMScript."""
    start = T.min(T.max(seq_indptr[b], 0), tt)
    n = T.max(T.min(seq_indptr[b + 1], tt) - start, 0)
    first_pos = T.max(kv_len[b] - n, 0)
    base = T.min(T.max(page_indptr[b], 0), ns - 1)
    last_page = T.min(T.max(page_indptr[b + 1], base), ns) - base
    return start, n, first_pos, base, last_page


@functools.lru_cache(maxsize=64)
def _layer_generic(  # noqa: C901 - TVMScript: its loops are TIR, not Python branches
        *, tokens: int, batch: int, heads: int, kv_heads: int, head_dim: int, layers: int,
        page_size: int, page_slots: int, scale: float, window: int,
        cache_dtype: str) -> tvm.tirx.PrimFunc:
    """The kernel with the layer as its last parameter (a scalar)."""
    group = heads // kv_heads
    int8 = cache_dtype == "i8"
    int4 = cache_dtype == "u8"  # 4-bit codes, two a byte; (scale, min) per group of lanes
    quantized = int8 or int4
    storage = _STORAGE[cache_dtype]
    gs = int4_group(head_dim)  # lanes of a 4-bit group
    ng = head_dim // gs
    lanes = head_dim // 2 if int4 else head_dim
    tt, bb, hq, hk, dd, ll, ss, ns = (tokens, batch, heads, kv_heads, head_dim, layers,
                                      page_size, page_slots)
    sc = float(scale)
    win = int(window)
    parts = max(1, min(8, tt // bb))  # attention tasks a (sequence, KV head)

    @T.macro
    def body(q, k, v, cache, seq_indptr, kv_len, page_indptr, page_indices, out,  # noqa: C901
             scales, pages, layer):
        for task in T.parallel(bb * hk):
            b = task // hk
            h = task % hk
            start, n, first_pos, base, last_page = _bounds(seq_indptr, kv_len, page_indptr, b,
                                                           tt, ns)
            amax = T.decl_buffer((2,), "float32", scope="local")
            for j in range(T.min(n, last_page * ss - first_pos)):
                pos = first_pos + j
                # clamped: a table that names a page past the cache cannot write outside it
                # (the engine builds consistent tables; the interpreter refuses the others)
                page = T.min(T.max(page_indices[base + pos // ss], 0), pages - 1)
                if int4:  # per token, head and group: s = (max - min) / 15, codes rint((x-m)/s)
                    for kv in range(2):
                        for gi in range(ng):
                            amax[0] = T.float32(3.0e38)
                            amax[1] = T.float32(-3.0e38)
                            for d in range(gs):
                                x = T.if_then_else(kv == 0, k[start + j, h, gi * gs + d],
                                                   v[start + j, h, gi * gs + d])
                                amax[0] = T.min(amax[0], x)
                                amax[1] = T.max(amax[1], x)
                            s4 = T.if_then_else(amax[1] > amax[0],
                                                (amax[1] - amax[0]) / T.float32(15),
                                                T.float32(1))
                            scales[layer, page, kv, h, pos % ss, gi, 0] = s4
                            scales[layer, page, kv, h, pos % ss, gi, 1] = amax[0]
                            for i in range(gs // 2):
                                lo4 = T.Cast("int32", T.max(T.min(T.nearbyint((T.if_then_else(
                                    kv == 0, k[start + j, h, gi * gs + 2 * i],
                                    v[start + j, h, gi * gs + 2 * i]) - amax[0]) / s4),
                                    T.float32(15)), T.float32(0)))
                                hi4 = T.Cast("int32", T.max(T.min(T.nearbyint((T.if_then_else(
                                    kv == 0, k[start + j, h, gi * gs + 2 * i + 1],
                                    v[start + j, h, gi * gs + 2 * i + 1]) - amax[0]) / s4),
                                    T.float32(15)), T.float32(0)))
                                cache[layer, page, kv, h, pos % ss, gi * (gs // 2) + i] = \
                                    T.Cast("uint8", lo4 + hi4 * 16)
                elif int8:  # per token and head: s = max|x| / 127, codes rint(x / s)
                    for kv in range(2):
                        amax[0] = T.float32(0)
                        for d in range(dd):
                            amax[0] = T.max(amax[0], T.abs(T.if_then_else(
                                kv == 0, k[start + j, h, d], v[start + j, h, d])))
                        row_scale = T.if_then_else(amax[0] > T.float32(0),
                                                   amax[0] / T.float32(127), T.float32(1))
                        scales[layer, page, kv, h, pos % ss] = row_scale
                        for d in range(dd):
                            cache[layer, page, kv, h, pos % ss, d] = T.Cast("int8", T.max(
                                T.min(T.nearbyint(T.if_then_else(
                                    kv == 0, k[start + j, h, d], v[start + j, h, d])
                                    / row_scale), T.float32(127)), T.float32(-127)))
                else:
                    for d in T.vectorized(dd):
                        cache[layer, page, 0, h, pos % ss, d] = T.Cast(storage,
                                                                       k[start + j, h, d])
                        cache[layer, page, 1, h, pos % ss, d] = T.Cast(storage,
                                                                       v[start + j, h, d])
        # attention: (sequence, KV head, every parts-th query row), so that a prefill chunk
        # of one sequence keeps every core busy (its later rows attend longer: strided)
        for task in T.parallel(bb * hk * parts):
            b = task // (hk * parts)
            h = (task // parts) % hk
            part = task % parts
            start, n, first_pos, base, last_page = _bounds(seq_indptr, kv_len, page_indptr, b,
                                                           tt, ns)
            m = T.decl_buffer((group,), "float32", scope="local")
            total = T.decl_buffer((group,), "float32", scope="local")
            acc = T.decl_buffer((group, dd), "float32", scope="local")
            score = T.decl_buffer((group, ss), "float32", scope="local")
            keys = T.decl_buffer((dd, ss), "float32", scope="local")  # a page's K, transposed
            for jj in range((n - part + parts - 1) // parts):
                j = part + jj * parts
                pos_q = first_pos + j
                lo = T.max(pos_q - win + 1, 0) if win > 0 else 0
                for g in range(group):
                    m[g] = T.float32(-3.0e38)
                    total[g] = T.float32(0)
                    for d in T.vectorized(dd):
                        acc[g, d] = T.float32(0)
                for pg in range(lo // ss, T.min(pos_q // ss + 1, last_page)):
                    page = T.min(T.max(page_indices[base + pg], 0), pages - 1)
                    for o in range(ss):
                        for d in range(dd):
                            if int4:
                                keys[d, o] = T.Cast("float32", T.shift_right(T.Cast(
                                    "int32", cache[layer, page, 0, h, o, d // 2]),
                                    (d % 2) * 4) & 15) * scales[layer, page, 0, h, o, d // gs, 0] \
                                    + scales[layer, page, 0, h, o, d // gs, 1]
                            elif int8:
                                keys[d, o] = T.Cast("float32", cache[layer, page, 0, h, o, d]) \
                                    * scales[layer, page, 0, h, o]
                            else:
                                keys[d, o] = T.Cast("float32", cache[layer, page, 0, h, o, d])
                    for g in range(group):
                        # the page's scores as one vector: each lane sums over d in order
                        for o in T.vectorized(ss):
                            score[g, o] = T.float32(0)
                        for d in range(dd):
                            for o in T.vectorized(ss):
                                score[g, o] = score[g, o] + q[start + j, h * group + g, d] \
                                    * keys[d, o]
                        mx = T.decl_buffer((1,), "float32", scope="local")
                        mx[0] = m[g]
                        for o in range(ss):
                            if pg * ss + o >= lo and pg * ss + o <= pos_q:
                                score[g, o] = score[g, o] * T.float32(sc)
                                mx[0] = T.max(mx[0], score[g, o])
                        correction = T.exp(m[g] - mx[0])
                        total[g] = total[g] * correction
                        for d in T.vectorized(dd):
                            acc[g, d] = acc[g, d] * correction
                        for o in range(ss):
                            if pg * ss + o >= lo and pg * ss + o <= pos_q:
                                p = T.exp(score[g, o] - mx[0])
                                total[g] = total[g] + p
                                if int4:
                                    for d in T.vectorized(dd):
                                        acc[g, d] = acc[g, d] + p * (T.Cast(
                                            "float32", T.shift_right(T.Cast(
                                                "int32", cache[layer, page, 1, h, o, d // 2]),
                                                (d % 2) * 4) & 15)
                                            * scales[layer, page, 1, h, o, d // gs, 0]
                                            + scales[layer, page, 1, h, o, d // gs, 1])
                                elif int8:
                                    pv = p * scales[layer, page, 1, h, o]
                                    for d in T.vectorized(dd):
                                        acc[g, d] = acc[g, d] + pv * T.Cast(
                                            "float32", cache[layer, page, 1, h, o, d])
                                else:
                                    for d in T.vectorized(dd):
                                        acc[g, d] = acc[g, d] + p * T.Cast(
                                            "float32", cache[layer, page, 1, h, o, d])
                        m[g] = mx[0]
                for g in range(group):
                    for d in T.vectorized(dd):
                        out[start + j, h * group + g, d] = acc[g, d] / total[g]
        for t in T.parallel(tt):
            if t >= seq_indptr[bb]:
                for c in range(hq):
                    for d in T.vectorized(dd):
                        out[t, c, d] = T.float32(0)

    if quantized:
        @T.prim_func(private=True, check_well_formed=False)
        def kernel_i8(
                q: T.Buffer((tt, hq, dd), "float32"), k: T.Buffer((tt, hk, dd), "float32"),
                v: T.Buffer((tt, hk, dd), "float32"), var_cache: T.handle,
                seq_indptr: T.Buffer((bb + 1,), "int32"), kv_len: T.Buffer((bb,), "int32"),
                page_indptr: T.Buffer((bb + 1,), "int32"),
                page_indices: T.Buffer((ns,), "int32"), var_scales: T.handle,
                out: T.Buffer((tt, hq, dd), "float32"), layer: T.int32):
            T.func_attr({"tirx.noalias": True})
            pages = T.int64()
            cache = T.match_buffer(var_cache, (ll, pages, 2, hk, ss, lanes), storage)
            if int4:
                scales = T.match_buffer(var_scales, (ll, pages, 2, hk, ss, ng, 2), "float32")
            else:
                scales = T.match_buffer(var_scales, (ll, pages, 2, hk, ss), "float32")
            body(q, k, v, cache, seq_indptr, kv_len, page_indptr, page_indices, out, scales,
                 pages, layer)
        return kernel_i8

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(q: T.Buffer((tt, hq, dd), "float32"), k: T.Buffer((tt, hk, dd), "float32"),
               v: T.Buffer((tt, hk, dd), "float32"), var_cache: T.handle,
               seq_indptr: T.Buffer((bb + 1,), "int32"), kv_len: T.Buffer((bb,), "int32"),
               page_indptr: T.Buffer((bb + 1,), "int32"),
               page_indices: T.Buffer((ns,), "int32"), out: T.Buffer((tt, hq, dd), "float32"),
               layer: T.int32):
        T.func_attr({"tirx.noalias": True})
        pages = T.int64()
        cache = T.match_buffer(var_cache, (ll, pages, 2, hk, ss, dd), storage)
        body(q, k, v, cache, seq_indptr, kv_len, page_indptr, page_indices, out, None, pages,
             layer)

    return kernel


@register_template
class PagedAttention(TvmTemplate):
    """`kv.paged_attention` alone in its kernel (the fuse pass keeps it alone: it has no
    fusion traits)."""

    name = "paged_attention"
    version = 1
    space = KnobSpace()
    key = ("tokens", "batch", "heads", "kv_heads", "head_dim", "layers", "page_size",
           "page_slots", "window", "cache_dtype")

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        body = op.body_ops
        if len(body) != 1 or not isinstance(body[0], PagedAttentionOp):
            return None
        attn = body[0]
        q, cache, table = attn.q.type, attn.cache.type, attn.page_indices.type
        dims: list[Any] = [*q.shape, cache.shape[0], cache.shape[3], cache.shape[4],
                           table.shape[0], attn.kv_len.type.shape[0]]
        if not all(isinstance(d, int) for d in dims):
            return None  # a symbolic step size: not built yet
        tokens, heads, head_dim, layers, kv_heads, page_size, slots, batch = dims
        return Problem(self.name, {
            "tokens": tokens, "batch": batch, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "layers": layers, "page_size": page_size,
            "page_slots": slots, "layer": attn.layer, "scale": attn.scale,
            "window": attn.window, "cache_dtype": str(cache.dtype)}, op)

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        params = {k: problem[k] for k in ("tokens", "batch", "heads", "kv_heads", "head_dim",
                                          "layers", "page_size", "page_slots", "layer",
                                          "scale", "window", "cache_dtype")}
        return TvmKernel(paged_attention_func(**params), self.name, config)  # type: ignore[arg-type]
