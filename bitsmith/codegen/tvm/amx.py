# pyright: reportInvalidTypeForm=false, reportMissingModuleSource=false
"""AMX: bf16 GEMMs on Intel's tile unit, reached from TVM through LLVM's tile intrinsics.

A tile register holds up to 16 rows of 64 bytes. `tdpbf16ps C, A, B` adds to the f32 tile C
(16 x 16) the product of A (16 rows x 32 bf16) and B (16 rows of 16 column *pairs*: the
reduction's consecutive pairs interleaved, "VNNI" layout), with f32 accumulation. The kernel
here keeps 2 x 2 C tiles (32 rows x 32 columns) in tmm0-3, loads two A tiles (tmm4-5) and two
B tiles (tmm6-7) per 32-long reduction step, and issues four `tdpbf16ps`.

Every thread configures its tiles (`ldtilecfg`) at the start of its work and releases them at
the end; the process asks Linux for the tile state once (`runtime.host.request_amx`), before
any AMX kernel runs, or the first tile instruction is a SIGILL.

The weight is packed at compile time: [N/32 panels, K/2 pairs, 32 columns, 2] bf16 bits (N and
K zero-padded to 32). Activations are rounded to bf16 (nearest even, NaN kept) into a padded
workspace by the kernel itself.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from ..template import Target

TILE = 16  # rows of a tile; 16 f32 or 32 bf16 per 64-byte row
BLOCK = 32  # rows, columns and reduction step of the 2 x 2 tile micro-kernel
CVT = 16  # f32 values one AVX512-BF16 conversion rounds to bf16


def has_amx_bf16(target: Target) -> bool:
    """Whether the target CPU has the AMX tile unit with bf16 dot products (and AVX512-BF16,
    which rounds the activations; every CPU with AMX-BF16 has it)."""
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(target.isa)


def amx_attrs() -> list[str]:
    """LLVM target features that AMX kernels need (LLVM may not know the host CPU's name as
    one with AMX: a virtual machine can report an older model)."""
    return ["+amx-tile", "+amx-bf16", "+amx-int8", "+avx512bf16"]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000),
                    np.uint16(0x7FC0), rounded).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> f32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _up(v: int, to: int) -> int:
    return -(-v // to) * to


def pack_bf16_panels(weight: np.ndarray, transposed: bool = True) -> np.ndarray:
    """[N, K] (transposed, torch's linear weight) or [K, N] f32 -> bf16 bits in panels
    [N/32, K/2, 32, 2] (N and K zero-padded to multiples of 32)."""
    w = weight if transposed else weight.T
    n, k = w.shape
    padded = np.zeros((_up(n, BLOCK), _up(k, BLOCK)), np.float32)
    padded[:n, :k] = w
    bits = bf16_bits(padded)  # [Np, Kp]
    panels = bits.reshape(-1, BLOCK, _up(k, BLOCK) // 2, 2)  # [P, 32 cols, K/2, 2]
    return np.ascontiguousarray(panels.transpose(0, 2, 1, 3))


def _to_bf16(v: Any) -> Any:
    """TIR: the bf16 bits (uint16) of an f32 value, rounded to nearest even, NaN kept."""
    u = T.reinterpret("uint32", v)
    rounded = T.Cast("uint16", (u + T.uint32(0x7FFF) + ((u >> T.uint32(16)) & T.uint32(1)))
                     >> T.uint32(16))
    return T.if_then_else((u & T.uint32(0x7FFFFFFF)) > T.uint32(0x7F800000), T.uint16(0x7FC0),
                          rounded)


def _tile(name: str, *args: Any) -> Any:
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _c_tile(acc: Any, rb: Any, p: Any, stride: int, t: int) -> Any:
    """Store accumulator tile t (of 4: 2 x 2) of row block rb, panel p."""
    return T.evaluate(T.call_llvm_intrin(
        "void", "llvm.x86.tilestored64", T.int8(t),
        T.address_of(acc[rb * BLOCK + (t // 2) * TILE, p * BLOCK + (t % 2) * TILE]),
        T.int64(stride * 4)))


def _row(x: Any, lead: tuple[int, ...], i: Any, c: Any) -> Any:
    """x[row i, column c] of an x whose leading dims `lead` are flattened into rows."""
    idx = []
    for d in reversed(lead[1:]):
        idx.append(i % d)
        i = i // d
    return x[(i, *reversed(idx), c)]


def _plain_rows(x_shape: tuple[Any, ...]) -> tuple[int, int, int, Callable[..., Any]]:
    """`gemm_bf16`'s rows of an x (..., k): its leading dims flattened, one run of k each."""
    *lead_list, k = (int(d) for d in x_shape)
    lead = tuple(lead_list)
    m = 1
    for d in lead:
        m *= d
    return m, 1, k, lambda x, i, g, c: _row(x, lead, i, c)


def gemm_bf16(x_shape: tuple[Any, ...], n: int, order: str = "nm",
              w_shape: tuple[Any, ...] | None = None,
              rows: tuple[int, int, int, Callable[..., Any]] | None = None,
              row_group: int = 0) -> tvm.tirx.PrimFunc:
    """acc[mp, np] (f32, rows and columns padded to 32) = bf16(x) @ bf16(W)^T, for an x of
    static shape (..., k) whose leading dims are the rows, and W packed by
    `pack_bf16_panels`. `order`: the (panel, row block) tasks panel-major ("nm": a core's
    consecutive tasks share the weight panel) or row-major ("mn": they share the rows).
    `x_shape` and `w_shape` may be a tensor's own shape expressions: the parameters are
    declared with those very objects (what `te.extern` checks). `rows` = (m, groups, inner,
    read) makes the GEMM's left operand m rows of `groups` runs of `inner` values,
    `read(x, row, group, i)` (a convolution's windows: a run is one kernel position's input
    channels, contiguous in x) rather than x's own rows. Work items (the parallel grain) are
    one 32-column panel x `row_group` blocks of 32 rows (0: every row)."""
    m, groups, inner, read = rows or _plain_rows(x_shape)
    k = groups * inner
    mp, np_, kp = _up(m, BLOCK), _up(n, BLOCK), _up(k, BLOCK)
    panels, blocks, steps = np_ // BLOCK, mp // BLOCK, kp // BLOCK
    x_dims = tuple(x_shape)
    w_dims = tuple(w_shape) if w_shape is not None else (panels, kp // 2, BLOCK, 2)
    panel_major = order == "nm"
    group = min(row_group or blocks, blocks)
    row_groups = -(-blocks // group)

    @T.prim_func
    def main(x: T.Buffer(x_dims, "float32"), w: T.Buffer(w_dims, "uint16"),
             acc: T.Buffer((mp, np_), "float32")) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        xa = T.decl_buffer((mp, kp), "uint16")
        for i in T.parallel(mp):  # the left operand in bf16, zero-padded to whole blocks
            if i < m:
                for g in range(groups):
                    for c in range(inner // CVT):  # vcvtneps2bf16: 16 values at a time
                        xa[i, T.Ramp(g * inner + c * CVT, 1, CVT)] = T.call_llvm_pure_intrin(
                            f"uint16x{CVT}", "llvm.x86.avx512bf16.cvtneps2bf16.512",
                            read(x, i, g, T.Ramp(c * CVT, 1, CVT)))
                    for c in range(inner % CVT):
                        xa[i, g * inner + inner // CVT * CVT + c] = _to_bf16(
                            read(x, i, g, inner // CVT * CVT + c))
                for c in range(kp - k):
                    xa[i, k + c] = T.uint16(0)
            else:
                for c in range(kp):
                    xa[i, c] = T.uint16(0)
        for item in T.parallel(panels * row_groups):
            # an item: one panel x a group of row blocks
            p = T.if_then_else(panel_major, item // row_groups, item % panels)
            g = T.if_then_else(panel_major, item % row_groups, item // panels)
            cfg = T.decl_buffer((64,), "uint8", scope="local")
            for b in range(64):
                cfg[b] = T.uint8(0)
            cfg[0] = T.uint8(1)  # palette 1
            for t in range(8):  # every tile: 16 rows of 64 bytes
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(TILE)
            _tile("ldtilecfg", T.address_of(cfg[0]))
            for rb in range(g * group, T.min(g * group + group, blocks)):
                _tile("tilezero", T.int8(0))
                _tile("tilezero", T.int8(1))
                _tile("tilezero", T.int8(2))
                _tile("tilezero", T.int8(3))
                for s in range(steps):
                    _tile("tileloadd64", T.int8(4), T.address_of(xa[rb * BLOCK, s * BLOCK]),
                          T.int64(kp * 2))
                    _tile("tileloadd64", T.int8(5),
                          T.address_of(xa[rb * BLOCK + TILE, s * BLOCK]), T.int64(kp * 2))
                    _tile("tileloadd64", T.int8(6), T.address_of(w[p, s * TILE, 0, 0]),
                          T.int64(BLOCK * 4))
                    _tile("tileloadd64", T.int8(7), T.address_of(w[p, s * TILE, TILE, 0]),
                          T.int64(BLOCK * 4))
                    _tile("tdpbf16ps", T.int8(0), T.int8(4), T.int8(6))
                    _tile("tdpbf16ps", T.int8(1), T.int8(4), T.int8(7))
                    _tile("tdpbf16ps", T.int8(2), T.int8(5), T.int8(6))
                    _tile("tdpbf16ps", T.int8(3), T.int8(5), T.int8(7))
                _c_tile(acc, rb, p, np_, 0)
                _c_tile(acc, rb, p, np_, 1)
                _c_tile(acc, rb, p, np_, 2)
                _c_tile(acc, rb, p, np_, 3)
            _tile("tilerelease")
    return main


def gemm_bf16_extern(x: Any, w: Any, n: int, order: str,
                     rows: tuple[int, int, int, Callable[..., Any]] | None = None,
                     row_group: int = 0) -> Any:
    """`gemm_bf16` as a `te.extern` over tensors x (..., k) f32 and w (the packed panels): the
    padded f32 result tensor. The extern's buffers are the function's own parameters, so its
    body is used as it is."""
    func: Any = gemm_bf16(tuple(x.shape), n, order, tuple(w.shape), rows, row_group)
    bufs = list(func.params)  # TVM 0.27: a buffer parameter is its buffer
    out = te.extern([bufs[2].shape], [x, w], lambda ins, outs: func.body, dtype=["float32"],
                    in_buffers=bufs[:2], out_buffers=[bufs[2]], name="amx_gemm")
    return out if isinstance(out, te.Tensor) else out[0]


def amx_tvm_target(target: Target) -> tvm.target.Target:
    """The TVM target of an AMX kernel: the host's, with the tile features switched on."""
    spec: dict[str, Any] = {"kind": "llvm", "num-cores": target.cores, "mattr": amx_attrs()}
    if target.mcpu:
        spec["mcpu"] = target.mcpu
    return tvm.target.Target(spec)
