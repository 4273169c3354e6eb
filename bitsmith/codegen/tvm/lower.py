"""Generic lowering: any `kernel.fused` region -> one TVM tensor-expression PrimFunc.

Each graph op in the region becomes TE computes (mostly TVM's own `topi` operators), chained in
region order; the kernel's inputs become placeholders and its yielded values the outputs.
Symbolic dims (the batch `B`) become int64 TIR variables bound from the input buffers at call
time. An op without a rule raises `CodegenError` naming it: there is no silent fallback.

This is the correctness baseline every model compiles through; templates with real schedules
(matmul, conv, attention, reductions) replace it kernel by kernel.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sympy
import tvm
from tvm import te, topi

from ...ir import Operation, Value
from ...ir.dialects.kernel import FusedOp
from ...ir.dtypes import DType, IntType, boolean, torch_int_via
from ...ir.packing import row_words
from ...ir.types import QuantType, TensorType
from ...runtime.artifact import NUMPY_DTYPES
from ..template import CodegenError
from .typed import cast_tensor, compute, shape_of

LowerFn = Callable[[Operation, list, "Lowering"], "te.Tensor | list[te.Tensor]"]
RULES: dict[str, LowerFn] = {}



def lowers(*names: str) -> Callable[[LowerFn], LowerFn]:
    """Decorator: register the rule for graph ops `names`."""
    def wrap(fn: LowerFn) -> LowerFn:
        for name in names:
            RULES[f"graph.{name}"] = fn
        return fn
    return wrap


class Lowering:
    """Per-kernel state: the TIR variables of symbolic dims.

    A kernel with a symbolic dim indexes in int64 throughout (its static dims become int64
    constants too): TVM needs one index type per loop nest, and allocations sized by a
    symbolic dim only lower with int64 sizes.
    """

    def __init__(self, symbolic: bool = False, params: Sequence[TensorType] = ()) -> None:
        self.vars: dict[sympy.Basic, Any] = {}
        self.index = "int64" if symbolic else "int32"
        self.scaled: dict[sympy.Basic, tvm.tirx.Var] = {}  # a dim like 7*B -> its own var
        self.underived: set[sympy.Basic] = set()
        self.lets = True  # whether expressions may bind values (no bf16 in the kernel)
        self._derive_hidden_symbols(params)

    def _derive_hidden_symbols(self, params: Sequence[TensorType]) -> None:
        """TVM binds a symbolic var only from a buffer dim that is the var alone: a kernel whose
        parameters hold `B` only as `7*B` (x.reshape(-1, 6) of [B, 7, 6]) would use a B that
        no argument defines. Each such dim gets its own var, which the buffer binds; a symbol
        it holds linearly (a*B + b, a and b over bound symbols) is derived from it, as
        (n - b) // a, wherever else the kernel uses it."""
        dims = list(dict.fromkeys(sympy.sympify(d) for t in params for d in t.shape
                                  if not isinstance(d, int)))
        plain = {d for d in dims if d.is_Symbol}
        hidden = {s for d in dims for s in d.free_symbols} - plain
        for d in dims:
            if d.free_symbols & hidden:
                self.scaled[d] = te.var(str(d), dtype=self.index)
        for sym in sorted(hidden, key=str):
            for d, var in self.scaled.items():
                try:
                    poly = sympy.Poly(d, sym)
                except sympy.PolynomialError:
                    continue
                if poly.degree() != 1:
                    continue
                a, b = poly.all_coeffs()
                if not (a.free_symbols | b.free_symbols) <= plain or a.is_Integer and a <= 0:
                    continue
                self.vars[sym] = tvm.tirx.floordiv(var - self.dim(b), self.dim(a))
                break
            else:
                self.underived.add(sym)

    def dim(self, d: object) -> Any:
        """A dim as an int, or a TIR expression over int64 variables."""
        if isinstance(d, sympy.Integer):
            d = int(d)
        if isinstance(d, int):
            return d if self.index == "int32" else tvm.tirx.const(d, "int64")
        expr = sympy.sympify(d)
        if expr in self.scaled:
            return self.scaled[expr]
        if expr.free_symbols & self.underived:
            raise CodegenError(f"dim {expr} of a kernel value needs "
                               f"{', '.join(sorted(map(str, expr.free_symbols & self.underived)))}"
                               ", which no buffer of the kernel defines (its buffers hold it only "
                               "in products with other symbols)")
        for sym in sorted(expr.free_symbols, key=str):
            self.vars.setdefault(sym, te.var(str(sym), dtype=self.index))
        return sympy.lambdify(sorted(expr.free_symbols, key=str), expr, modules=[{}])(
            *[self.vars[s] for s in sorted(expr.free_symbols, key=str)])

    def shape(self, type: TensorType) -> list:
        """The TE shape of a tensor type."""
        return [self.dim(d) for d in type.shape]


def tvm_dtype(op: Operation | None, dtype: object) -> str:
    """The TVM dtype name of an IR element type, or CodegenError for sub-byte/low-bit types."""
    name = NUMPY_DTYPES.get(str(dtype))
    if name is None or not isinstance(dtype, DType):
        where = f" in '{op.name}'" if op is not None else ""
        raise CodegenError(f"generic lowering: element type {dtype}{where} has no TVM dtype; "
                           "low-bit types are lowered by the quantized templates")
    return name


def lower_kernel(kernel: FusedOp, *, rules: Mapping[Operation, LowerFn] | None = None,
                 placeholders: Mapping[int, te.Tensor] | None = None,
                 extra: Sequence[te.Tensor] = (),
                 ) -> tuple[tvm.tirx.PrimFunc, list[te.Tensor], list[te.Tensor]]:
    """The PrimFunc of a kernel, with its input placeholders and output tensors (call order).

    Templates substitute their own compute for some ops (`rules`, by op) and their own
    placeholder for some inputs (`placeholders`, by input index: a pre-packed weight); a
    rule's own placeholders (`extra`) become the function's first parameters.
    """
    block = kernel.regions[0].block
    terminator = block.terminator
    if terminator is None:
        raise CodegenError(f"kernel '{kernel.kernel_name}': its region has no kernel.yield")
    lowering = Lowering(symbolic=any(
        not isinstance(d, int) for v in list(block.args) + [r for o in kernel.body_ops
                                                              for r in o.results]
        for d in v.type.shape), params=[v.type for v in [*block.args, *terminator.operands]])
    # TVM's bf16 legalisation miscompiles a Let over a bf16 read (fast_math.fast_exp)
    lowering.lets = not any(str(v.type.dtype) == "bf16" for v in list(block.args) + [
        r for o in kernel.body_ops for r in o.results])
    placeholders = placeholders or {}
    inputs = [placeholders[i] if i in placeholders else _placeholder(i, a.type, lowering)
              for i, a in enumerate(block.args)]
    env: dict[Value, te.Tensor] = dict(zip(block.args, inputs, strict=True))
    for op in kernel.body_ops:
        rule = (rules or {}).get(op) or RULES.get(op.name)
        if rule is None:
            raise CodegenError(f"generic lowering has no rule for '{op.name}' (kernel "
                               f"'{kernel.kernel_name}'); rules exist for "
                               f"{len(RULES)} ops: {', '.join(sorted(RULES))}")
        out = rule(op, [env[v] for v in op.operands], lowering)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for result, tensor in zip(op.results, outs, strict=True):
            env[result] = _as_type(tensor, result.type, op)
    outputs: list[te.Tensor] = []
    for value in terminator.operands:
        tensor = env[value]
        if any(tensor is t for t in inputs + outputs):  # a yielded input still needs a copy
            tensor = _map(tensor, lambda v: v, "copy")
        outputs.append(tensor)
    params: list[te.Tensor | tvm.tirx.Var] = [*extra, *inputs, *outputs]
    return te.create_prim_func(params), inputs, outputs


def _placeholder(index: int, type: TensorType, lowering: Lowering) -> te.Tensor:
    """A kernel input: a plain tensor, or a quantized weight as its packed uint32 words."""
    if isinstance(type.dtype, QuantType):
        n, k = type.shape
        if not isinstance(k, int):
            raise CodegenError(f"a quantized weight needs a static in_features, got {type}")
        return te.placeholder((lowering.dim(n), lowering.dim(row_words(k, type.dtype.bits))),
                              "uint32", name=f"in{index}")
    return te.placeholder(lowering.shape(type), tvm_dtype(None, type.dtype), name=f"in{index}")


def _as_type(tensor: te.Tensor, type: TensorType, op: Operation) -> te.Tensor:
    want = tvm_dtype(op, type.dtype)
    if tensor.dtype != want:
        raise CodegenError(f"lowering '{op.name}' gave {tensor.dtype}, its type says {want}")
    if len(shape_of(tensor)) != type.rank:
        raise CodegenError(f"lowering '{op.name}' gave rank {len(shape_of(tensor))}, its type "
                           f"says {type}")
    return tensor


# ---- constants --------------------------------------------------------------------------------
@lowers("constant")
def lower_constant(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """An inline literal (weights are kernel inputs, never inside a region)."""
    if op.value is None:
        raise CodegenError(f"weight '{op.weight}' inside a kernel region; pass it as an input")
    dtype = tvm_dtype(op, op.result.type.dtype)
    flat = [v for v in op.value.array.reshape(-1).tolist()]
    shape = lo.shape(op.result.type)
    if len(set(flat)) == 1:
        return compute(shape, lambda *i: tvm.tirx.const(flat[0], dtype), name="splat")
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]

    def element(*idx: Any) -> Any:
        flat_index: Any = sum(i * s for i, s in zip(idx, strides, strict=True))
        out = tvm.tirx.const(flat[-1], dtype)
        for k in range(len(flat) - 2, -1, -1):
            out = tvm.tirx.Select(flat_index == k, tvm.tirx.const(flat[k], dtype), out)
        return out
    return compute(shape, element, name="literal")


@lowers("full")
def lower_full(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    dtype = tvm_dtype(op, op.result.type.dtype)
    return compute(lo.shape(op.result.type), lambda *i: tvm.tirx.const(op.value, dtype))


# ---- elementwise ------------------------------------------------------------------------------
_UNARY = {"log": topi.log, "sqrt": topi.sqrt, "rsqrt": topi.rsqrt,  # exp: lower_math
          "tanh": topi.tanh, "erf": topi.erf, "abs": topi.abs,
          "neg": topi.negative, "sin": topi.sin, "cos": topi.cos, "floor": topi.floor,
          "ceil": topi.ceil, "logical_not": topi.logical_not}
_BINARY = {"eq": topi.equal,  # add, sub, mul, div: lower_math.lower_arithmetic
           "ne": topi.not_equal, "lt": topi.less, "le": topi.less_equal, "gt": topi.greater,
           "ge": topi.greater_equal, "logical_and": topi.logical_and,
           "logical_or": topi.logical_or}


def _float_only(op: Operation) -> None:
    dtype = op.operands[0].type.dtype
    if not (isinstance(dtype, DType) and dtype.is_float):
        raise CodegenError(f"generic lowering of '{op.name}' on {op.operands[0].type.dtype} "
                           "is not written yet (integer semantics differ from TVM's)")


@lowers(*_UNARY)
def lower_unary(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    return _UNARY[op.name.split(".")[1]](args[0])


@lowers(*_BINARY)
def lower_binary(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    kind = op.name.split(".")[1]
    if kind == "ne" and str(args[0].dtype).startswith(("float", "bfloat")):
        # TIR's != is an ordered compare (false with NaN); IEEE and torch say NaN != anything
        return topi.logical_or(topi.not_equal(args[0], args[1]), topi.logical_or(
            topi.isnan(args[0]), topi.isnan(args[1])))
    return _BINARY[kind](args[0], args[1])


@lowers("pow")
def lower_pow(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    _float_only(op)
    return topi.power(args[0], args[1])


@lowers("reciprocal")
def lower_reciprocal(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    x = args[0]
    return compute(x.shape, lambda *i: tvm.tirx.const(1.0, x.dtype) / x(*i), name="recip")


@lowers("relu")
def lower_relu(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    x = args[0]
    return _map(x, lambda v: _nan_kept(v, tvm.tirx.max(v, tvm.tirx.const(0, x.dtype)), x.dtype),
                "relu")


def _nan_kept(v: Any, out: Any, dtype: object) -> Any:
    """`out`, or v where v is NaN (LLVM's max/min would return the other operand)."""
    return tvm.tirx.Select(tvm.tirx.isnan(v), v, out) if str(dtype).startswith("float") else out


@lowers("gelu")
def lower_gelu(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    x = args[0]
    half, one = tvm.tirx.const(0.5, x.dtype), tvm.tirx.const(1.0, x.dtype)
    if op.approximate == "tanh":
        k, c = tvm.tirx.const(math.sqrt(2 / math.pi), x.dtype), tvm.tirx.const(0.044715, x.dtype)
        return compute(x.shape, lambda *i: half * x(*i) * (one + tvm.tirx.tanh(
            k * (x(*i) + c * x(*i) * x(*i) * x(*i)))), name="gelu")
    r = tvm.tirx.const(math.sqrt(0.5), x.dtype)
    if x.dtype == "float32":  # libm's erf is scalar; topi's rational approximation vectorises
        scaled = compute(x.shape, lambda *i: x(*i) * r, name="gelu_scaled")
        erf = topi.fast_erf(scaled)
        return compute(x.shape, lambda *i: _nan_at_inf(x, i, half * x(*i) * (one + erf(*i))),
                       name="gelu")
    return compute(x.shape, lambda *i: _nan_at_inf(
        x, i, half * x(*i) * (one + tvm.tirx.erf(x(*i) * r))), name="gelu")


def _nan_at_inf(x: te.Tensor, i: tuple, y: Any) -> Any:
    """y, but NaN where x[i] is infinite: torch's CPU GELU gives NaN at +-inf. For f32 the test
    reads the bits (TVM's vectoriser leaves a loop with `isinf` scalar: 10% on a GELU)."""
    if x.dtype == "float32":
        bits = tvm.tirx.reinterpret("uint32", x(*i)) & tvm.tirx.const(0x7FFFFFFF, "uint32")
        infinite = bits == tvm.tirx.const(0x7F800000, "uint32")
    else:
        infinite = tvm.tirx.isinf(x(*i))
    return tvm.tirx.Select(infinite, tvm.tirx.const(float("nan"), x.dtype), y)


def _map(x: te.Tensor, fn: Callable[[object], object], name: str) -> te.Tensor:
    """out[i] = fn(x[i])"""
    return compute(shape_of(x), lambda *i: fn(x(*i)), name=name)


@lowers("clamp")
def lower_clamp(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    x = args[0]
    low = None if op.min is None or math.isinf(op.min) else tvm.tirx.const(op.min, x.dtype)
    high = None if op.max is None or math.isinf(op.max) else tvm.tirx.const(op.max, x.dtype)

    def clamp(v: object) -> object:
        out = v if low is None else tvm.tirx.max(v, low)
        out = out if high is None else tvm.tirx.min(out, high)
        return _nan_kept(v, out, x.dtype)
    return _map(x, clamp, "clamp")


@lowers("where")
def lower_where(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    return topi.where(*args)


@lowers("cast")
def lower_cast(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """torch's cast on x86 CPU, bit for bit (`dtypes.convert`): LLVM's fptosi is poison out of
    range, so float -> int selects x86's 'integer indefinite' itself; int -> f16/bf16 rounds
    through f32 as torch does; bool is x != 0, NaN included. Math in f32: f16/bf16 widen
    exactly."""
    x, src, dst = args[0], op.x.type.dtype, op.dtype
    out = tvm_dtype(op, dst)

    def wide(v: Any) -> Any:
        return v if x.dtype == "float32" else tvm.tirx.Cast("float32", v)
    if dst == boolean and src.is_float:  # TIR's != on floats is ordered: NaN != 0 is False
        return _map(x, lambda v: tvm.tirx.Or(wide(v) != tvm.tirx.const(0, "float32"),
                                             tvm.tirx.isnan(wide(v))), "cast")
    if src.is_float and isinstance(dst, IntType):
        via, top = f"int{torch_int_via(dst)}", 2.0 ** (torch_int_via(dst) - 1)

        def to_int(v: Any) -> Any:
            f = wide(v)
            ok = tvm.tirx.all(f >= tvm.tirx.const(-top, "float32"),
                              f < tvm.tirx.const(top, "float32"))
            safe = tvm.tirx.Select(ok, f, tvm.tirx.const(0, "float32"))
            n = tvm.tirx.Select(ok, tvm.tirx.Cast(via, safe), tvm.tirx.min_value(via))
            return n if via == out else tvm.tirx.Cast(out, n)
        return _map(x, to_int, "cast")
    if out == "bfloat16" and x.dtype != "bfloat16":
        return _map(x, lambda v: round_to_bf16(wide(v)), "cast")
    if src.is_int and out == "float16":
        return cast_tensor(cast_tensor(x, "float32"), out)
    return cast_tensor(x, out)


def round_to_bf16(f: Any) -> Any:
    """An f32 expression rounded to bf16 (nearest, ties to even; NaN stays NaN) by its bits:
    TVM's bf16 legalization computes in f32 and drops the rounding of a cast whose result is
    not stored (x.to(bf16).to(f32) came out as x). NaN is told by its bits too: TVM leaves
    a loop with an isnan scalar for LLVM to vectorise, which did it half as fast here."""
    u = tvm.tirx.reinterpret("uint32", f)
    c16, one = tvm.tirx.const(16, "uint32"), tvm.tirx.const(1, "uint32")
    rounded = (u + tvm.tirx.const(0x7FFF, "uint32") + ((u >> c16) & one)) >> c16
    nan = (u & tvm.tirx.const(0x7FFFFFFF, "uint32")) > tvm.tirx.const(0x7F800000, "uint32")
    top = tvm.tirx.Select(nan, (u >> c16) | tvm.tirx.const(0x40, "uint32"), rounded)
    return tvm.tirx.reinterpret("bfloat16", tvm.tirx.Cast("uint16", top))


# ---- shapes -----------------------------------------------------------------------------------
def reshape_groups(src: Sequence[object], dst: Sequence[object],
                   ) -> list[tuple[range, range]] | None:
    """Split a reshape into independent groups: (source axes, result axes) with equal
    products, each as small as possible; None when the shapes cannot be matched up (a zero
    dim, or symbolic sizes that never multiply out equal)."""
    src, dst = [sympy.sympify(d) for d in src], [sympy.sympify(d) for d in dst]
    if any(d == 0 for d in [*src, *dst]):
        return None
    groups: list[tuple[range, range]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        i0, j0 = i, j
        ps = pd = sympy.Integer(1)
        if i < len(src):
            ps, i = ps * src[i], i + 1
        if j < len(dst):
            pd, j = pd * dst[j], j + 1
        while sympy.expand(ps - pd) != 0:
            ratio = sympy.cancel(ps / pd)
            source_larger = sympy.denom(ratio) == 1 and ratio != 1
            if source_larger and j < len(dst):
                pd, j = pd * dst[j], j + 1
            elif not source_larger and i < len(src):
                ps, i = ps * src[i], i + 1
            else:
                return None
        groups.append((range(i0, i), range(j0, j)))
    return groups


@lowers("reshape")
def lower_reshape(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """Each result axis reads only the source axes of its group (`reshape_groups`), so that
    splitting heads off a hidden dim is `x[b, s, h * 16 + d]`, not a flattened index unravelled
    over every axis (which TVM cannot simplify, and which kept such kernels from vectorising)."""
    groups = reshape_groups(op.operands[0].type.shape, op.result.type.shape)
    if groups is None:
        return topi.reshape(args[0], lo.shape(op.result.type))
    x, out_shape = args[0], lo.shape(op.result.type)

    def read(*idx: object) -> object:
        at: list = [None] * len(x.shape)
        for src, dst in groups:
            if len(src) == 0:
                continue
            flat = idx[dst[0]] if len(dst) else 0
            for axis in dst[1:]:
                flat = flat * out_shape[axis] + idx[axis]
            for axis in reversed(src[1:]):
                at[axis] = flat % x.shape[axis]
                flat = flat // x.shape[axis]
            at[src[0]] = flat
        return x(*at)
    return compute(out_shape, read, name="T_reshape")


@lowers("permute")
def lower_permute(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    return topi.transpose(args[0], list(op.perm))


@lowers("expand")
def lower_expand(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    return topi.broadcast_to(args[0], lo.shape(op.result.type))


@lowers("slice")
def lower_slice(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    x = args[0]
    axis = op.axis % op.x.type.rank
    length = op.result.type.shape[axis]
    if not isinstance(length, int):
        return compute(x.shape, lambda *i: x(*i), name="whole_slice")
    dim = op.x.type.shape[axis]
    start = range(dim)[slice(op.start, op.end, op.step)].start if length else 0

    def element(*idx: object) -> object:
        src = list(idx)
        src[axis] = idx[axis] * op.step + start
        return x(*src)
    return compute(lo.shape(op.result.type), element, name="slice")


@lowers("concat")
def lower_concat(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    return topi.concatenate(args, axis=op.axis % op.result.type.rank)


@lowers("embedding")
def lower_embedding(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    weight, indices = args
    return topi.take(weight, indices, axis=0, mode="clip")


# ---- reductions and norms ---------------------------------------------------------------------
@lowers("softmax", "log_softmax")
def lower_softmax(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    axis = op.axis % op.x.type.rank
    return (topi.nn.softmax if op.name == "graph.softmax" else topi.nn.log_softmax)(args[0],
                                                                                   axis=axis)


def _ones(shape: Sequence, dtype: str) -> te.Tensor:
    return compute(shape, lambda *i: tvm.tirx.const(1.0, dtype), name="ones")


def _zeros(shape: Sequence, dtype: str) -> te.Tensor:
    return compute(shape, lambda *i: tvm.tirx.const(0.0, dtype), name="zeros")


@lowers("layer_norm", "rms_norm")
def lower_norm(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    _float_only(op)
    x, *affine = args
    rank = op.x.type.rank
    axes = list(range(rank - op.ndim, rank))
    norm_shape = [x.shape[a] for a in axes]
    weight = affine[0] if affine else _ones(norm_shape, x.dtype)
    if op.name == "graph.rms_norm":
        return topi.nn.rms_norm(x, weight, axes, epsilon=op.eps)
    bias = affine[1] if len(affine) > 1 else _zeros(norm_shape, x.dtype)
    return topi.nn.layer_norm(x, weight, bias, axes, epsilon=op.eps)


# ---- contractions -----------------------------------------------------------------------------
@lowers("matmul")
def lower_matmul(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    a, b = args
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise CodegenError("generic lowering of matmul with a 1-d operand is not written yet")
    _float_only(op)
    out_shape = lo.shape(op.result.type)
    k_dim = a.shape[-2] if op.transpose_lhs else a.shape[-1]
    k = te.reduce_axis((0, k_dim), name="k")
    batch = len(out_shape) - 2

    def operand(t: te.Tensor, idx: tuple, row: object, col: object) -> Any:
        shape = shape_of(t)
        lead = idx[batch - (len(shape) - 2):batch] if len(shape) > 2 else ()
        lead = [0 if is_one(shape[j]) else i for j, i in enumerate(lead)]
        return t(*lead, row, col)

    def element(*idx: object) -> object:
        i, j = idx[-2], idx[-1]
        lhs = operand(a, idx, k, i) if op.transpose_lhs else operand(a, idx, i, k)
        rhs = operand(b, idx, j, k) if op.transpose_rhs else operand(b, idx, k, j)
        return te.sum(lhs * rhs, axis=k)
    return compute(out_shape, element, name="matmul")


def is_one(d: object) -> bool:
    """A dim that is statically 1 (an operand broadcast along it reads index 0)."""
    return isinstance(d, (int, tvm.tirx.IntImm)) and int(d) == 1


@lowers("linear")
def lower_linear(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    x, w, *bias = args
    _float_only(op)
    k = te.reduce_axis((0, w.shape[1]), name="k")
    out = compute(lo.shape(op.result.type), lambda *i: te.sum(
        x(*i[:-1], k) * w(i[-1], k), axis=k), name="linear")
    if bias:
        out = topi.add(out, bias[0])
    return out


def _ir_module(funcs: Mapping[str, tvm.tirx.PrimFunc]) -> tvm.IRModule:
    return tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})


def library_key(funcs: Mapping[str, tvm.tirx.PrimFunc], target: object) -> str:
    """sha256 hex of what decides the compiled library: the scheduled functions (TVM's own
    serialisation of the IR), the target and the TVM version."""
    payload = json.dumps({"tvm": tvm.__version__, "target": str(target),
                          "ir": tvm.ir.save_json(_ir_module(funcs))}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def compile_funcs(funcs: dict[str, tvm.tirx.PrimFunc], what: str,
                  target: dict | tvm.target.Target | None = None) -> tvm.runtime.Executable:
    """Compile PrimFuncs (by symbol name) into one executable, for `target` (a TVM target or
    its dict; LLVM for the host by default); TVM errors become CodegenError."""
    module = _ir_module(funcs)
    try:
        return tvm.compile(module, target=tvm.target.Target(target or {"kind": "llvm"}))
    except Exception as exc:  # TVM raises its own error types; keep the message, say what
        raise CodegenError(f"TVM could not compile {what}: "
                           f"{str(exc).strip().splitlines()[-1]}") from exc


def build_generic(kernel: FusedOp, target: dict | None = None) -> tvm.runtime.Executable:
    """Lower and compile one kernel with no schedule, as function `main`."""
    func, _, _ = lower_kernel(kernel)
    return compile_funcs({"main": func}, f"kernel '{kernel.kernel_name}'", target)


from . import lower_math, lower_nn, lower_quant, lower_reduce  # noqa: E402,F401 - registers rules
