"""Elementary functions as TIR arithmetic that LLVM vectorises, where LLVM's own intrinsics
become a libm call per vector lane. Only TVM is imported here: the lowering rules and the
hand-written kernels (`paged_attention`) share these."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import tvm

Expr = Any  # a TIR expression: TVM declares its arithmetic operators on no Python type
T = tvm.tirx

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = hi + lo; n * hi exact for |n| < 2^15
_EXP_MAX, _EXP_MIN = 88.72283935546875, -87.33654022216797  # e^x overflows / is not normal


def fast_exp(x: Expr, bind: bool = True) -> Expr:
    """e^x of an f32 expression in f32 arithmetic that LLVM vectorises (its exp is a libm call
    per lane): n = round(x log2 e), y = x - n ln2 in two parts (Cody-Waite, |y| <= ln2 / 2),
    e^y by its Taylor series to y^7 (truncation 5e-9, at most 1.3 ulp in all, measured over
    the normal range), times 2^n built in the exponent bits (as 2^(n-1) * 2 for n > 0, so
    that n = 128 stays finite). inf past the overflow threshold, 0 below the smallest normal
    result (where libm gives a subnormal under 1.2e-38), NaN for NaN. With `bind` each
    intermediate is bound once (a Let), so that an inlined operand is not copied per use;
    without, the expression repeats them (TVM's bf16 legalisation miscompiles a Let whose
    value reads bf16: measured, every element inf)."""
    def f(c: float) -> Expr:
        return T.const(c, "float32")

    def let(value: Expr, name: str, body: Callable[[Expr], Expr]) -> Expr:
        if not bind:
            return body(value)
        var = T.Var(name, "float32")
        return T.Let(var, value, body(var))

    def scaled(x: Expr, n: Expr, y: Expr) -> Expr:
        poly = f(1.0 / 5040)
        for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
            poly = poly * y + f(c)
        k = T.Cast("int32", n)
        up = T.Select(k > 0, T.const(1, "int32"), T.const(0, "int32"))  # 2^n = 2^(n-up) 2^up
        out = poly * T.reinterpret("float32", T.shift_left(k + 127 - up, 23)) \
            * T.Select(k > 0, f(2.0), f(1.0))
        return T.Select(x > f(_EXP_MAX), f(math.inf), T.Select(x < f(_EXP_MIN), f(0.0), out))

    return let(x, "exp_x", lambda xv: let(
        T.Select(xv > f(_EXP_MAX), f(_EXP_MAX), T.Select(xv < f(_EXP_MIN), f(_EXP_MIN), xv)),
        "exp_c", lambda c: let(
            T.floor(c * f(_LOG2E) + f(0.5)), "exp_n", lambda n: let(
                (c - n * f(_LN2_HI)) - n * f(_LN2_LO), "exp_y",
                lambda y: scaled(xv, n, y)))))
