"""Quantized linear layers at every activation magnitude f32 holds, from subnormal-adjacent
1e-38 to 1e35 and past overflow, against the dequantized reference: x @ dequantize(W)^T in
float64, rounded once to f32 (the quantization error only, none from the kernel's arithmetic).

The fused `qdense` kernel factors scale and zero point out of its sums and decodes codes to
values off by constant factors (2**bits, 2**(127 - bias), 2**(p - 149)); it scales each
activation row by its own power of two so that none of that overflows or underflows. Each
kernel is built once (per format and DECODE) and run at every scale: the scale is a runtime
property. What is asserted, per output:
- where the reference is within f32 range (|ref| < FMAX * (1 - 1e-3)): finite, and within the
  f32 tolerance of the largest |ref| (no absolute floor, which would hide tiny outputs);
- where it overflows (|ref| > FMAX * (1 + 1e-3)): inf of the reference's sign;
- in between (rounding decides): nothing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

import bitsmith
from bitsmith import passes
from bitsmith.codegen.template import Config
from bitsmith.codegen.tvm.lower import compile_funcs
from bitsmith.codegen.tvm.target import host_target, tvm_target
from bitsmith.codegen.tvm.templates import select
from bitsmith.frontend import from_torch
from bitsmith.ir import Module, Operation, OpResult, Value
from bitsmith.ir.dialects import quant
from bitsmith.ir.dialects.kernel import FusedOp
from bitsmith.ir.dtypes import IntType, f16, parse_dtype
from bitsmith.ir.interpreter import EvalContext, evaluate_op, kernel_calls
from bitsmith.ir.packing import to_storage
from bitsmith.ir.types import GroupAxis, QuantType, ZeroPoint
from bitsmith.passes.quant_spec import quant_pipeline_entry

from ..support import tolerance
from .test_tvm_quant import qlinear_module

FMAX = float(np.finfo(np.float32).max)
RTOL = tolerance(np.dtype(np.float32))
SCALES = [1e-38, 1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30, 3e31, 1e35]
"""Activation magnitudes every path must get right (none overflows a product)."""

FORMATS = {
    "w8-per-channel": (QuantType(IntType(8, False), 0, GroupAxis.OUT, f16, ZeroPoint.INT), 136),
    "w8-per-channel-sym": (QuantType(IntType(8, True), 0, GroupAxis.OUT, f16, ZeroPoint.NONE),
                           136),
    "w8g32": (QuantType(IntType(8, False), 32, GroupAxis.OUT, f16, ZeroPoint.INT), 136),
    "w4g32": (QuantType(IntType(4, False), 32, GroupAxis.OUT, f16, ZeroPoint.INT), 136),
    "w3-per-channel": (QuantType(IntType(3, False), 0, GroupAxis.OUT, f16, ZeroPoint.INT), 100),
    "f8e4m3": (QuantType(parse_dtype("f8e4m3"), 0, GroupAxis.OUT, f16, ZeroPoint.NONE), 136),
    "f4e2m1g32": (QuantType(parse_dtype("f4e2m1"), 32, GroupAxis.OUT, f16, ZeroPoint.NONE), 136),
    "w4g8-axis-in": (QuantType(IntType(4, False), 8, GroupAxis.IN, f16, ZeroPoint.INT), 136),
}
"""name -> (format, K): qdense's integer and float formats, and one it leaves to the generic
dequantize-then-FMA path (groups along the input axis)."""

CASES = [(name, decode) for name, (qt, _) in FORMATS.items()
         for decode in (("subnormal", "magic", "convert") if isinstance(qt.storage, IntType)
                        and qt.axis is GroupAxis.OUT else ("convert",))]


def producer(value: Value) -> Operation:
    """The op whose result `value` is (here: a weight's graph.constant)."""
    assert isinstance(value, OpResult), value
    return value.op


def dequantized_weight(module: Module) -> np.ndarray:
    """dequantize(W) of the module's one quant.linear, by the quant dialect's numpy semantics."""
    (linear,) = [op for op in module.ops if isinstance(op, quant.LinearOp)]
    ctx = EvalContext(module.weights)
    codes, scale, *zero = [evaluate_op(producer(v), ctx, [])[0] for v in linear.operands[1:]]
    return quant.dequantize(codes, scale, zero[0] if zero else None, linear.weight.type.dtype)


def reference(x: np.ndarray, wdq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x @ wdq^T in float64 (not rounded: overflow shows as a magnitude above FMAX), and
    |x| @ |wdq|^T, the scale of each output's rounding error."""
    x, wdq = x.astype(np.float64), wdq.astype(np.float64)
    return x @ wdq.T, np.abs(x) @ np.abs(wdq).T


def assert_matches_reference(got: np.ndarray, x: np.ndarray, wdq: np.ndarray,
                             what: str) -> None:
    """The module docstring's assertion: close where the reference fits in f32, inf of its sign
    where it overflows."""
    ref, magnitude = reference(x, wdq)
    got = got.astype(np.float64)
    inside = np.abs(ref) < FMAX * (1 - 1e-3)
    over = np.abs(ref) > FMAX * (1 + 1e-3)
    assert np.isfinite(got[inside]).all(), f"{what}: NaN/inf where the reference is finite"
    assert (got[over] == np.sign(ref[over]) * np.inf).all(), \
        f"{what}: {got[over]} where the reference overflows"
    err, allowed = np.abs(got - ref)[inside], RTOL * magnitude[inside]
    assert (err <= allowed).all(), \
        f"{what}: error up to {np.max(err / np.maximum(allowed, 1e-300)) * RTOL:.3g} " \
        f"x |x| @ |W|^T, allowed {RTOL}"


def inputs(m: int, k: int) -> dict[str, np.ndarray]:
    """Activations by name: x0 at every scale, rows of wildly different magnitudes (and a zero
    row) in one call."""
    x0 = np.random.default_rng(1).standard_normal((m, k))
    out = {f"x*{s:g}": (x0 * s).astype(np.float32) for s in SCALES}
    mixed = x0 * np.array([1e-30, 1e30, 0.0, 1.0])[:m, None]
    out["rows 1e-30, 1e30, 0, 1"] = mixed.astype(np.float32)
    return out


@pytest.mark.parametrize("name, decode", CASES)
def test_quantized_linear_matches_the_dequantized_reference_at_every_scale(
        name: str, decode: str) -> None:
    qt, k = FORMATS[name]
    m, n = 4, 47
    module = qlinear_module(qt, m, n, k, epilogue=False)
    wdq = dequantized_weight(module)
    passes.run(module, "fuse")
    xs = inputs(m, k)
    kernel, args, ctx = next(kernel_calls(module, [xs["x*1"]]))
    assert isinstance(kernel, FusedOp)
    at = kernel.operands.index(module.inputs[0])  # where x goes; the rest are the weights
    target = host_target()
    template, problem = select(kernel, target)
    assert template.name == ("rows" if qt.axis is GroupAxis.IN else "qdense")
    tiles = {"DECODE": decode, "TILE_M": 2, "PARALLEL": False}  # rows pair up: 2 exponents
    config = Config({**template.default_config(problem, target),
                     **(tiles if template.name == "qdense" else {})})
    built = template.build(problem, config, target)
    exe = compile_funcs({"main": built.func}, kernel.kernel_name, tvm_target(target))
    packed = [to_storage(v.type, a) for v, a in zip(kernel.operands, args, strict=True)]
    packed = [tvm.runtime.tensor(np.ascontiguousarray(
        built.packs[i][1](a) if i in built.packs else a)) for i, a in enumerate(packed)]

    def run(x: np.ndarray) -> np.ndarray:
        out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        exe["main"](*packed[:at], tvm.runtime.tensor(x), *packed[at + 1:], out)
        return out.numpy()

    for label, x in xs.items():
        assert_matches_reference(run(x), x, wdq, f"{template.name} {decode}, {label}")
        # the interpreter dequantizes and multiplies in f32: right at these scales too
        interpreted = evaluate_op(kernel, ctx, [*args[:at], x, *args[at + 1:]])[0]
        assert_matches_reference(interpreted, x, wdq, f"interpreter, {label}")
    if template.name == "qdense":
        # past f32's range: x up to FMAX, outputs that overflow are inf, the rest still right
        x = np.clip(np.random.default_rng(2).standard_normal((m, k)), -3, 3) \
            * np.array([0.0, 1e38, 3e37, 1e36])[:, None]
        x[0] = FMAX * np.sign(wdq[0])  # output (0, 0) is FMAX * sum |W[0]|
        x = x.astype(np.float32)
        ref, _ = reference(x, wdq)
        assert (np.abs(ref) > 2 * FMAX).any() and (np.abs(ref) < FMAX / 2).any()
        assert_matches_reference(run(x), x, wdq, f"{template.name} {decode}, x ~ 1e38")


@pytest.mark.parametrize("spec", ["w8", "f4e2m1g32"])
def test_compiled_quantized_model_matches_the_dequantized_layer_at_every_scale(spec: str) -> None:
    """bitsmith.compile(quant=spec) on a torch Linear, run at every scale, against the same
    layer with the dequantized weights (the quantize pass is deterministic: RTN). No bias: at
    1e-30 a bias would be all the output, and the check would see nothing of the matmul."""
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 48, bias=False)
    x0 = torch.randn(2, 128)
    module = from_torch(model, (x0,), {}, name="lin")
    passes.run(module, f"canonicalize,cse,{quant_pipeline_entry(spec)}")
    wdq = dequantized_weight(module)
    cm = bitsmith.compile(model, (x0,), quant=spec, check=False)
    for s in SCALES:
        x = (x0.double() * s).float()
        got = cm(x)
        assert_matches_reference(got.numpy(), x.numpy(), wdq, f"{spec}, x*{s:g}")
