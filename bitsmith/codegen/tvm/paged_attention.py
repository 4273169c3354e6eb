# pyright: reportInvalidTypeForm=false, reportMissingModuleSource=false
# (TVMScript: buffer annotations are calls that the TVMScript parser reads, not types)
"""The CPU kernel of `kv.paged_attention`: append the step's K/V to the paged cache, then
attend each query row over its sequence's pages.

Written as TensorIR by hand (TVMScript): the loop bounds come from the page tables at run
time, which no TE compute expresses. A first parallel loop over (sequence, KV head) writes the
sequence's new rows into their slots. A second runs over (part, sequence, KV head): a
sequence's query rows are cut into tiles of up to 16 consecutive rows (which share each page
they read), tile k going to part (k + b) % parts (later tiles attend longer), so that one
prompt's prefill and many sequences' decodes alike keep every core busy. A tile walks its
sequence's pages once for all its rows and the GQA group: each page is loaded in f32
(dequantized; K transposed, so that a page's scores are one vector per query, summed over
the head dim in 4 independent chains), then an online softmax (running max and sum, the
accumulator rescaled once per page; exp by `fast_exp`) folds the page's V in, vectorised
over the head dim. Rows past the batch's last sequence (padding) are zeroed.
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
from .fast_math import fast_exp
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


def _load(cache: Any, scales: Any, layer: Any, page: Any, kv: int, h: Any, o: Any, d: Any,
          int4: bool, int8: bool, gs: int) -> Any:
    """One cached element in f32 (dequantized: 4-bit codes with their group's scale and
    minimum, int8 with its row's scale). A TIR expression, for the kernel's TVMScript."""
    if int4:
        code = T.shift_right(T.Cast("int32", cache[layer, page, kv, h, o, d // 2]),
                             (d % 2) * 4) & 15
        return T.Cast("float32", code) * scales[layer, page, kv, h, o, d // gs, 0] \
            + scales[layer, page, kv, h, o, d // gs, 1]
    if int8:
        return T.Cast("float32", cache[layer, page, kv, h, o, d]) \
            * scales[layer, page, kv, h, o]
    return T.Cast("float32", cache[layer, page, kv, h, o, d])


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
    # query rows a task takes at once (each page is loaded once for them), so that their
    # accumulators stay within 16 KiB (L1) whatever the GQA group and head dim
    rr = max(1, min(16, tt, 4096 // (group * dd)))
    nacc = 4 if dd % 4 == 0 else 1  # partial sums of a score vector
    blk = 16 if dd % 16 == 0 else 1  # K transposed in blocks of head-dim lanes (unrolled)

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
        # attention: tasks (part, sequence, KV head); a sequence's rows are cut into tiles of
        # up to `rr` consecutive rows, tile k going to part (k + b) % parts, so that one
        # prefill chunk (its later tiles attend longer), and the decode rows of many
        # sequences, spread over the cores (a parallel loop splits its range in order)
        for task in T.parallel(parts * bb * hk):
            part = task // (bb * hk)
            b = (task // hk) % bb
            h = task % hk
            start, n, first_pos, base, last_page = _bounds(seq_indptr, kv_len, page_indptr, b,
                                                           tt, ns)
            m = T.decl_buffer((rr, group), "float32", scope="local")
            total = T.decl_buffer((rr, group), "float32", scope="local")
            acc = T.decl_buffer((rr, group, dd), "float32", scope="local")
            score = T.decl_buffer((rr, group, ss), "float32", scope="local")
            keys = T.decl_buffer((dd, ss), "float32", scope="local")  # a page's K, transposed
            vals = T.decl_buffer((ss, dd), "float32", scope="local")
            kf = T.decl_buffer((ss, dd), "float32", scope="local")
            psum = T.decl_buffer((nacc, ss), "float32", scope="local")
            tiles = (n + rr - 1) // rr
            for kk in range((tiles - (part - b % parts + parts) % parts + parts - 1) // parts):
                k_tile = (part - b % parts + parts) % parts + kk * parts
                rows = T.min(rr, n - k_tile * rr)  # rows k_tile * rr, ... of the chunk
                for i in range(rr):
                    for g in range(group):
                        m[i, g] = T.float32(-3.0e38)
                        total[i, g] = T.float32(0)
                        for d in T.vectorized(dd):
                            acc[i, g, d] = T.float32(0)
                first_q = first_pos + k_tile * rr
                last_q = first_q + rows - 1
                lo_first = T.max(first_q - win + 1, 0) if win > 0 else 0
                for pg in range(lo_first // ss, T.min(last_q // ss + 1, last_page)):
                    page = T.min(T.max(page_indices[base + pg], 0), pages - 1)
                    for o in range(ss):  # the page in f32: K transposed, V as stored
                        for d in T.vectorized(dd):
                            kf[o, d] = _load(cache, scales, layer, page, 0, h, o, d, int4,
                                             int8, gs)
                    for db in range(dd // blk):
                        for o in range(ss):
                            for dl in T.unroll(blk):
                                keys[db * blk + dl, o] = kf[o, db * blk + dl]
                    for o in range(ss):
                        for d in T.vectorized(dd):
                            vals[o, d] = _load(cache, scales, layer, page, 1, h, o, d, int4,
                                               int8, gs)
                    # every row's and query head's scores as vectors over the page, summed
                    # over d in `nacc` independent chains (unrolled: they stay in registers)
                    for i in range(rows):
                        for g in range(group):
                            for u in T.unroll(nacc):
                                for o in T.vectorized(ss):
                                    psum[u, o] = T.float32(0)
                            for du in T.unroll(dd // nacc):
                                for u in T.unroll(nacc):
                                    for o in T.vectorized(ss):
                                        psum[u, o] = psum[u, o] + q[
                                            start + k_tile * rr + i, h * group + g,
                                            du * nacc + u] * keys[du * nacc + u, o]
                            for o in T.vectorized(ss):
                                score[i, g, o] = psum[0, o]
                            for u in T.unroll(1, nacc):
                                for o in T.vectorized(ss):
                                    score[i, g, o] = score[i, g, o] + psum[u, o]
                    for i in range(rows):  # online softmax: the page's weights, rescaling
                        pos_q = first_q + i
                        lo = T.max(pos_q - win + 1, 0) if win > 0 else 0
                        o_lo = T.max(lo - pg * ss, 0)
                        o_hi = T.min(pos_q - pg * ss, ss - 1)
                        if o_lo <= o_hi:
                            for g in range(group):
                                mx = T.decl_buffer((1,), "float32", scope="local")
                                mx[0] = m[i, g]
                                for o in range(o_lo, o_hi + 1):
                                    mx[0] = T.max(mx[0], score[i, g, o] * T.float32(sc))
                                correction = fast_exp(m[i, g] - mx[0])
                                total[i, g] = total[i, g] * correction
                                for d in T.vectorized(dd):
                                    acc[i, g, d] = acc[i, g, d] * correction
                                for o in T.vectorized(ss):  # one exp per lane, vectorised
                                    score[i, g, o] = T.if_then_else(
                                        o >= o_lo and o <= o_hi,
                                        fast_exp(score[i, g, o] * T.float32(sc) - mx[0]),
                                        T.float32(0))
                                for o in range(o_lo, o_hi + 1):
                                    total[i, g] = total[i, g] + score[i, g, o]
                                m[i, g] = mx[0]
                    for o in range(ss):  # the weighted values: position outermost
                        for i in range(rows):
                            pos_q = first_q + i
                            if pg * ss + o <= pos_q and (win == 0 or pg * ss + o > pos_q - win):
                                for g in range(group):
                                    for d in T.vectorized(dd):
                                        acc[i, g, d] = acc[i, g, d] \
                                            + score[i, g, o] * vals[o, d]
                for i in range(rows):
                    for g in range(group):
                        for d in T.vectorized(dd):
                            out[start + k_tile * rr + i, h * group + g, d] = \
                                acc[i, g, d] / total[i, g]
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
    version = 2  # 2: row tiles sharing each page, fast_exp
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
