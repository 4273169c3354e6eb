"""Generic lowering of the elementwise ops whose numerics need care: float + - * / (kept from
TVM's integer simplifier), round, sign, and Python's floor division and remainder (the sign of
the divisor), C's fmod (the sign of the dividend), log1p and expm1, each as the interpreter
defines it. exp, sigmoid and silu by `fast_exp` (f32 arithmetic that vectorises).

Float ops compute in f32 and round once to the result type, as the interpreter does for f16 and
bf16. Integer division by zero is undefined in a kernel (x86 traps): the divisor is replaced by 1
there, so such an element is wrong but the process lives; the interpreter raises instead.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import tvm
from tvm import te, topi

from ...ir import Operation
from ..template import CodegenError
from .fast_math import fast_exp
from .lower import Lowering, is_one, lowers, round_to_bf16
from .typed import compute, shape_of

Expr = Any  # a TIR expression: TVM declares its arithmetic operators on no Python type
T = tvm.tirx


def _const(value: float | int, dtype: str) -> Expr:
    return T.const(value, dtype)


def _in_f32(x: Expr, dtype: str, fn: Callable[[Expr], Expr]) -> Expr:
    """fn over x (of float type `dtype`) computed in f32, rounded back to `dtype`."""
    out = fn(x if dtype == "float32" else x.astype("float32"))
    return out if dtype == "float32" else out.astype(dtype)


def _exp_family(name: str, x: Expr, bind: bool) -> Expr:
    """exp, sigmoid (1 / (1 + e^-x)) or silu (x * sigmoid(x)) of an f32 expression."""
    if name == "exp":
        return fast_exp(x, bind)
    sig = T.const(1.0, "float32") / (T.const(1.0, "float32") + fast_exp(-x, bind))
    return sig if name == "sigmoid" else x * sig


@lowers("exp", "sigmoid", "silu")
def lower_exp(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """e^x and what is built on it, in f32 (f16 and bf16 round once); f64 by libm."""
    name = op.name.split(".")[1]
    a = args[0]
    dtype = str(a.dtype)
    if dtype == "float64":
        return {"exp": topi.exp, "sigmoid": topi.sigmoid,
                "silu": lambda v: topi.multiply(v, topi.sigmoid(v))}[name](a)
    if not dtype.startswith(("float", "bfloat")):
        raise CodegenError(f"generic lowering of '{op.name}' on {dtype} is not written yet")
    bind = lo.lets  # see fast_exp: no Let where a bf16 value may be read
    return compute(shape_of(a), lambda *i: _in_f32(a(*i), dtype,
                                                   lambda v: _exp_family(name, v, bind)),
                   name=name)


@lowers("maximum", "minimum")
def lower_extreme(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """The larger (smaller) of two broadcast operands; a NaN in either gives NaN, as in torch
    (LLVM's maxnum would return the other operand)."""
    a, b = args
    out = (topi.maximum if op.name == "graph.maximum" else topi.minimum)(a, b)
    if not op.lhs.type.dtype.is_float:
        return out
    return topi.where(topi.isnan(a), a, topi.where(topi.isnan(b), b, out))


@lowers("round")
def lower_round(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """Round half to even (floats); integers are already whole."""
    x = args[0]
    if not op.x.type.dtype.is_float:
        return compute(x.shape, lambda *i: x(*i), name="round")
    dtype = str(x.dtype)
    return compute(x.shape, lambda *i: _in_f32(x(*i), dtype, T.nearbyint), name="round")


@lowers("sign")
def lower_sign(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """-1, 0 or 1; NaN gives 0 (both comparisons are false)."""
    x = args[0]
    one, zero = _const(1, str(x.dtype)), _const(0, str(x.dtype))

    def sign(v: Expr) -> Expr:
        return T.Select(v > zero, one, T.Select(v < zero, -one, zero))
    return compute(x.shape, lambda *i: sign(x(*i)), name="sign")


def _float_divmod(a: Expr, b: Expr) -> tuple[Expr, Expr]:
    """numpy's npy_divmod in f32: (floor quotient, remainder with the divisor's sign), exact
    where floor(a / b) is not (a / b rounding up to a whole number, infinite divisors)."""
    f32 = "float32"
    zero, one, half = _const(0.0, f32), _const(1.0, f32), _const(0.5, f32)
    mod = T.call_pure_extern("float32", "fmodf", a, b)  # LLVM lowers no fmod intrinsic
    div = (a - mod) / b
    # (b < 0) != (mod < 0), spelled with & and | (TVM emits a float compare for bool !=)
    fix = (mod != zero) & (((b < zero) & (mod > zero)) | ((b > zero) & (mod < zero)))
    mod = T.Select(fix, mod + b, T.Select(mod == zero, T.copysign(zero, b), mod))
    div = T.Select(fix, div - one, div)
    floor = T.floor(div)
    floor = T.Select(div - floor > half, floor + one, floor)
    quotient = T.Select(div == zero, T.copysign(zero, a / b), floor)
    quotient = T.Select(b == zero, a / b, quotient)
    return quotient, mod


def _int_divmod(a: Expr, b: Expr, dtype: str) -> tuple[Expr, Expr]:
    """Floor quotient and remainder of integers; a zero divisor becomes 1 (see the module
    docstring) and x // -1 is negation, so that neither traps."""
    one, zero = _const(1, dtype), _const(0, dtype)
    minus_one = b == zero - one
    safe = T.Select((b == zero) | minus_one, one, b)  # Select evaluates both of its arms
    quotient = T.Select(minus_one, zero - a, T.floordiv(a, safe))
    remainder = T.Select(minus_one, zero, T.floormod(a, safe))
    return quotient, remainder


@lowers("floor_div", "remainder")
def lower_floor_ops(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """floor(lhs / rhs) and lhs - floor(lhs / rhs) * rhs, broadcasting."""
    lhs, rhs = args
    pick = 0 if op.name == "graph.floor_div" else 1
    is_float = op.lhs.type.dtype.is_float
    shape = lo.shape(op.result.type)
    dtype = str(lhs.dtype)

    def element(*i: object) -> Expr:
        a, b = _broadcast_read(lhs, i), _broadcast_read(rhs, i)
        if not is_float:
            return _int_divmod(a, b, dtype)[pick]
        b32 = b if dtype == "float32" else b.astype("float32")
        return _in_f32(a, dtype, lambda x: _float_divmod(x, b32)[pick])
    return compute(shape, element, name=op.name.split(".")[1])


def _broadcast_read(t: te.Tensor, idx: tuple) -> Expr:
    """t at the trailing-aligned index `idx` (numpy broadcasting: size-1 dims read 0)."""
    shape = shape_of(t)
    lead = len(idx) - len(shape)
    at = [0 if is_one(d) else idx[lead + j] for j, d in enumerate(shape)]
    return t(*at)


@lowers("log1p", "expm1")
def lower_log1p_expm1(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """log(1 + x) and e^x - 1 by libm's log1pf and expm1f (in f32), accurate near 0 where the
    spelled-out forms are not."""
    x = args[0]
    dtype = str(x.dtype)
    kind = op.name.split(".")[1]
    return compute(x.shape, lambda *i: _in_f32(
        x(*i), dtype, lambda v: T.call_pure_extern("float32", f"{kind}f", v)), name=kind)


@lowers("fmod")
def lower_fmod(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """C's fmod, broadcasting: the remainder of the truncated quotient (the sign of lhs).
    Floats by libm's fmodf in f32 (exact); integers by truncmod, a zero divisor becoming 1 and
    x % -1 being 0 (see the module docstring: neither may trap)."""
    lhs, rhs = args
    is_float = op.lhs.type.dtype.is_float
    dtype = str(lhs.dtype)

    def element(*i: object) -> Expr:
        a, b = _broadcast_read(lhs, i), _broadcast_read(rhs, i)
        if is_float:
            b32 = b if dtype == "float32" else b.astype("float32")
            return _in_f32(a, dtype, lambda x: T.call_pure_extern("float32", "fmodf", x, b32))
        one, zero = _const(1, dtype), _const(0, dtype)
        unsafe = (b == zero) | (b == zero - one)
        return T.Select(unsafe, zero, T.truncmod(a, T.Select(unsafe, one, b)))
    return compute(lo.shape(op.result.type), element, name="fmod")


@lowers("eq")
def lower_float_equal(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """== with IEEE NaN semantics for floats: TVM's simplifier folds `x == x` to true, NaN
    included, so a NaN operand makes it false explicitly (lower.py's table gives != its own
    NaN rule). Replaces the topi.equal entry of lower.py's table (registered after it)."""
    lhs, rhs = args
    if not op.lhs.type.dtype.is_float:
        return topi.equal(lhs, rhs)

    def element(*i: object) -> Expr:
        a, b = _broadcast_read(lhs, i), _broadcast_read(rhs, i)
        return (a == b) & T.Not(T.isnan(a) | T.isnan(b))
    return compute(lo.shape(op.result.type), element, name="eq")


_ARITHMETIC = {"add": (operator.add, topi.add), "sub": (operator.sub, topi.subtract),
               "mul": (operator.mul, topi.multiply), "div": (operator.truediv, None)}


def opaque(x: Expr, dtype: str, via: str) -> Expr:
    """x (of float type `dtype`) reinterpreted as `via` integers and back: a form TVM's
    simplifier cannot see through, which LLVM folds away (no instruction, vectors included)."""
    return T.reinterpret(dtype, T.reinterpret(f"{via}{dtype.removeprefix('float')}", x))


@lowers(*_ARITHMETIC)
def lower_arithmetic(op: Operation, args: list, lo: Lowering) -> te.Tensor:
    """+, -, * and / (floats only), broadcasting.

    TVM's rewrite simplifier applies integer algebra to floats too (x - x -> 0, x * 0 -> 0,
    (x + y) - y -> x, x + 0 -> x: wrong for NaN, infinities, -0 and rounding), when a kernel's
    PrimFunc is made and again after its computes are inlined, with no switch to turn it off.
    So both operands of a float op are made `opaque`, the left through signed and the right
    through unsigned integers: no rule then finds a literal or a nested sum in an operand, nor
    two equal operands. (LLVM's arithmetic fence would do too, but its calls keep LLVM from
    vectorising the loops that TVM leaves scalar: any with an isnan, a relu's.) bf16 computes
    in f32 and rounds each result itself: TVM's bf16 legalization would drop that rounding
    inside a fused chain. Integers keep topi's forms: their algebra is exact, and index math
    needs it."""
    kind = op.name.split(".")[1]
    fn, integer = _ARITHMETIC[kind]
    lhs, rhs = args
    if not op.lhs.type.dtype.is_float:
        if integer is None:
            raise CodegenError(f"generic lowering of '{op.name}' on {op.lhs.type.dtype} is not "
                               "written yet (integer semantics differ from TVM's)")
        return integer(lhs, rhs)
    dtype = str(lhs.dtype)
    wide = "float32" if dtype == "bfloat16" else dtype

    def element(*i: object) -> Expr:
        a, b = (_broadcast_read(t, i) for t in (lhs, rhs))
        if dtype != wide:
            a, b = a.astype(wide), b.astype(wide)
        out = fn(opaque(a, wide, "int"), opaque(b, wide, "uint"))
        return out if dtype == wide else round_to_bf16(out)
    return compute(lo.shape(op.result.type), element, name=kind)
