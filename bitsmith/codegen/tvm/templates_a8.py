# pyright: reportInvalidTypeForm=false, reportMissingModuleSource=false
# (TVMScript: buffer annotations are calls that the TVMScript parser reads, not types)
"""`qdense_i8`: `quant.linear` with `act="i8"` on AVX-512 VNNI: integer codes times int8
activation blocks with `vpdpbusd` (64 multiply-adds an instruction), as llama.cpp's vector dots.

The weight is re-packed at compile time into tiles of 16 output rows: a 64-byte vector holds
4 consecutive codes of each of the 16 rows (one int32 lane a row), so one `vpdpbusd` of it with
4 activation codes broadcast to every lane adds 4 products into each row's lane; 4-bit (and
narrower) codes hold two such groups a byte (the low nibbles k..k+3, the high ones k+4..k+7),
wider ones a byte each. Codes are made unsigned (a signed storage's codes offset by
2**(bits-1), the offset folded into the integer zero point), as `vpdpbusd` takes them.

Per row and block of 32 activations the prologue finds d = max|x| / 127, the codes
xq = round(x / d), their sum and the exact sum of x. Per tile and block the int32 lanes then
give the 16 rows' integer dots, corrected by the integer zero point times sum(xq), converted
once to f32 and scaled by s * d; a `zero_point=min` weight adds m * sum(x). Up to TILE_M
activation rows share each unpacked weight vector. The epilogue adds (bias [N], residual
[M, N]) are applied on the f32 tile before the store.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tvm
from tvm.script import tirx as T

from ...errors import CodegenError
from ...ir import Operation
from ...ir.dialects import graph, quant
from ...ir.dialects.kernel import FusedOp
from ...ir.dtypes import IntType
from ...ir.packing import unpack_rows
from ...ir.types import GroupAxis, QuantType, ZeroPoint
from ..template import Config, Knob, KnobSpace, Problem, Target, register_template
from .epilogue import Epilogue, Put, gemm_epilogue
from .target import host_target
from .templates import TvmKernel, TvmTemplate, _constant_input, _static

ROWS = 16  # output rows a tile: one int32 lane each
BLOCK = quant.ACT_BLOCK
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def has_vnni(target: Target) -> bool:
    """Whether the target runs AVX-512 VNNI (`vpdpbusd` on 512-bit vectors)."""
    return "avx512_vnni" in target.isa and "avx512bw" in target.isa


def supported(qtype: QuantType) -> bool:
    """Integer codes grouped per output channel in whole activation blocks, with no zero
    point, an integer one or a minimum."""
    g = qtype.group_size
    return (isinstance(qtype.storage, IntType) and qtype.axis is GroupAxis.OUT
            and (g == 0 or g % BLOCK == 0)
            and qtype.zero_point in (ZeroPoint.NONE, ZeroPoint.INT, ZeroPoint.MIN))


def code_offset(qtype: QuantType) -> int:
    """What makes a code unsigned: 2**(bits-1) for signed storage, else 0."""
    storage = qtype.storage
    return 1 << (qtype.bits - 1) if isinstance(storage, IntType) and storage.is_signed else 0


def unsigned_codes(words: np.ndarray, qtype: QuantType, n: int, k: int) -> np.ndarray:
    """The codes [N, K] of a packed weight as unsigned integers (v + offset)."""
    codes = unpack_rows(np.asarray(words), qtype.bits, k).reshape(n, k).astype(np.int32)
    offset = code_offset(qtype)
    return ((codes ^ offset) if offset else codes).astype(np.uint8)


def pack_codes(codes: np.ndarray, nibbles: bool) -> np.ndarray:
    """Unsigned codes [N, K] as tiles [N/16, chunks, 64] bytes (K padded to whole blocks)."""
    n, k = codes.shape
    kp = -(-k // BLOCK) * BLOCK
    full = np.zeros((n, kp), np.uint8)
    full[:, :k] = codes
    tiles = n // ROWS
    if nibbles:  # chunk j of a block: bytes [row*4 + i] = code(8j+i) | code(8j+4+i) << 4
        a = full.reshape(tiles, ROWS, kp // 8, 2, 4)
        byte = a[:, :, :, 0, :] | (a[:, :, :, 1, :] << 4)
    else:  # chunk j: bytes [row*4 + i] = code(4j+i)
        byte = full.reshape(tiles, ROWS, kp // 4, 4)
    return np.ascontiguousarray(byte.transpose(0, 2, 1, 3).reshape(tiles, -1, ROWS * 4))


def pack_groups(param: np.ndarray, dtype: Any) -> np.ndarray:
    """Per-group parameters [N, G] as [N/16, G, 16] (a tile's 16 rows contiguous)."""
    p = np.asarray(param)
    n, g = p.shape
    return np.ascontiguousarray(p.reshape(n // ROWS, ROWS, g).transpose(0, 2, 1).astype(dtype))


@functools.lru_cache(maxsize=256)
def qdense_i8_func(**kwargs: Any) -> tvm.tirx.PrimFunc:
    """`qdense_i8_body` without a fused epilogue (memoised: its arguments hash)."""
    return qdense_i8_body(**kwargs)


def qdense_i8_body(  # noqa: C901 - TVMScript: its branches are TIR, not Python
        *, lead: tuple[int, ...], n: int, k: int, group: int, nibbles: bool, zero: str,
        offset: int, addends: tuple[str, ...], tile_m: int, put: Put | None = None,
        out_shape: tuple[int, ...] | None = None) -> tvm.tirx.PrimFunc:
    """The PrimFunc `(x, codes, scales, [zero,] [addend...,] out)` in a fixed order, for an
    x [*lead, K] whose leading dims are its M rows; `zero` is "none", "int" (int32 zero
    points, offset included) or "min" (f32 minimums); each addend is "bias" ([N]) or "full"
    ([*lead, N]). With `put` (a fused elementwise epilogue, `put(out, value, row, column)`
    the statement storing the output of that GEMM element), the output is written through
    it (its other inputs: the caller's parameters, not this function's), and the output is
    the epilogue's `out_shape` (its rows and columns the GEMM's)."""
    m = int(np.prod(lead))
    tiles, blocks = n // ROWS, -(-k // BLOCK)
    kp = blocks * BLOCK
    groups = 1 if group == 0 else -(-k // group)
    gsize = kp if group == 0 else group
    chunks = BLOCK // 8 if nibbles else BLOCK // 4
    mt = max(1, min(tile_m, m))
    mo_count = -(-m // mt)
    zdtype = "float32" if zero == "min" else "int32"
    add0 = addends[0] if addends else "none"
    add1 = addends[1] if len(addends) > 1 else "none"
    a0_shape = (n,) if add0 == "bias" else (*lead, n)
    a1_shape = (n,) if add1 == "bias" else (*lead, n)
    int_zero = zero == "int"
    min_zero = zero == "min"
    # signed codes were made unsigned by +offset: take offset * sum(xq) back where no integer
    # zero point (which has the offset folded in) does
    const_zero = offset if zero in ("none", "min") else 0
    tiny = quant.ACT_TINY
    # a parallel loop costs a thread-pool launch: worth it for the prologue of many rows only
    rows_loop = T.parallel if m >= 8 else T.serial

    low4 = T.broadcast(T.int32(0x0F0F0F0F), ROWS)
    lane = T.ramp(0, 1, ROWS)  # a tile's 16 rows, one vector

    @T.macro
    def dot4(acc, mi, codes, xword):  # acc[mi] += codes . broadcast(xword), 4 bytes a lane
        acc[mi, lane] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(VPDPBUSD), acc[mi, lane],
            T.reinterpret(codes, dtype="int8x64"),
            T.reinterpret(T.broadcast(T.reinterpret(xword, dtype="int32"), ROWS),
                          dtype="int8x64"), dtype="int32x16")

    fused = put is not None
    store: Put = put if put is not None else _no_epilogue

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(xt: T.Buffer((*lead, k), "float32"),  # noqa: C901
               w: T.Buffer((tiles, blocks * chunks, 64), "uint8"),
               s: T.Buffer((tiles, groups, ROWS), "float32"),
               z: T.Buffer((tiles, groups, ROWS), zdtype),
               a0t: T.Buffer(a0_shape, "float32"), a1t: T.Buffer(a1_shape, "float32"),
               outt: T.Buffer(out_shape or (*lead, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        # the leading dims as rows: 2-D views of the tensors
        x = T.decl_buffer((m, k), "float32", data=xt.data)
        out = T.decl_buffer((m, n), "float32", data=outt.data)
        if add0 == "full":
            a0 = T.decl_buffer((m, n), "float32", data=a0t.data)
        if add1 == "full":
            a1 = T.decl_buffer((m, n), "float32", data=a1t.data)
        xq = T.alloc_buffer((m, kp), "int8")
        dd = T.alloc_buffer((m, blocks), "float32")
        xs = T.alloc_buffer((m, blocks), "float32")
        qs = T.alloc_buffer((m, blocks), "int32")
        bad = T.alloc_buffer((m,), "int32")
        # the prologue: each row's int8 blocks, their scales and sums
        for r in rows_loop(m):
            bad[r] = 0
            for b in range(blocks):
                amax = T.decl_buffer((1,), "float32", scope="local")
                total = T.decl_buffer((1,), "float32", scope="local")
                isum = T.decl_buffer((1,), "int32", scope="local")
                amax[0] = T.float32(0)
                total[0] = T.float32(0)
                isum[0] = 0
                for i in range(BLOCK):
                    if b * BLOCK + i < k:
                        v = x[r, T.min(b * BLOCK + i, k - 1)]
                        amax[0] = T.max(amax[0], T.abs(v))
                        total[0] = total[0] + v
                        if not T.isfinite(v):
                            bad[r] = 1
                d = amax[0] / T.float32(127)
                inv = T.if_then_else(d >= T.float32(tiny), T.float32(1) / d, T.float32(0))
                dd[r, b] = d
                xs[r, b] = total[0]
                for i in range(BLOCK):
                    code = T.if_then_else(b * BLOCK + i < k, T.max(T.min(T.nearbyint(
                        x[r, T.min(b * BLOCK + i, k - 1)] * inv), T.float32(127)),
                        T.float32(-127)), T.float32(0))
                    xq[r, b * BLOCK + i] = T.Cast("int8", code)
                    isum[0] = isum[0] + T.Cast("int32", code)
                qs[r, b] = isum[0]
        for t in T.parallel(tiles):
            for mo in range(mo_count):
                facc = T.decl_buffer((mt, ROWS), "float32", scope="local")
                iacc = T.decl_buffer((mt, ROWS), "int32", scope="local")
                for mi in T.unroll(mt):
                    facc[mi, lane] = T.broadcast(T.float32(0), ROWS)
                for b in range(blocks):
                    for mi in T.unroll(mt):
                        iacc[mi, lane] = T.broadcast(T.int32(0), ROWS)
                    for j in T.unroll(chunks):
                        vec = T.reinterpret(w.vload([t, b * chunks + j, 0], "uint8x64"),
                                            dtype="int32x16")
                        for mi in T.unroll(mt):
                            row = T.min(mo * mt + mi, m - 1)
                            if nibbles:
                                dot4(iacc, mi, T.bitwise_and(vec, low4),
                                     xq.vload([row, b * BLOCK + j * 8], "int8x4"))
                                dot4(iacc, mi, T.bitwise_and(
                                    T.shift_right(vec, T.broadcast(T.int32(4), ROWS)), low4),
                                     xq.vload([row, b * BLOCK + j * 8 + 4], "int8x4"))
                            else:
                                dot4(iacc, mi, vec,
                                     xq.vload([row, b * BLOCK + j * 4], "int8x4"))
                    gi = b * BLOCK // gsize
                    for mi in T.unroll(mt):
                        row = T.min(mo * mt + mi, m - 1)
                        dots = iacc[mi, lane]
                        if int_zero:
                            dots = dots - z[t, gi, lane] * T.broadcast(qs[row, b], ROWS)
                        if const_zero != 0:
                            dots = dots - T.broadcast(qs[row, b] * const_zero, ROWS)
                        part = T.Cast("float32x16", dots) * (
                            s[t, gi, lane] * T.broadcast(dd[row, b], ROWS))
                        if min_zero:
                            part = part + z[t, gi, lane] * T.broadcast(xs[row, b], ROWS)
                        facc[mi, lane] = facc[mi, lane] + part
                for mi in T.unroll(mt):
                    row = mo * mt + mi
                    if row < m:
                        y = facc[mi, lane]
                        if add0 == "bias":
                            y = y + a0t[T.ramp(t * ROWS, 1, ROWS)]
                        if add0 == "full":
                            y = y + a0[row, T.ramp(t * ROWS, 1, ROWS)]  # pyright: ignore[reportPossiblyUnboundVariable]
                        if add1 == "bias":
                            y = y + a1t[T.ramp(t * ROWS, 1, ROWS)]
                        if add1 == "full":
                            y = y + a1[row, T.ramp(t * ROWS, 1, ROWS)]  # pyright: ignore[reportPossiblyUnboundVariable]
                        if fused:  # the tile's 16 sums, through the epilogue
                            yv = T.decl_buffer((ROWS,), "float32", scope="local")
                            yv[lane] = T.Select(
                                bad[row] != 0, T.broadcast(T.float32(np.nan), ROWS), y)
                            for c in T.vectorized(ROWS):
                                store(outt, yv[c], row, t * ROWS + c)
                        else:
                            out[row, T.ramp(t * ROWS, 1, ROWS)] = T.Select(
                                bad[row] != 0, T.broadcast(T.float32(np.nan), ROWS), y)

    return kernel


def _no_epilogue(out: Any, value: Any, row: Any, col: Any) -> Any:
    raise AssertionError("qdense_i8 stores through an epilogue only when it has one")


def select_params(func: Any, order: list[int]) -> tvm.tirx.PrimFunc:
    """`func` taking only its parameters at `order` (the others unused by its body; TVM's
    stubs lack PrimFunc's fields)."""
    return tvm.tirx.PrimFunc([func.params[i] for i in order], func.body, func.ret_type,
                             func.attrs)


@register_template
class QDenseI8(TvmTemplate):
    """out = x @ W^T (+ bias, + residual) for `quant.linear` act=i8 on AVX-512 VNNI."""

    name = "qdense_i8"
    version = 2
    space = KnobSpace(Knob("TILE_M", (4, 1, 2, 8)))
    key = ("M", "N", "K", "qtype", "epilogue")

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp) or not has_vnni(host_target()):
            return None
        body = op.body_ops
        anchor = body[0] if body else None
        if not isinstance(anchor, quant.LinearOp) or anchor.act != "i8":
            return None
        qtype: QuantType = anchor.weight.type.dtype
        x, (n, k) = anchor.x.type, anchor.weight.type.shape
        if (not supported(qtype) or x.rank < 2 or not _static((*x.shape, n, k))
                or n % ROWS or _block_arg(op, anchor.x) is None):
            return None
        lead = tuple(int(d) for d in x.shape[:-1])
        roles = {"x": _block_arg(op, anchor.x), "w": _constant_input(op, anchor.weight),
                 "s": _constant_input(op, anchor.scale)}
        if anchor.zero is not None:
            roles["z"] = _constant_input(op, anchor.zero)
        if any(i is None for i in roles.values()) or len(op.results) != 1:
            return None
        adds: dict[str, Any] = {}
        addends = _addends(op, anchor, lead, n, adds)
        roles.update(adds if addends is not None else {})
        if addends is None:  # any other elementwise epilogue: fused into the tile loop
            if self.epilogue(op, roles) is None:
                return None
            addends = ["fused"]
        elif tuple(op.results[0].type.shape) != (*lead, n):
            return None
        return Problem(self.name, {
            "M": int(np.prod(lead)), "lead": ",".join(map(str, lead)), "N": n, "K": k,
            "qtype": str(qtype), "epilogue": ",".join(addends),
            "roles": ",".join(f"{r}={i}" for r, i in roles.items())}, op)

    @staticmethod
    def epilogue(op: FusedOp, roles: dict[str, Any]) -> Epilogue | None:
        """The kernel's epilogue fused (`epilogue.gemm_epilogue`), or None."""
        anchor = op.body_ops[0]
        n, _ = (int(d) for d in anchor.weight.type.shape)
        m = int(np.prod([int(d) for d in anchor.x.type.shape[:-1]]))
        return gemm_epilogue(op, anchor, m, n, acc_shape=(m, n), placeholders={},
                             operands=tuple(i for r, i in roles.items() if r != "x"))

    def valid(self, problem: Problem, config: Config) -> bool:
        return int(config["TILE_M"]) <= max(1, int(problem["M"]))

    def default_config(self, problem: Problem, target: Target) -> Config:
        # 4 rows share each unpacked weight vector: 8 accumulators in registers
        rows = int(problem["M"])
        return Config({"TILE_M": next(t for t in (4, 2, 1) if t <= max(rows, 1))})

    def schedule(self, problem: Problem, config: Config, target: Target) -> TvmKernel:
        anchor = problem.kernel_op.body_ops[0]
        qtype: QuantType = anchor.weight.type.dtype
        n, k = (int(d) for d in anchor.weight.type.shape)
        roles = {r: int(i) for r, i in (p.split("=") for p in str(problem["roles"]).split(","))}
        addends = tuple(a for a in str(problem["epilogue"]).split(",") if a)
        found = self.epilogue(problem.kernel_op, roles) if addends == ("fused",) else None
        zero = {ZeroPoint.INT: "int", ZeroPoint.MIN: "min"}.get(qtype.zero_point, "none")
        nibbles = qtype.bits <= 4
        offset = code_offset(qtype)
        lead = tuple(int(d) for d in str(problem["lead"]).split(","))
        shape = {"lead": lead, "n": n, "k": k, "group": qtype.group_size, "nibbles": nibbles,
                 "zero": zero, "offset": offset, "tile_m": int(config["TILE_M"])}
        slots = {"x": 0, "w": 1, "s": 2, "z": 3, "a0": 4, "a1": 5}
        if found is not None:  # the epilogue's own inputs are the lowered kernel's buffers
            body: Any = qdense_i8_body(**shape, addends=(), put=found.put,
                                       out_shape=tuple(int(d) for d in found.out.shape))
            mine = {i: body.params[slots[r]] for r, i in roles.items()}
            func = tvm.tirx.PrimFunc([mine.get(i, b) for i, b in enumerate(found.inputs)]
                                     + [body.params[6]], body.body, body.ret_type, body.attrs)
        elif addends == ("fused",):
            raise CodegenError(f"qdense_i8: kernel '{problem.kernel_op.kernel_name}' matched "
                               "with a fused epilogue that no longer lowers to one")
        else:
            order = [slots[r] for r, _ in sorted(roles.items(), key=lambda ri: ri[1])] + [6]
            func = select_params(qdense_i8_func(**shape, addends=addends), order)
        packs: dict[int, tuple[str, Any]] = {
            roles["w"]: (f"vnni{'4' if nibbles else '8'}", lambda w: pack_codes(
                unsigned_codes(w, qtype, n, k), nibbles)),
            roles["s"]: ("tiles16", lambda v: pack_groups(v, np.float32))}
        if "z" in roles:
            packs[roles["z"]] = (f"tiles16z{offset}", lambda v: pack_groups(
                v, np.float32) if zero == "min" else pack_groups(
                    np.asarray(v).astype(np.int32) + offset, np.int32))
        return TvmKernel(func, self.name, config, packs=packs)


def _addends(op: FusedOp, anchor: quant.LinearOp, lead: tuple[int, ...], n: int,
             roles: dict[str, Any]) -> list[str] | None:
    """The kernel's epilogue as at most two f32 adds of kernel inputs ("bias" [N] or "full"
    [*lead, N]), their inputs put in `roles` (a0, a1); None when it is anything else."""
    addends: list[str] = []
    value = anchor.results[0]
    for add in op.body_ops[1:]:
        if not isinstance(add, graph.BINARY_OPS["add"]) or len(addends) == 2:
            return None
        other = add.operands[1] if add.operands[0] is value else add.operands[0]
        index = _block_arg(op, other)
        shape = tuple(other.type.shape)
        if index is None or value not in add.operands or other is value or \
                shape not in ((n,), (*lead, n)) or str(other.type.dtype) != "f32":
            return None
        roles[f"a{len(addends)}"] = index
        addends.append("bias" if shape == (n,) else "full")
        value = add.results[0]
    return addends


def _block_arg(kernel: FusedOp, value: Any) -> int | None:
    """The kernel input index of a region value that is a block argument."""
    for i, arg in enumerate(kernel.regions[0].block.args):
        if arg is value:
            return i
    return None
