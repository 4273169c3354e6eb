"""Tiled Triton contractions: linear, matmul (batched), conv (implicit GEMM) and their quantized
forms, each with its elementwise epilogue, as one program per [BLOCK_M, BLOCK_N] output tile.

Every contraction is read as out[b, m, n] = sum_k A[b, m, k] * B[b, k, n]: a `Contraction` says
what M, N, K and the batch are for the anchor op, and how to fetch an A tile [BLOCK_M, BLOCK_K]
and a B tile [BLOCK_K, BLOCK_N] (a direct masked load when the operand is a kernel input, an
im2col gather for a conv, packed words unpacked and decoded in registers for a quantized weight,
and the generic lowering's expression for an operand computed inside the region). The program
loops over K accumulating in f32: `tl.dot` (tensor cores at f16/bf16; f32 keeps IEEE precision
so results match the interpreter), or, for a GEMV (M of a few rows), a broadcast multiply and a
sum over K, which wastes no MMA rows. The epilogue is the generic lowering again, on 2-d index
tensors, with the anchor's value pinned to the accumulator.

Knobs: BLOCK_M/N/K, GROUP_M (tiles walked in groups of GROUP_M rows so that B stays in L2),
SPLIT_K (K cut across programs that add into a zeroed f32 output; only without an epilogue),
num_warps and num_stages (Triton's software pipelining of the K loop).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...ir import Anchor, Operation, Value
from ...ir.dialects.kernel import FusedOp
from ...ir.types import Dim, format_dim
from ..template import CodegenError
from .emit import TL_DTYPES, Emitter, tl_dtype, yielded
from .emit_nn import ravel, unravel, weight_at

TILED = (Anchor.MATMUL, Anchor.CONV)
"""The anchor kinds a tiled contraction computes (pools and attention have templates of their
own)."""


class TileEmitter(Emitter):
    """The generic emitter over 2-d tiles, with values pinned to names (the accumulator)."""

    def __init__(self, kernel: FusedOp, lanes: str) -> None:
        super().__init__(kernel)
        self.lanes = lanes
        self.pinned: dict[Value, tuple[tuple[str, ...], str]] = {}

    def at(self, value: Value, idx: Sequence[str]) -> str:
        if value in self.pinned:
            want, name = self.pinned[value]
            if tuple(idx) != want:
                raise CodegenError(f"kernel '{self.kernel.kernel_name}': the epilogue reads the "
                                   "contraction at another index than the tile's own")
            return name
        return super().at(value, idx)

    def tile(self, value: Value, idx: list[str], mask: str, dtype: str) -> str:
        """`value` at idx where mask holds, 0 elsewhere, as `dtype`: a masked load of a kernel
        input (unclamped offsets: masked lanes are never read), else the generic expression."""
        if value in self.inputs:
            off = ravel(idx, self.shape(value))
            expr = f"tl.load(in{self.inputs[value]} + {off}, mask={mask}, other=0.0)"
        else:
            expr = f"tl.where({mask}, {self.at(value, idx)}, 0.0)"
        return self.let(f"{expr}.to({dtype})", "a")


def normalized(value: Value, idx: list[str]) -> list[str]:
    """idx with "0" on the dims of size 1 (as the generic emitter's broadcast writes them)."""
    return ["0" if d == 1 else i for d, i in zip(value.type.shape, idx, strict=True)]


def _lead_index(t: Value, batch_idx: list[str], keep: int) -> list[str]:
    """An operand's batch index (right-aligned, size-1 dims broadcast) for the result's batch."""
    lead = t.type.shape[:t.type.rank - keep]
    got = batch_idx[len(batch_idx) - len(lead):] if lead else []
    return ["0" if d == 1 else i for d, i in zip(lead, got, strict=True)]


TileFn = Callable[[TileEmitter, list[str], list[str], str, str], str]
"""(emitter, batch index, row index, column-side index, mask) -> a tile expression."""


@dataclass
class Contraction:
    """How one anchor op reads as a (batched) GEMM."""

    anchor: Operation
    batch: list[Dim]
    m: list[Dim]  # the result dims M ravels (rows)
    n: Dim
    k: Dim
    a: TileFn  # (em, batch idx, m idx, rk2, mask) -> the A tile [BLOCK_M, BLOCK_K]
    b: TileFn  # (em, batch idx, [rn2], rk2, mask) -> the B tile [BLOCK_K, BLOCK_N]
    out: Callable[[list[str], list[str], str], list[str]]  # (batch idx, m idx, rn2) -> idx
    bias: Value | None
    dtype: str  # the element type of the dot's operands

    @property
    def static_m(self) -> int | None:
        rows = [d for d in self.m if isinstance(d, int)]
        return math.prod(rows) if len(rows) == len(self.m) else None


def contraction(op: Operation) -> Contraction | None:
    """The GEMM view of an anchor op, or None where no tile template applies."""
    dtype = str(op.results[0].type.dtype)
    if dtype not in ("f32", "f16", "bf16"):
        return None
    dot = TL_DTYPES[dtype]
    if op.name in ("graph.linear", "quant.linear"):
        if op.attributes.get("act", "f32") != "f32":
            return None  # int8 activation blocks: the element emitter refuses it, with a reason
        return _linear_contraction(op, dtype, dot)
    if op.name == "graph.matmul":
        return _matmul_contraction(op, dtype, dot)
    if op.name in ("graph.conv2d", "quant.conv2d"):
        return _conv_contraction(op, dot)
    return None


def _linear_contraction(op: Operation, dtype: str, dot: str) -> Contraction | None:
    """x [..., K] @ W^T for W [N, K], plain or packed (dequantized in registers)."""
    x = op.operands[0]
    if x.type.rank < 2 or str(x.type.dtype) != dtype:
        return None
    w = op.operands[1]
    n, k = w.type.shape
    if op.name == "graph.linear":
        def b(em: TileEmitter, bi: list[str], rn: list[str], rk: str, mask: str) -> str:
            return em.tile(w, [rn[0], rk], mask, dot)
    else:
        def b(em: TileEmitter, bi: list[str], rn: list[str], rk: str, mask: str) -> str:
            value = weight_at(em, w, op.scale, op.zero, rn[0], rk)
            return em.let(f"tl.where({mask}, {value}, 0.0).to({dot})", "b")
    return Contraction(
        op, [], list(x.type.shape[:-1]), n, k,
        a=lambda em, bi, mi, rk, mask: em.tile(x, normalized(x, [*mi, rk]), mask, dot),
        b=b, out=lambda bi, mi, rn: [*mi, rn], bias=getattr(op, "bias", None), dtype=dot)


def _matmul_contraction(op: Operation, dtype: str, dot: str) -> Contraction | None:
    """Batched lhs @ rhs, either side transposed, batch dims broadcast."""
    lhs, rhs = op.operands
    if lhs.type.rank < 2 or rhs.type.rank < 2 or str(rhs.type.dtype) != dtype:
        return None
    shape = op.results[0].type.shape
    k = lhs.type.shape[-2] if op.transpose_lhs else lhs.type.shape[-1]

    def a(em: TileEmitter, bi: list[str], mi: list[str], rk: str, mask: str) -> str:
        tail = [rk, mi[0]] if op.transpose_lhs else [mi[0], rk]
        return em.tile(lhs, normalized(lhs, _lead_index(lhs, bi, 2) + tail), mask, dot)

    def b(em: TileEmitter, bi: list[str], rn: list[str], rk: str, mask: str) -> str:
        tail = [rn[0], rk] if op.transpose_rhs else [rk, rn[0]]
        return em.tile(rhs, normalized(rhs, _lead_index(rhs, bi, 2) + tail), mask, dot)
    return Contraction(op, list(shape[:-2]), [shape[-2]], shape[-1], k, a=a, b=b,
                       out=lambda bi, mi, rn: [*bi, *mi, rn], bias=None, dtype=dot)


def _conv_contraction(op: Operation, dot: str) -> Contraction | None:
    """An NCHW conv as an implicit GEMM: M over (image, output row, output column), N the
    output channels, K over (input channel, kernel row, kernel column), gathered im2col-style."""
    if op.layout != "NCHW" or op.groups != 1:
        return None
    x = op.operands[0]
    nb, c, h, w_ = x.type.shape
    _, oc, oh, ow = op.results[0].type.shape
    if op.name == "graph.conv2d":
        kh, kw = op.weight.type.shape[2:]
    else:
        _, _, kh, kw = op.weight_oihw()
    (sh, sw), (ph, pw), (dh, dw) = op.stride, op.padding, op.dilation

    def split(em: TileEmitter, rk: str) -> tuple[str, str, str]:
        return (em.let(f"{rk} // {kh * kw}", "ic"), em.let(f"({rk} // {kw}) % {kh}", "ky"),
                em.let(f"{rk} % {kw}", "kx"))

    def a(em: TileEmitter, bi: list[str], mi: list[str], rk: str, mask: str) -> str:
        n_, oy, ox = mi
        ic, ky, kx = split(em, rk)
        iy = em.let(f"{oy} * {sh} - {ph} + {ky} * {dh}", "iy")
        ix = em.let(f"{ox} * {sw} - {pw} + {kx} * {dw}", "ix")
        hh, ww = em.dim(h), em.dim(w_)
        inside = f"{mask} & ({iy} >= 0) & ({iy} < {hh}) & ({ix} >= 0) & ({ix} < {ww})"
        return em.tile(x, normalized(x, [n_, ic, iy, ix]), inside, dot)
    if op.name == "graph.conv2d":
        def b(em: TileEmitter, bi: list[str], rn: list[str], rk: str, mask: str) -> str:
            ic, ky, kx = split(em, rk)
            return em.tile(op.weight, normalized(op.weight, [rn[0], ic, ky, kx]), mask, dot)
    else:
        def b(em: TileEmitter, bi: list[str], rn: list[str], rk: str, mask: str) -> str:
            value = weight_at(em, op.weight, op.scale, op.zero, rn[0], rk)
            return em.let(f"tl.where({mask}, {value}, 0.0).to({dot})", "b")
    return Contraction(op, [], [nb, oh, ow], oc, int(c) * kh * kw, a=a, b=b,
                       out=lambda bi, mi, rn: [mi[0], rn, mi[1], mi[2]],
                       bias=getattr(op, "bias", None), dtype=dot)


def anchor_of(kernel: FusedOp, in_epilogue: Callable[[Operation], bool]) -> Operation | None:
    """The region's one contraction when everything else is elementwise and the single output
    has the contraction's shape; None otherwise."""
    anchors = [o for o in kernel.body_ops if o.ANCHOR in TILED]
    if len(anchors) != 1 or any(not in_epilogue(o) for o in kernel.body_ops
                                if o is not anchors[0]):
        return None
    outputs = yielded(kernel)
    if len(outputs) != 1 or outputs[0].type.shape != anchors[0].results[0].type.shape:
        return None
    return anchors[0]


def _dims(dims: list[Dim]) -> list[int | str]:
    return [d if isinstance(d, int) else format_dim(d) for d in dims]


def generate_contraction(kernel: FusedOp, c: Contraction, inner: str) -> tuple[str, list[dict]]:
    """Triton source of a tiled contraction and its launch (grid: tiles x batch x split-K)."""
    em = TileEmitter(kernel, "[BLOCK_M, BLOCK_N]")
    out = yielded(kernel)[0]
    sizes = [*c.m, c.n, c.k, *c.batch, *out.type.shape] + [
        d for v in kernel.regions[0].block.args for d in v.type.shape]
    big = any(not isinstance(d, int) for d in sizes) or any(
        math.prod(v.type.shape) >= 2**31 for v in (*kernel.regions[0].block.args, out)
        if all(isinstance(d, int) for d in v.type.shape))
    wide = ".to(tl.int64)" if big else ""
    m = " * ".join(f"({em.dim(d)})" for d in c.m) or "1"
    n, k = em.dim(c.n), em.dim(c.k)
    em.emit("pid = tl.program_id(0)")
    em.emit(f"num_n = tl.cdiv({n}, BLOCK_N)")
    em.emit(f"num_m = tl.cdiv({m}, BLOCK_M)")
    em.emit("width = GROUP_M * num_n")
    em.emit("first_m = (pid // width) * GROUP_M")
    em.emit("size_m = tl.minimum(num_m - first_m, GROUP_M)")
    em.emit("pid_m = first_m + (pid % width) % size_m")
    em.emit("pid_n = (pid % width) // size_m")
    em.emit("pid_k = tl.program_id(2)")
    batch_idx: list[str] = []
    if c.batch:
        em.emit(f"pid_b = tl.program_id(1){wide}")
        batch_idx = unravel(em, "pid_b", [em.dim(d) for d in c.batch])
    em.emit(f"rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)){wide}")
    em.emit(f"rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)){wide}")
    m_idx = unravel(em, "rm[:, None]", [em.dim(d) for d in c.m])
    rn = "rn[None, :]"
    em.emit("acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)")
    with em.block(f"for k0 in range(0, {k}, BLOCK_K * SPLIT_K):"):
        em.emit(f"rk = (k0 + pid_k * BLOCK_K + tl.arange(0, BLOCK_K)){wide}")
        a = c.a(em, batch_idx, m_idx, "rk[None, :]",
                f"(rm[:, None] < {m}) & (rk[None, :] < {k})")
        b = c.b(em, batch_idx, ["rn[None, :]"], "rk[:, None]",
                f"(rk[:, None] < {k}) & (rn[None, :] < {n})")
        if inner == "dot":
            precision = ', input_precision="ieee"' if c.dtype == "tl.float32" else ""
            em.emit(f"acc = tl.dot({a}, {b}, acc{precision})")
        else:
            em.emit(f"acc += tl.sum({a}.to(tl.float32)[:, :, None] * "
                    f"{b}.to(tl.float32)[None, :, :], axis=1)")
    seed = "acc"
    if c.bias is not None:
        bias = em.at(c.bias, [rn])
        seed = em.let(f"acc + tl.where(pid_k == 0, {bias}, 0.0)", "acc")
    anchor = c.anchor.results[0]
    idx = normalized(anchor, c.out(batch_idx, m_idx, rn))
    em.pinned[anchor] = (tuple(idx), seed)
    value = em.at(out, idx)
    off = em.let(ravel(idx, em.shape(out)), "off")
    em.emit(f"mask = (rm[:, None] < {m}) & ({rn} < {n})")
    em.emit(f"value = tl.broadcast_to({value}, [BLOCK_M, BLOCK_N]).to({tl_dtype(out.type)})")
    with em.block("if SPLIT_K == 1:"):
        em.emit(f"tl.store(out0 + {off}, value, mask=mask)")
    with em.block("else:"):
        em.emit(f"tl.atomic_add(out0 + {off}, value, mask=mask)")
    params = [f"in{i}" for i in range(len(kernel.regions[0].block.args))] + ["out0"]
    params += list(em.dim_args.values())
    consts = ", ".join(f"{p}: tl.constexpr" for p in
                       ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K"))
    header = (f'"""Kernel {kernel.kernel_name}: generated by bitsmith (tiled contraction: '
              f'{c.anchor.name}, {"tl.dot" if inner == "dot" else "GEMV"} over K, the '
              'epilogue on the f32 accumulator)."""\nimport triton\nimport triton.language as '
              'tl\n\n\n')
    source = (header + "@triton.jit\n" + f"def out0({', '.join(params)}, {consts}):\n"
              + "\n".join(em.lines) + "\n")
    grid = [[[_dims(c.m), "BLOCK_M"], [_dims([c.n]), "BLOCK_N"]],
            [[_dims(c.batch), None]], [[["SPLIT_K"], None]]]
    return source, [{"fn": "out0", "output": 0, "grid": grid, "dims": list(em.dim_args)}]
