"""Flash-style attention for Triton: `graph.attention` (causal, bool or additive mask, GQA) as
one program per (BLOCK_M queries, batch x head), streaming the keys in BLOCK_N blocks with an
online softmax, so the [L, S] scores are never stored.

Per key block: s = q k^T * scale (`tl.dot`), masked to -inf where the mask, causality or the
end of the keys say so; the running max m, the running sum l and the accumulator are rescaled
by exp(m_old - m_new). A query that every key is masked from ends with l = 0 and is written as
0, as torch's SDPA (and the interpreter) give.
"""
from __future__ import annotations

import math

from ...ir import Operation
from ...ir.dialects.kernel import FusedOp
from ...ir.types import format_dim
from .emit import TL_DTYPES, Emitter, tl_dtype
from .emit_nn import ravel, unravel
from .tiles import normalized


def attention_op(kernel: FusedOp) -> Operation | None:
    """The region's attention when it is the region's only op, reading kernel inputs."""
    ops = kernel.body_ops
    if len(ops) != 1 or ops[0].name != "graph.attention":
        return None
    op = ops[0]
    args = set(kernel.regions[0].block.args)
    if op.q.type.rank < 2 or any(v not in args for v in op.operands):
        return None
    if str(op.q.type.dtype) not in ("f32", "f16", "bf16"):
        return None
    if not all(isinstance(d, int) for d in (op.q.type.shape[-1], op.v.type.shape[-1])):
        return None
    return op


def head_blocks(op: Operation) -> tuple[int, int]:
    """The lanes of the q/k head dim and of v's head dim (powers of two, 16 at least)."""
    def fit(n: int) -> int:
        return max(16, 1 << max(0, (int(n) - 1).bit_length()))
    return fit(op.q.type.shape[-1]), fit(op.v.type.shape[-1])


def generate_attention(kernel: FusedOp, op: Operation) -> tuple[str, list[dict]]:
    """Triton source of the flash attention kernel and its launch."""
    em = Emitter(kernel)
    q, k, v, mask = op.q, op.k, op.v, op.mask
    inp = {val: f"in{i}" for val, i in em.inputs.items()}
    rank = q.type.rank
    lead = q.type.shape[:-2]
    l_dim, e_dim = em.dim(q.type.shape[-2]), em.dim(q.type.shape[-1])
    s_dim, d_dim = em.dim(k.type.shape[-2]), em.dim(v.type.shape[-1])
    scale = op.scale if op.scale is not None else 1.0 / math.sqrt(int(q.type.shape[-1]))
    dot = TL_DTYPES[str(q.type.dtype)]
    precision = ', input_precision="ieee"' if dot == "tl.float32" else ""
    big = any(not isinstance(d, int) for t in (q, k, v) for d in t.type.shape) or any(
        math.prod(t.type.shape) >= 2**31 for t in (q, k, v))
    wide = ".to(tl.int64)" if big else ""
    em.emit(f"rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)){wide}")
    em.emit(f"bh = tl.program_id(1){wide}")
    em.emit("re = tl.arange(0, BLOCK_E)")
    em.emit("rd = tl.arange(0, BLOCK_D)")
    lead_idx = unravel(em, "bh", [em.dim(d) for d in lead]) if lead else []
    kv_idx = list(lead_idx)
    if op.gqa and rank >= 3:
        group = f"({em.dim(q.type.shape[-3])} // {em.dim(k.type.shape[-3])})"
        kv_idx[-1] = em.let(f"{lead_idx[-1]} // {group}", "h")

    def at(t, idx: list[str]) -> str:
        return ravel(normalized(t, idx), em.shape(t))
    q_mask = f"(rm[:, None] < {l_dim}) & (re[None, :] < {e_dim})"
    em.emit(f"qt = tl.load({inp[q]} + {at(q, [*lead_idx, 'rm[:, None]', 're[None, :]'])}, "
            f"mask={q_mask}, other=0.0).to({dot})")
    em.emit("m_i = tl.full([BLOCK_M], -float('inf'), tl.float32)")
    em.emit("l_i = tl.zeros([BLOCK_M], tl.float32)")
    em.emit("acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)")
    with em.block(f"for n0 in range(0, {s_dim}, BLOCK_N):"):
        em.emit("rn = n0 + tl.arange(0, BLOCK_N)")
        k_off = at(k, [*kv_idx, "rn[None, :]", "re[:, None]"])
        em.emit(f"kt = tl.load({inp[k]} + {k_off}, mask=(re[:, None] < {e_dim}) & "
                f"(rn[None, :] < {s_dim}), other=0.0).to({dot})")
        em.emit(f"s = tl.dot(qt, kt{precision}) * {scale!r}")
        keep = f"(rn[None, :] < {s_dim})"
        if op.is_causal:
            keep += " & (rn[None, :] <= rm[:, None])"
        if mask is not None:
            full = [*lead_idx, "rm[:, None]", "rn[None, :]"]
            m_idx = full[len(full) - mask.type.rank:]
            bounds = f"(rm[:, None] < {l_dim}) & (rn[None, :] < {s_dim})"
            em.emit(f"mv = tl.load({inp[mask]} + {at(mask, m_idx)}, mask={bounds}, other=0)")
            if str(mask.type.dtype) == "bool":
                keep += " & (mv != 0)"
            else:
                em.emit("s = s + mv.to(tl.float32)")
        em.emit(f"s = tl.where({keep}, s, -float('inf'))")
        em.emit("m_new = tl.maximum(m_i, tl.max(s, 1))")
        em.emit("m_safe = tl.where(m_new == -float('inf'), 0.0, m_new)")
        em.emit("p = tl.exp(s - m_safe[:, None])")
        em.emit("alpha = tl.exp(m_i - m_safe)")
        em.emit("l_i = l_i * alpha + tl.sum(p, 1)")
        v_off = at(v, [*kv_idx, "rn[:, None]", "rd[None, :]"])
        em.emit(f"vt = tl.load({inp[v]} + {v_off}, mask=(rn[:, None] < {s_dim}) & "
                f"(rd[None, :] < {d_dim}), other=0.0).to({dot})")
        em.emit(f"acc = acc * alpha[:, None] + tl.dot(p.to({dot}), vt{precision})")
        em.emit("m_i = m_new")
    out = op.result
    em.emit("o = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)")
    o_off = at(out, [*lead_idx, "rm[:, None]", "rd[None, :]"])
    em.emit(f"tl.store(out0 + {o_off}, o.to({tl_dtype(out.type)}), "
            f"mask=(rm[:, None] < {l_dim}) & (rd[None, :] < {d_dim}))")
    params = [f"in{i}" for i in range(len(kernel.regions[0].block.args))] + ["out0"]
    params += list(em.dim_args.values())
    consts = ", ".join(f"{c}: tl.constexpr" for c in ("BLOCK_M", "BLOCK_N", "BLOCK_E",
                                                     "BLOCK_D"))
    source = (f'"""Kernel {kernel.kernel_name}: generated by bitsmith (flash attention: keys '
              'streamed in blocks, online softmax)."""\nimport triton\nimport triton.language '
              'as tl\n\n\n@triton.jit\n'
              f"def out0({', '.join(params)}, {consts}):\n" + "\n".join(em.lines) + "\n")
    dims = [d if isinstance(d, int) else format_dim(d) for d in lead]
    l_ext = q.type.shape[-2]
    grid = [[[[l_ext if isinstance(l_ext, int) else format_dim(l_ext)], "BLOCK_M"]],
            [[dims, None]]]
    return source, [{"fn": "out0", "output": 0, "grid": grid, "dims": list(em.dim_args)}]
