"""Generic Triton rules for shape ops, reductions, norms, contractions, windows, attention and
the quant dialect (registered into `emit.RULES` on import). Reductions are loops that
accumulate in f32 (see `emit.Emitter.reduce`)."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ...ir import Operation, Value
from ...ir.dtypes import DType, IntType, LowFloatType
from ...ir.packing import WORD
from ...ir.types import GroupAxis, QuantType, ZeroPoint
from ..template import CodegenError
from .emit import Emitter, is_float, rule, tl_dtype

NEG_INF, POS_INF = "-float('inf')", "float('inf')"


# ---- shapes -----------------------------------------------------------------------------------
def unravel(em: Emitter, flat: str, shape: list[str]) -> list[str]:
    idx: list[str] = []
    for size in reversed(shape[1:]):
        idx.insert(0, em.let(f"{flat} % {size}", "i"))
        flat = em.let(f"{flat} // {size}", "q")
    return [flat, *idx] if shape else []


def ravel(idx: list[str], shape: list[str]) -> str:
    flat = "0"
    for size, i in zip(shape, idx, strict=True):
        flat = i if flat == "0" else f"({flat}) * {size} + {i}"
    return flat


@rule("reshape")
def _reshape(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    src = op.operands[0]
    flat = em.let(ravel(idx, em.shape(op.result)), "f")
    return em.at(src, unravel(em, flat, em.shape(src)))


@rule("permute")
def _permute(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    src = [""] * len(idx)
    for k, p in enumerate(op.perm):
        src[p] = idx[k]
    return em.at(op.operands[0], src)


@rule("expand")
def _expand(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    return em.at(op.operands[0], em.broadcast(op.operands[0], idx))


@rule("slice")
def _slice(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x = op.operands[0]
    axis = op.axis % x.type.rank
    length, dim = op.result.type.shape[axis], x.type.shape[axis]
    if not isinstance(length, int) or not isinstance(dim, int):
        return em.at(x, idx)  # a symbolic slice is the whole axis (the verifier says so)
    start = range(dim)[slice(op.start, op.end, op.step)].start if length else 0
    src = list(idx)
    src[axis] = f"({idx[axis]} * {op.step} + {start})"
    return em.at(x, src)


@rule("concat")
def _concat(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    axis = op.axis % op.result.type.rank
    values, ends, start = [], [], "0"
    for v in op.operands:
        src = list(idx)
        src[axis] = f"({idx[axis]} - {start})"
        values.append(em.at(v, src))
        start = f"({start} + {em.dim(v.type.shape[axis])})"
        ends.append(start)
    out = values[-1]
    for value, end in reversed(list(zip(values[:-1], ends[:-1], strict=True))):
        out = f"tl.where({idx[axis]} < {end}, {value}, {out})"
    return out


@rule("split")
def _split(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    axis = op.axis % op.x.type.rank
    src = list(idx)
    src[axis] = f"({idx[axis]} + {sum(op.sizes[:i])})"
    return em.at(op.x, src)


@rule("pad")
def _pad(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """`pads` holds (before, after) per axis, in axis order."""
    x = op.operands[0]
    shape, src, inside = em.shape(x), list(idx), []
    for axis in range(x.type.rank):
        before, after = op.pads[2 * axis], op.pads[2 * axis + 1]
        if before == 0 and after == 0:
            continue
        src[axis] = f"({idx[axis]} - {before})"
        inside.append(f"({src[axis]} >= 0) & ({src[axis]} < {shape[axis]})")
    value = em.at(x, src)
    return f"tl.where({' & '.join(inside)}, {value}, {op.value!r})" if inside else value


@rule("embedding")
def _embedding(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    row = em.at(op.indices, idx[:-1])
    return em.at(op.weight, [row, idx[-1]])


@rule("index_select")
def _index_select(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    axis = op.axis % op.x.type.rank
    src = list(idx)
    src[axis] = em.at(op.index, [idx[axis]])
    return em.at(op.x, src)


@rule("gather")
def _gather(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    axis = op.axis % op.x.type.rank
    src = list(idx)
    src[axis] = em.at(op.index, idx)
    return em.at(op.x, src)


@rule("index")
def _index(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """x[..., i0, i1, ...] at adjacent axes (the index tensors broadcast together and take the
    indexed dims' place); negative indices count from the end."""
    rank = op.x.type.rank
    axes = [a % rank for a in op.axes]
    if axes != list(range(axes[0], axes[-1] + 1)):
        raise CodegenError("Triton lowering of graph.index over non-adjacent axes is not "
                           "written yet")
    indices = op.operands[1:]
    picked = max(v.type.rank for v in indices)
    at = idx[axes[0]:axes[0] + picked]
    src = list(idx[:axes[0]])
    for axis, value in zip(axes, indices, strict=True):
        v = em.at(value, em.broadcast(value, at))
        size = em.dim(op.x.type.shape[axis])
        src.append(em.let(f"tl.where({v} < 0, {v} + {size}, {v})", "ix"))
    src += idx[axes[0] + picked:]
    return em.at(op.x, src)


# ---- reductions -------------------------------------------------------------------------------
def _reduced(op: Operation, axes: list[int], keepdim: bool, idx: list[str],
             loop: list[str]) -> list[str]:
    """The input index of a reduction's output idx with the reduced axes at `loop`."""
    out, it, lv = [], iter(idx), iter(loop)
    for a in range(op.operands[0].type.rank):
        if a in axes:
            out.append(next(lv))
            if keepdim:
                next(it)
        else:
            out.append(next(it))
    return out


def _axes(op: Operation) -> list[int]:
    rank = op.operands[0].type.rank
    return sorted(a % rank for a in op.axes) or list(range(rank))


@rule("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "reduce_all",
      "reduce_any")
def _reduce(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x = op.operands[0]
    kind = op.name.split("_")[-1]
    axes = _axes(op)
    extents = [em.dim(x.type.shape[a]) for a in axes]
    combine, init = {"sum": ("sum", "0.0"), "mean": ("sum", "0.0"), "max": ("max", NEG_INF),
                     "min": ("min", POS_INF), "prod": ("prod", "1.0"), "all": ("min", "1.0"),
                     "any": ("max", "0.0")}[kind]
    if kind in ("all", "any"):
        acc = em.reduce(combine, init, extents, lambda loop: (
            f"({em.at(x, _reduced(op, axes, op.keepdim, idx, loop))} != 0).to(tl.float32)"))
        return f"({acc} != 0)"
    if is_float(x):
        acc = em.reduce(combine, init, extents, lambda loop: (
            f"{em.at(x, _reduced(op, axes, op.keepdim, idx, loop))}.to(tl.float32)"))
        return f"{acc} / ({' * '.join(extents)})" if kind == "mean" else acc
    # integers accumulate in i64 (an f32 accumulator loses integers past 2**24), then wrap
    low, high = _int_range(x)
    init = {"sum": "0", "prod": "1", "max": str(low), "min": str(high)}[kind]
    acc = em.reduce(combine, init, extents, lambda loop: (
        f"{em.at(x, _reduced(op, axes, op.keepdim, idx, loop))}.to(tl.int64)"), "tl.int64")
    return f"{acc}.to({tl_dtype(op.result.type)})"


def _int_range(value: Value) -> tuple[int, int]:
    """The smallest and largest value of an integer (or bool) tensor's element type."""
    element = value.type.dtype
    if not isinstance(element, DType):
        raise CodegenError(f"expected an integer or bool tensor, got {value.type}")
    dtype = element.numpy_dtype
    if dtype.kind == "b":
        return 0, 1
    info = np.iinfo(dtype)
    return max(int(info.min), -(2**63) + 1), min(int(info.max), 2**63 - 1)


@rule("argmax", "argmin")
def _argmax(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """The first index of the max (min), as numpy: the first NaN where there is one."""
    x = op.operands[0]
    axis = op.axis % x.type.rank
    largest = op.name == "graph.argmax"
    if is_float(x):
        start, dtype = NEG_INF if largest else POS_INF, "tl.float32"
    else:
        low, high = _int_range(x)
        start, dtype = str(low if largest else high), "tl.int64"
    best = em.let(f"tl.zeros({em.lanes}, {dtype}) + {start}", "best")
    where = em.let(f"tl.zeros({em.lanes}, tl.int64)", "arg")
    with em.loop(em.dim(x.type.shape[axis])) as r:
        v = em.at(x, _reduced(op, [axis], op.keepdim, idx, [r]))
        better = f"{v} {'>' if largest else '<'} {best}"
        if is_float(x):  # a NaN beats all but an earlier NaN
            better = f"({better}) | (({v} != {v}) & ({best} == {best}))"
        better = em.let(better)
        em.emit(f"{where} = tl.where({better}, {r}, {where})")
        em.emit(f"{best} = tl.where({better}, {v}, {best})")
    return where


@rule("cumsum")
def _cumsum(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x = op.operands[0]
    axis = op.axis % x.type.rank
    if not is_float(x):
        raise CodegenError("Triton lowering of integer cumsum is not written yet")

    def body(loop: list[str]) -> str:
        src = list(idx)
        src[axis] = loop[0]
        return f"tl.where({loop[0]} <= {idx[axis]}, {em.at(x, src)}, 0.0)"
    return em.reduce("sum", "0.0", [em.dim(x.type.shape[axis])], body)


@rule("softmax", "log_softmax")
def _softmax(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x = op.operands[0]
    axis = op.axis % x.type.rank
    n = em.dim(x.type.shape[axis])

    def at(r: str) -> str:
        src = list(idx)
        src[axis] = r
        return em.at(x, src)
    m = em.reduce("max", NEG_INF, [n], lambda r: at(r[0]))
    s = em.reduce("sum", "0.0", [n], lambda r: f"tl.exp({at(r[0])} - {m})")
    v = em.at(x, idx)
    if op.name == "graph.softmax":
        return f"tl.exp({v} - {m}) / {s}"
    return f"{v} - {m} - tl.log({s})"


@rule("layer_norm", "rms_norm")
def _norm(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x = op.operands[0]
    rank, nd = x.type.rank, op.ndim
    axes = list(range(rank - nd, rank))
    extents = [em.dim(x.type.shape[a]) for a in axes]
    count = " * ".join(extents)

    def at(loop: list[str]) -> str:
        return em.at(x, idx[:rank - nd] + loop)
    v = em.at(x, idx)
    tail = idx[rank - nd:]
    if op.name == "graph.rms_norm":
        ms = em.reduce("sum", "0.0", extents, lambda r: f"{at(r)} * {at(r)}")
        return em.affine(f"{v} * tl.rsqrt({ms} / ({count}) + {op.eps!r})", op, tail)
    mean = em.let(f"{em.reduce('sum', '0.0', extents, at)} / ({count})", "mean")
    var = em.reduce("sum", "0.0", extents, lambda r: f"({at(r)} - {mean}) * ({at(r)} - {mean})")
    return em.affine(f"({v} - {mean}) * tl.rsqrt({var} / ({count}) + {op.eps!r})", op, tail)


# ---- contractions -----------------------------------------------------------------------------
def _batch_index(t: Value, idx: list[str], batch: int) -> list[str]:
    lead = t.type.shape[:-2]
    got = idx[batch - len(lead):batch] if lead else []
    return ["0" if d == 1 else i for d, i in zip(lead, got, strict=True)]


@rule("matmul")
def _matmul(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    a, b = op.operands
    if a.type.rank < 2 or b.type.rank < 2:
        raise CodegenError("Triton lowering of matmul with a 1-d operand is not written yet")
    batch = len(idx) - 2
    row, col = idx[-2], idx[-1]
    k_dim = a.type.shape[-2] if op.transpose_lhs else a.type.shape[-1]

    def body(r: list[str]) -> str:
        k = r[0]
        lhs = em.at(a, _batch_index(a, idx, batch) + ([k, row] if op.transpose_lhs
                                                       else [row, k]))
        rhs = em.at(b, _batch_index(b, idx, batch) + ([col, k] if op.transpose_rhs
                                                       else [k, col]))
        return f"{lhs} * {rhs}"
    return em.reduce("sum", "0.0", [em.dim(k_dim)], body)


@rule("linear")
def _linear(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x, w = op.operands[0], op.operands[1]
    acc = em.reduce("sum", "0.0", [em.dim(w.type.shape[1])],
                    lambda r: f"{em.at(x, idx[:-1] + [r[0]])} * {em.at(w, [idx[-1], r[0]])}")
    return acc if op.bias is None else f"{acc} + {em.at(op.bias, [idx[-1]])}"


def _nchw_index(op: Operation, idx: list[str]) -> tuple[str, str, str, str]:
    if getattr(op, "layout", "NCHW") == "NCHW":
        return idx[0], idx[1], idx[2], idx[3]
    return idx[0], idx[3], idx[1], idx[2]


def _x_at(op: Operation, em: Emitter, n: str, c: str, y: str, x: str) -> str:
    src = [n, c, y, x] if getattr(op, "layout", "NCHW") == "NCHW" else [n, y, x, c]
    return em.at(op.operands[0], src)


def _hw(op: Operation, em: Emitter) -> tuple[str, str]:
    shape = op.operands[0].type.shape
    h, w = (shape[2], shape[3]) if getattr(op, "layout", "NCHW") == "NCHW" else (shape[1],
                                                                                 shape[2])
    return em.dim(h), em.dim(w)


def _conv(op: Operation, idx: list[str], em: Emitter, weight: Callable[..., str],
          kernel: tuple[int, int, int]) -> str:
    """The direct convolution: loops over (in channel of the group, kernel row, column);
    taps outside the input read 0."""
    kh, kw, cin_g = kernel
    n, oc, oy, ox = _nchw_index(op, idx)
    out_c = op.result.type.shape[1 if op.layout == "NCHW" else 3]
    cout_g = int(out_c) // op.groups
    (sh, sw), (ph, pw), (dh, dw) = op.stride, op.padding, op.dilation
    h, w = _hw(op, em)

    def body(r: list[str]) -> str:
        rc, ry, rx = r
        iy = em.let(f"{oy} * {sh} - {ph} + {ry} * {dh}")
        ix = em.let(f"{ox} * {sw} - {pw} + {rx} * {dw}")
        ic = f"({oc} // {cout_g}) * {cin_g} + {rc}"
        v = _x_at(op, em, n, ic, iy, ix)
        inside = f"({iy} >= 0) & ({iy} < {h}) & ({ix} >= 0) & ({ix} < {w})"
        return f"tl.where({inside}, {v}, 0.0) * {weight(oc, rc, ry, rx)}"
    return em.reduce("sum", "0.0", [str(cin_g), str(kh), str(kw)], body)


@rule("conv2d")
def _conv2d(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    w = op.weight
    if op.layout == "NCHW":
        _, cin_g, kh, kw = (int(d) for d in w.type.shape)
        out = _conv(op, idx, em, lambda oc, rc, ry, rx: em.at(w, [oc, rc, ry, rx]),
                    (kh, kw, cin_g))
    else:
        kh, kw, cin_g, _ = (int(d) for d in w.type.shape)
        out = _conv(op, idx, em, lambda oc, rc, ry, rx: em.at(w, [ry, rx, rc, oc]),
                    (kh, kw, cin_g))
    if op.bias is None:
        return out
    return f"{out} + {em.at(op.bias, [_nchw_index(op, idx)[1]])}"


@rule("max_pool2d", "avg_pool2d")
def _pool(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    kh, kw = op.kernel
    (sh, sw), (ph, pw) = op.stride, op.padding
    dh, dw = op.dilation if op.name == "graph.max_pool2d" else (1, 1)
    n, c, oy, ox = _nchw_index(op, idx)
    h, w = _hw(op, em)

    def tap(r: list[str]) -> tuple[str, str, str, str]:
        iy = em.let(f"{oy} * {sh} - {ph} + {r[0]} * {dh}")
        ix = em.let(f"{ox} * {sw} - {pw} + {r[1]} * {dw}")
        inside = f"(({iy} >= 0) & ({iy} < {h}) & ({ix} >= 0) & ({ix} < {w}))"
        return iy, ix, inside, _x_at(op, em, n, c, iy, ix)
    if op.name == "graph.max_pool2d":
        def body(r: list[str]) -> str:
            _, _, inside, v = tap(r)
            return f"tl.where({inside}, {v}, {NEG_INF})"
        return em.reduce("max", NEG_INF, [str(kh), str(kw)], body)
    total = em.reduce("sum", "0.0", [str(kh), str(kw)],
                      lambda r: (lambda t: f"tl.where({t[2]}, {t[3]}, 0.0)")(tap(r)))
    if op.divisor:
        return f"{total} / {op.divisor}"
    # torch counts the taps inside the padded input (count_include_pad) or the input itself

    def counted(r: list[str]) -> str:
        iy = f"({oy} * {sh} - {ph} + {r[0]})"
        ix = f"({ox} * {sw} - {pw} + {r[1]})"
        lo_y, hi_y = (f"-{ph}", f"{h} + {ph}") if op.count_include_pad else ("0", h)
        lo_x, hi_x = (f"-{pw}", f"{w} + {pw}") if op.count_include_pad else ("0", w)
        return (f"(({iy} >= {lo_y}) & ({iy} < {hi_y}) & ({ix} >= {lo_x}) & "
                f"({ix} < {hi_x})).to(tl.float32)")
    count = em.reduce("sum", "0.0", [str(kh), str(kw)], counted)
    return f"{total} / {count}"


@rule("adaptive_avg_pool2d")
def _adaptive_pool(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """torch's bounds: rows floor(o*H/OH) .. ceil((o+1)*H/OH)."""
    n, c, oy, ox = _nchw_index(op, idx)
    shape = op.operands[0].type.shape
    h, w = (shape[2], shape[3]) if op.layout == "NCHW" else (shape[1], shape[2])
    if not isinstance(h, int) or not isinstance(w, int):
        raise CodegenError("Triton lowering of adaptive pooling needs a static H and W")
    oh, ow = op.size
    y0, y1 = em.let(f"({oy} * {h}) // {oh}"), em.let(f"(({oy} + 1) * {h} + {oh} - 1) // {oh}")
    x0, x1 = em.let(f"({ox} * {w}) // {ow}"), em.let(f"(({ox} + 1) * {w} + {ow} - 1) // {ow}")
    span_y, span_x = -(-h // oh) + 1, -(-w // ow) + 1  # the widest window

    def body(r: list[str]) -> str:
        iy, ix = f"({y0} + {r[0]})", f"({x0} + {r[1]})"
        v = _x_at(op, em, n, c, iy, ix)
        return f"tl.where(({iy} < {y1}) & ({ix} < {x1}), {v}, 0.0)"
    total = em.reduce("sum", "0.0", [str(span_y), str(span_x)], body)
    return f"{total} / (({y1} - {y0}) * ({x1} - {x0})).to(tl.float32)"


@rule("attention")
def _attention(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """softmax(q k^T * scale + mask) v, one output element per lane: max, sum and the
    weighted sum of v are loops over the keys (each score a loop over the head dim)."""
    q, k, v = op.q, op.k, op.v
    rank = q.type.rank
    e_dim, s_dim = q.type.shape[-1], k.type.shape[-2]
    scale = op.scale if op.scale is not None else 1.0 / math.sqrt(int(e_dim))
    lead, row, d = idx[:-2], idx[-2], idx[-1]
    kv_lead = list(lead)
    if op.gqa and rank >= 3:
        group = f"({em.dim(q.type.shape[-3])} // {em.dim(k.type.shape[-3])})"
        kv_lead[-1] = f"({lead[-1]} // {group})"

    def score(j: str) -> str:
        dot = em.reduce("sum", "0.0", [em.dim(e_dim)], lambda r: (
            f"{em.at(q, lead + [row, r[0]])} * {em.at(k, kv_lead + [j, r[0]])}"))
        s = em.let(f"{dot} * {scale!r}", "s")
        if op.mask is not None:
            m = em.at(op.mask, em.broadcast(op.mask, lead + [row, j]))
            s = em.let(f"tl.where({m}, {s}, {NEG_INF})" if str(op.mask.type.dtype) == "bool"
                       else f"{s} + {m}", "s")
        if op.is_causal:
            s = em.let(f"tl.where({j} <= {row}, {s}, {NEG_INF})", "s")
        return s
    n = em.dim(s_dim)
    m = em.reduce("max", NEG_INF, [n], lambda r: score(r[0]))
    total = em.reduce("sum", "0.0", [n], lambda r: f"tl.exp({score(r[0])} - {m})")
    acc = em.reduce("sum", "0.0", [n], lambda r: (
        f"tl.exp({score(r[0])} - {m}) * {em.at(v, kv_lead + [r[0], d])}"))
    return f"{acc} / {total}"


# ---- quant ------------------------------------------------------------------------------------
def weight_at(em: Emitter, weight: Value, scale: Value, zero: Value | None, n: str,
              k: str) -> str:
    """The f32 dequantized element (n, k) of a packed weight: the code cut out of its word
    (and the next, for a code that straddles two), decoded, shifted and scaled."""
    qtype = weight.type.dtype
    if not isinstance(qtype, QuantType):
        raise CodegenError(f"expected a quantized weight, got {weight.type}")
    bits = qtype.bits
    bit = em.let(f"({k}) * {bits}")
    word = em.let(f"{bit} // {WORD}")
    off = em.let(f"({bit} % {WORD}).to(tl.uint32)")
    lo = f"({em.load_words(weight, n, word)} >> {off})"
    nxt = em.load_words(weight, n, f"{word} + 1")
    hi = f"tl.where({off} + {bits} > {WORD}, {nxt} << ({WORD} - {off}), 0)"
    code = em.let(f"({lo} | {hi}) & {(1 << bits) - 1}", "code")
    storage = qtype.storage
    if isinstance(storage, IntType):
        if storage.signed:
            shift = 32 - storage.width
            value = f"(({code} << {shift}).to(tl.int32, bitcast=True) >> {shift}).to(tl.float32)"
        else:
            value = f"{code}.to(tl.float32)"
    else:
        assert isinstance(storage, LowFloatType)
        e_bits, m_bits = storage.exp_bits, storage.man_bits
        bias = (1 << (e_bits - 1)) - 1
        mant = em.let(f"{code} & {(1 << m_bits) - 1}")
        exp = em.let(f"({code} >> {m_bits}) & {(1 << e_bits) - 1}")
        normal = (f"((({exp} + {127 - bias}) << 23) | ({mant} << {23 - m_bits}))"
                  ".to(tl.float32, bitcast=True)")
        sub = f"{mant}.to(tl.float32) * {2.0 ** (1 - bias - m_bits)!r}"
        mag = em.let(f"tl.where({exp} == 0, {sub}, {normal})")
        value = f"tl.where((({code} >> {bits - 1}) & 1) == 1, -{mag}, {mag})"
    g = qtype.group_size
    if qtype.axis is GroupAxis.OUT:
        gi = [n, "0" if g == 0 else f"({k}) // {g}"]
    else:
        gi = ["0" if g == 0 else f"({n}) // {g}", k]
    value = em.let(value, "w")
    if zero is not None and qtype.zero_point is ZeroPoint.MIN:
        return f"{value} * {em.at(scale, gi)} + {em.at(zero, gi)}"
    if zero is not None:
        value = f"({value} - {em.at(zero, gi)})"
    return f"{value} * {em.at(scale, gi)}"


@rule("quant.dequantize")
def _dequantize(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    return weight_at(em, op.weight, op.scale, op.zero, idx[0], idx[1])


@rule("quant.linear")
def _qlinear(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x, w = op.x, op.weight
    if op.act != "f32":
        raise CodegenError(f"quant.linear with act={op.act} (int8 activation blocks) has no "
                           "Triton kernel yet; compile it for the CPU, or with act=f32 for the "
                           "GPU")
    return em.reduce("sum", "0.0", [em.dim(w.type.shape[1])], lambda r: (
        f"{em.at(x, idx[:-1] + [r[0]])} * "
        f"{weight_at(em, w, op.scale, op.zero, idx[-1], r[0])}"))


@rule("quant.conv2d")
def _qconv2d(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    _, cin_g, kh, kw = op.weight_oihw()
    return _conv(op, idx, em, lambda oc, rc, ry, rx: weight_at(
        em, op.weight, op.scale, op.zero, oc, f"(({rc}) * {kh} + {ry}) * {kw} + {rx}"),
        (kh, kw, cin_g))
