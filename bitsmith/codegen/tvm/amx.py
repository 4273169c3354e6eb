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

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from ...errors import CodegenError
from ..template import Target

TILE = 16  # rows of a tile; 16 f32 or 32 bf16 per 64-byte row
BLOCK = 32  # rows, columns and reduction step of the 2 x 2 tile micro-kernel
CVT = 16  # f32 values one AVX512-BF16 conversion rounds to bf16


def has_amx_bf16(target: Target) -> bool:
    """Whether the target CPU has the AMX tile unit with bf16 dot products (and AVX512-BF16,
    which rounds the activations; every CPU with AMX-BF16 has it)."""
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(target.isa)


def has_amx(target: Target, precision: str) -> bool:
    """Whether the target runs the AMX kernels of `precision` ("bf16" or "int8")."""
    if precision == "int8":
        return {"amx_tile", "amx_int8"} <= set(target.isa)
    return has_amx_bf16(target)


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


def _i32_tile(sums: Any, t: int) -> Any:
    """Store int32 accumulator tile t (of 4: 2 x 2) into the local 32 x 32 block `sums`."""
    return T.evaluate(T.call_llvm_intrin(
        "void", "llvm.x86.tilestored64", T.int8(t),
        T.address_of(sums[(t // 2) * TILE, (t % 2) * TILE]), T.int64(BLOCK * 4)))


def unflatten(i: Any, lead: Sequence[int], c: Any) -> list[Any]:
    """The index of row i, column c in a tensor whose leading dims `lead` are flattened
    into rows."""
    idx = []
    for d in reversed(lead[1:]):
        idx.append(i % d)
        i = i // d
    return [i, *reversed(idx), c]


def flatten(index: Sequence[Any], lead: Sequence[int]) -> Any:
    """`unflatten`'s inverse: the row of an index (its last entry the column)."""
    row = index[0]
    for axis, d in zip(index[1:-1], lead[1:], strict=True):
        row = row * d + axis
    return row


def _row(x: Any, lead: tuple[int, ...], i: Any, c: Any) -> Any:
    """x[row i, column c] of an x whose leading dims `lead` are flattened into rows."""
    return x[tuple(unflatten(i, lead, c))]


def _plain_rows(x_shape: tuple[Any, ...]) -> tuple[int, int, int, Callable[..., Any]]:
    """`gemm_bf16`'s rows of an x (..., k): its leading dims flattened, one run of k each."""
    *lead_list, k = (int(d) for d in x_shape)
    lead = tuple(lead_list)
    m = 1
    for d in lead:
        m *= d
    return m, 1, k, lambda x, i, g, c: _row(x, lead, i, c)


class Kind(NamedTuple):
    """What one AMX dot-product flavour needs: the operands' storage, the reduction step a
    64-byte tile row holds, the values a 4-byte group packs, the instruction."""

    storage: str
    step: int
    group: int
    instr: str


KINDS = {"bf16": Kind("uint16", 32, 2, "tdpbf16ps"), "int8": Kind("int8", 64, 4, "tdpbssd")}
"""bf16: `tdpbf16ps` (bf16 pairs, f32 sums); int8: `tdpbssd` (signed bytes in fours, int32
sums)."""


def gemm_bf16(x_shape: tuple[Any, ...], n: int, order: str = "nm",
              w_shape: tuple[Any, ...] | None = None,
              rows: tuple[int, int, int, Callable[..., Any]] | None = None,
              row_group: int = 0) -> tvm.tirx.PrimFunc:
    """acc[mp, np] (f32, rows and columns padded to 32) = bf16(x) @ bf16(W)^T, for an x of
    static shape (..., k) whose leading dims are the rows, and W packed by
    `pack_bf16_panels`; see `gemm`."""
    return gemm("bf16", x_shape, n, order, w_shape, rows, row_group)


def gemm_int8(x_shape: tuple[Any, ...], n: int, order: str = "nm",
              w_shape: tuple[Any, ...] | None = None,
              rows: tuple[int, int, int, Callable[..., Any]] | None = None,
              row_group: int = 0) -> tvm.tirx.PrimFunc:
    """acc[mp, np] (f32) = dequantized int8(x) @ int8(W)^T: each row of x quantized by the
    kernel to int8 on its own scale (max |x| / 127, symmetric, round to nearest even), W
    packed by `pack_int8_panels` (int8 per output column, its scales in the panel's last
    group row); int32 sums, scaled once per output. A row holding NaN or an infinity gives a
    NaN row. See `gemm`."""
    return gemm("int8", x_shape, n, order, w_shape, rows, row_group)


def _lanes_max(v: Any, lanes: Any) -> Any:
    """TIR: the largest of a local vector's `lanes` values (a left fold)."""
    out = v[0]
    for j in range(1, lanes):
        out = T.max(out, v[j])
    return out


def _lanes_sum(v: Any, lanes: Any) -> Any:
    out = v[0]
    for j in range(1, lanes):
        out = out + v[j]
    return out


Store = tuple[tuple[Any, ...], Callable[[Any, Any, Any, Any], Any]]
"""A fused epilogue for `gemm`: the output's shape, and store(out, value, row, column) -> the
TIR statement writing the output element(s) of that GEMM row and column given its value."""


def gemm(kind: str, x_shape: tuple[Any, ...], n: int, order: str = "nm",  # noqa: C901
         w_shape: tuple[Any, ...] | None = None,
         rows: tuple[int, int, int, Callable[..., Any]] | None = None,
         row_group: int = 0, store: Store | None = None,
         smooth: bool = False) -> tvm.tirx.PrimFunc:
    """The AMX GEMM of `kind` ("bf16" or "int8", `KINDS`) writing acc[mp, np] (f32, rows and
    columns padded to 32), for an x of static shape (..., k) whose leading dims are the rows.
    `order`: the (panel, row block) tasks panel-major ("nm": a core's consecutive tasks share
    the weight panel) or row-major ("mn": they share the rows). `x_shape` and `w_shape` may
    be a tensor's own shape expressions: the parameters are declared with those very objects
    (what `te.extern` checks). `rows` = (m, groups, inner, read) makes the GEMM's left
    operand m rows of `groups` runs of `inner` values, `read(x, row, group, i)` (a
    convolution's windows: a run is one kernel position's input channels, contiguous in x)
    rather than x's own rows. Work items (the parallel grain) are one 32-column panel x
    `row_group` blocks of 32 rows (0: every row).

    With `store` (a fused epilogue), the third parameter is the kernel's output instead of the
    padded result: each 32 x 32 block of sums goes from the tiles to a local block and through
    `store` while it is in L1 (vectorised over whole panels), rows and columns past (m, n)
    never written.

    With `smooth` (int8: SmoothQuant), the packed weight has one more panel whose first K
    f32 values are 1 / s per reduction index (`pack_int8_panels(smooth=s)`): each x value is
    multiplied by its 1 / s before its row is quantized, the weight having been multiplied by
    s before its columns were."""
    spec = KINDS[kind]
    fused = store is not None
    out_dims: tuple[Any, ...] = store[0] if store is not None else ()
    put: Any = store[1] if store is not None else None
    int8 = kind == "int8"
    m, groups, inner, read = rows or _plain_rows(x_shape)
    k = groups * inner
    mp, np_, kp = _up(m, BLOCK), _up(n, BLOCK), _up(k, spec.step)
    panels, blocks, steps = np_ // BLOCK, mp // BLOCK, kp // spec.step
    x_dims = tuple(x_shape)
    w_rows = kp // spec.group + (1 if int8 else 0)  # int8: a last row of column scales
    w_panels = panels + (1 if smooth else 0)  # smooth: a last panel of 1 / s
    w_dims = tuple(w_shape) if w_shape is not None else (w_panels, w_rows, BLOCK, spec.group)
    smooth_at = panels * w_rows * BLOCK  # where 1 / s starts, in f32 values

    def xread(x: Any, ws: Any, i: Any, g: Any, c: Any) -> Any:
        """x[row i, group g, value(s) c], times 1 / s (its reduction index's) if smoothed."""
        v = read(x, i, g, c)
        if not smooth:
            return v
        at = smooth_at + g * inner
        return v * ws[T.Ramp(at + c.base, 1, c.lanes) if isinstance(c, tvm.tirx.Ramp)
                      else at + c]
    acc_dims = tuple(out_dims) if fused else (mp, np_)
    whole_panels = n // BLOCK

    def value(sums: Any, fsums: Any, sx: Any, ws: Any, p: Any, rb: Any, r: Any, c: Any) -> Any:
        """The f32 value of sum (r, c) of block (rb, p)."""
        if int8:
            return (T.Cast("float32", sums[r, c]) * sx[rb * BLOCK + r]
                    * ws[(p * w_rows + w_rows - 1) * BLOCK + c])
        return fsums[r, c]
    panel_major = order == "nm"
    group = min(row_group or blocks, blocks)
    row_groups = -(-blocks // group)
    whole, rest = inner // CVT, inner % CVT
    row_bytes = kp * 4 // spec.group  # of the left operand's rows (bf16: 2 bytes, int8: 1)

    # fused: the epilogue reads the kernel's other inputs, parameters of the caller's
    # function (`templates_amx`), not of this one
    @T.prim_func(check_well_formed=not fused)
    def main(x: T.Buffer(x_dims, "float32"),  # noqa: C901 - TVMScript: its ifs are TIR's
             w: T.Buffer(w_dims, spec.storage), acc: T.Buffer(acc_dims, "float32")) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        xa = T.decl_buffer((mp, kp), spec.storage)
        sx = T.decl_buffer((mp,), "float32")
        # the column scales: f32 over the packed weight's bytes, panel p's at p * w_rows + last
        ws = T.decl_buffer((w_panels * w_rows * BLOCK,), "float32", data=w.data)
        for i in T.parallel(mp):  # the left operand in bf16 / int8, zero-padded to blocks
            if i < m and not int8:
                for g in range(groups):
                    for c in range(whole):  # vcvtneps2bf16: 16 values at a time
                        xa[i, T.Ramp(g * inner + c * CVT, 1, CVT)] = T.call_llvm_pure_intrin(
                            f"uint16x{CVT}", "llvm.x86.avx512bf16.cvtneps2bf16.512",
                            read(x, i, g, T.Ramp(c * CVT, 1, CVT)))
                    for c in range(rest):
                        xa[i, g * inner + whole * CVT + c] = _to_bf16(
                            read(x, i, g, whole * CVT + c))
                for c in range(kp - k):
                    xa[i, k + c] = T.uint16(0)
            elif i < m:  # int8: the row's scale, then its codes
                big = T.decl_buffer((CVT,), "float32", scope="local")
                bad = T.decl_buffer((CVT,), "float32", scope="local")
                for j in range(CVT):
                    big[j] = T.float32(0)
                    bad[j] = T.float32(0)
                for g in range(groups):
                    for c in range(whole):
                        vx = xread(x, ws, i, g, T.Ramp(c * CVT, 1, CVT))
                        big[T.Ramp(0, 1, CVT)] = T.max(big[T.Ramp(0, 1, CVT)], T.abs(vx))
                        # x * 0: NaN for NaN or inf (TVM folds it only for a scalar, whose
                        # lanes below test with isfinite instead; both tested); a smoothed
                        # x that overflows is caught as well
                        bad[T.Ramp(0, 1, CVT)] = bad[T.Ramp(0, 1, CVT)] + vx * T.Broadcast(
                            T.float32(0), CVT)
                    for c in range(rest):
                        big[c] = T.max(big[c], T.abs(xread(x, ws, i, g, whole * CVT + c)))
                        bad[c] = bad[c] + T.if_then_else(
                            T.isfinite(xread(x, ws, i, g, whole * CVT + c)), T.float32(0),
                            T.float32(1))
                amax = T.max(_lanes_max(big, CVT), T.float32(1e-30))
                finite = _lanes_sum(bad, CVT) == T.float32(0)
                sx[i] = T.if_then_else(finite, amax / T.float32(127), T.float32("nan"))
                inv = T.if_then_else(finite, T.float32(127) / amax, T.float32(0))
                for g in range(groups):
                    for c in range(whole):
                        xa[i, T.Ramp(g * inner + c * CVT, 1, CVT)] = T.Cast(
                            f"int8x{CVT}", T.nearbyint(T.if_then_else(
                                finite, xread(x, ws, i, g, T.Ramp(c * CVT, 1, CVT)),
                                T.Broadcast(T.float32(0), CVT)) * T.Broadcast(inv, CVT)))
                    for c in range(rest):
                        xa[i, g * inner + whole * CVT + c] = T.Cast("int8", T.nearbyint(
                            T.if_then_else(finite, xread(x, ws, i, g, whole * CVT + c),
                                           T.float32(0)) * inv))
                for c in range(kp - k):
                    xa[i, k + c] = T.int8(0)
            else:
                sx[i] = T.float32(0)
                for c in range(kp):
                    xa[i, c] = T.Cast(spec.storage, 0)
        for item in T.parallel(panels * row_groups):
            # an item: one panel x a group of row blocks
            p = T.if_then_else(panel_major, item // row_groups, item % panels)
            g = T.if_then_else(panel_major, item % row_groups, item // panels)
            cfg = T.decl_buffer((64,), "uint8", scope="local")
            sums = T.decl_buffer((BLOCK, BLOCK), "int32", scope="local")
            fsums = T.decl_buffer((BLOCK, BLOCK), "float32", scope="local")
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
                    _tile("tileloadd64", T.int8(4),
                          T.address_of(xa[rb * BLOCK, s * spec.step]), T.int64(row_bytes))
                    _tile("tileloadd64", T.int8(5),
                          T.address_of(xa[rb * BLOCK + TILE, s * spec.step]), T.int64(row_bytes))
                    _tile("tileloadd64", T.int8(6), T.address_of(w[p, s * TILE, 0, 0]),
                          T.int64(BLOCK * 4))
                    _tile("tileloadd64", T.int8(7), T.address_of(w[p, s * TILE, TILE, 0]),
                          T.int64(BLOCK * 4))
                    _tile(spec.instr, T.int8(0), T.int8(4), T.int8(6))
                    _tile(spec.instr, T.int8(1), T.int8(4), T.int8(7))
                    _tile(spec.instr, T.int8(2), T.int8(5), T.int8(6))
                    _tile(spec.instr, T.int8(3), T.int8(5), T.int8(7))
                if fused:  # the sums to a local block, through the epilogue to the output
                    if int8:
                        _i32_tile(sums, 0)
                        _i32_tile(sums, 1)
                        _i32_tile(sums, 2)
                        _i32_tile(sums, 3)
                    else:
                        _i32_tile(fsums, 0)
                        _i32_tile(fsums, 1)
                        _i32_tile(fsums, 2)
                        _i32_tile(fsums, 3)
                    for r in range(BLOCK):
                        if rb * BLOCK + r < m:
                            if p < whole_panels:
                                for c in T.vectorized(BLOCK):
                                    put(acc, value(sums, fsums, sx, ws, p, rb, r, c),
                                        rb * BLOCK + r, p * BLOCK + c)
                            else:
                                for c in range(n % BLOCK):
                                    put(acc, value(sums, fsums, sx, ws, p, rb, r, c),
                                        rb * BLOCK + r, p * BLOCK + c)
                elif int8:  # int32 sums to a local block, scaled into acc
                    _i32_tile(sums, 0)
                    _i32_tile(sums, 1)
                    _i32_tile(sums, 2)
                    _i32_tile(sums, 3)
                    for r in range(BLOCK):
                        for c in range(BLOCK // CVT):
                            acc[rb * BLOCK + r, T.Ramp(p * BLOCK + c * CVT, 1, CVT)] = (
                                T.Cast(f"float32x{CVT}", sums[r, T.Ramp(c * CVT, 1, CVT)])
                                * T.Broadcast(sx[rb * BLOCK + r], CVT)
                                * ws[T.Ramp((p * w_rows + w_rows - 1) * BLOCK + c * CVT, 1,
                                            CVT)])
                else:
                    _c_tile(acc, rb, p, np_, 0)
                    _c_tile(acc, rb, p, np_, 1)
                    _c_tile(acc, rb, p, np_, 2)
                    _c_tile(acc, rb, p, np_, 3)
            _tile("tilerelease")
    return main


def gemm_extern(kind: str, x: Any, w: Any, n: int, order: str,
                rows: tuple[int, int, int, Callable[..., Any]] | None = None,
                row_group: int = 0, smooth: bool = False) -> Any:
    """`gemm` of `kind` as a `te.extern` over tensors x (..., k) f32 and w (the packed
    panels): the padded f32 result tensor. The extern's buffers are the function's own
    parameters, so its body is used as it is."""
    func: Any = gemm(kind, tuple(x.shape), n, order, tuple(w.shape), rows, row_group,
                     smooth=smooth)
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


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight rows [N, K] f32 -> (int8 codes [N, K], f32 scales [N]): each row on its own
    symmetric scale max |w| / 127, rounded to nearest even (an all-zero row: scale 1)."""
    w = np.asarray(w, np.float32)
    big = np.abs(w).max(axis=1) if w.size else np.zeros(len(w), np.float32)
    scale = np.where(big > 0, big / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def pack_int8_panels(weight: np.ndarray, transposed: bool = True,
                     smooth: np.ndarray | None = None) -> np.ndarray:
    """[N, K] (transposed) or [K, N] f32 -> int8 panels [N/32, K/4 + 1, 32, 4]: each column
    quantized by `quantize_int8`, its codes in groups of 4 along the reduction (K zero-padded
    to a multiple of 64, N to 32), the panel's last group row holding its 32 column scales
    as f32 bytes. With `smooth` (s [K], SmoothQuant) the weight is multiplied by s along K
    before it is quantized, and one more panel holds 1 / s (f32, from its start), which
    `gemm(smooth=True)` multiplies each x value by."""
    w = weight if transposed else weight.T
    if not np.isfinite(w).all():
        raise CodegenError("an int8 weight must be finite: this one holds NaN or an "
                           "infinity; compile it with precision='bf16' or 'f32'")
    n, k = w.shape
    s = None if smooth is None else np.asarray(smooth, np.float32)
    if s is not None:
        if s.shape != (k,) or not (np.isfinite(s).all() and (s > 0).all()):
            raise CodegenError(f"SmoothQuant factors: expected {k} finite positive values, "
                               f"got shape {s.shape}")
        w = (w * s[None, :]).astype(np.float32)
        if not np.isfinite(w).all():
            raise CodegenError("the weight times its SmoothQuant factors overflows float32")
    codes, scale = quantize_int8(w)
    npad, kpad = _up(n, BLOCK), _up(k, KINDS["int8"].step)
    full = np.zeros((npad, kpad), np.int8)
    full[:n, :k] = codes
    scales = np.ones(npad, np.float32)
    scales[:n] = scale
    panels = full.reshape(-1, BLOCK, kpad // 4, 4).transpose(0, 2, 1, 3)  # [P, K/4, 32, 4]
    tail = scales.reshape(-1, 1, BLOCK).view(np.int8).reshape(-1, 1, BLOCK, 4)
    packed = np.concatenate([panels, tail], axis=1)
    if s is None:
        return np.ascontiguousarray(packed)
    extra = np.zeros(packed.shape[1:], np.int8)  # K/4 + 1 rows of 32 f32: room for K
    extra.reshape(-1).view(np.float32)[:k] = np.float32(1) / s
    return np.ascontiguousarray(np.concatenate([packed, extra[None]], axis=0))
