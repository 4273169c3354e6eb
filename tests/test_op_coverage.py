"""Every registered op reaches codegen: each graph and quant op, alone in a kernel on odd shapes,
compiles for the CPU (TVM) and for Triton (run by Triton's interpreter here) and matches the
numpy interpreter; ops that cannot reach codegen are listed with the reason, and that reason is
tested. Adding an op without both rules fails `test_every_op_has_a_case`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from bitsmith import ir, passes
from bitsmith.errors import CodegenError
from bitsmith.ir import Trait, dtypes
from bitsmith.ir.interpreter import kernel_calls
from bitsmith.ir.types import TensorType

from .codegen.tvm_checks import run_kernel as run_tvm
from .triton_backend.triton_checks import run_kernel as run_triton

NOT_CODEGEN = {
    "quant.quantize": "weights are quantized at compile time by the quantize pass (numpy); "
                      "no pass puts quant.quantize in a model, and a kernel cannot return "
                      "packed codes",
}
"""Ops that never reach a kernel, with the reason (structural ops carry Trait.TERMINATOR or
Trait.REGION instead)."""

OWN_TESTS = {
    "kv.paged_attention": "tests/codegen/test_paged_attention.py checks its CPU kernel and "
                          "tests/triton_backend/test_triton_paged_attention.py its Triton one "
                          "against the interpreter on ragged batches, padding, windows and "
                          "cache dtypes",
}
"""Ops whose kernels a dedicated test file covers (they take page tables, not the random
inputs of a case here)."""

RNG = np.random.default_rng(0)


def f32(*shape: int, scale: float = 1.0, positive: bool = False) -> np.ndarray:
    x = (RNG.standard_normal(shape) * scale).astype(np.float32)
    return np.abs(x) + np.float32(0.25) if positive else x


def ints(*shape: int, lo: int = -7, hi: int = 8, dtype: object = np.int32) -> np.ndarray:
    return RNG.integers(lo, hi, shape).astype(dtype)


def specials(*shape: int) -> np.ndarray:
    """Normal values with NaN, infinities, signed zeros and halves (round-to-even) mixed in."""
    x = f32(*shape, scale=3.0).ravel()
    extra = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, 1.5, 2.5, -2.5], np.float32)
    x[:len(extra)] = extra
    return x.reshape(shape)


@dataclass
class Case:
    """One op applied to `arrays` (module inputs) with `attrs`; `after` appends a consumer
    (sources need one so that their kernel has an input)."""

    name: str
    arrays: list[np.ndarray]
    attrs: dict = field(default_factory=dict)
    result_types: list[TensorType] | None = None
    after: Callable[[ir.Builder, ir.Operation, list[ir.Value]], ir.Operation] | None = None


def add_input(b: ir.Builder, op: ir.Operation, inputs: list[ir.Value]) -> ir.Operation:
    return b.create(ir.graph.BINARY_OPS["add"], op.results[0], inputs[0])


def unary_cases() -> list[Case]:
    cases = []
    for short, cls in ir.graph.UNARY_OPS.items():
        if short == "logical_not":
            cases.append(Case(cls.name, [f32(3, 5, 7) > 0]))
        elif cls.FLOAT_ONLY:
            positive = short in ("log", "sqrt", "rsqrt")
            cases.append(Case(cls.name, [f32(3, 5, 7, scale=3, positive=True) if positive
                                         else specials(3, 5, 7)]))
        else:
            cases += [Case(cls.name, [specials(3, 5, 7)]), Case(cls.name, [ints(5, 7)])]
    return cases


def binary_cases() -> list[Case]:
    cases = []
    for short, cls in ir.graph.BINARY_OPS.items():
        if short in ("logical_and", "logical_or"):
            cases.append(Case(cls.name, [f32(3, 5, 7) > 0, f32(5, 1) > 0]))
            continue
        lhs, rhs = f32(3, 5, 7, scale=3), f32(5, 1, scale=3)
        if short == "pow":
            lhs = np.abs(lhs)
        cases.append(Case(cls.name, [lhs, rhs]))
        if short in ("maximum", "minimum", "add", "mul", "eq", "lt"):  # NaN and inf as torch
            cases.append(Case(cls.name, [specials(3, 5, 7), specials(5, 7)[::-1].copy()]))
        if short in ("floor_div", "remainder"):
            nonzero = ints(5, 1, lo=1, hi=6) * np.where(ints(5, 1, lo=0, hi=2) > 0, 1, -1)
            cases.append(Case(cls.name, [ints(3, 5, 7, lo=-20, hi=21), nonzero.astype(np.int32)]))
    return cases


def quant_module(kind: str) -> tuple[ir.Module, list[np.ndarray]]:
    """A float linear or conv with constant weights, through the quantize pass (w4, groups of
    32, zero points): quant.linear or quant.conv2d, and quant.dequantize where it is kept."""
    if kind == "linear":
        weights = {"w": f32(9, 64)}
        m = ir.Module("q", [TensorType((3, 64), dtypes.f32)], weights=weights)
        b = ir.Builder.at_end(m.body)
        w = b.create(ir.graph.ConstantOp, weight="w", result_types=[
            TensorType((9, 64), dtypes.f32)])
        out = b.create(ir.graph.LinearOp, m.inputs[0], w.results[0])
        arrays = [f32(3, 64)]
    else:
        weights = {"w": f32(5, 8, 3, 3)}
        m = ir.Module("q", [TensorType((1, 8, 7, 9), dtypes.f32)], weights=weights)
        b = ir.Builder.at_end(m.body)
        w = b.create(ir.graph.ConstantOp, weight="w", result_types=[
            TensorType((5, 8, 3, 3), dtypes.f32)])
        out = b.create(ir.graph.Conv2dOp, m.inputs[0], w.results[0], padding=(1, 1))
        arrays = [f32(1, 8, 7, 9)]
    b.create(ir.OP_REGISTRY["func.return"], out.results[0])
    passes.run(m, "quantize{bits=4,group=32}")
    return m, arrays


CASES: list[Case] = [
    *unary_cases(),
    *binary_cases(),
    Case("graph.log1p", [f32(3, 5, 7, scale=0.2)]),  # near 0, where log(1 + x) is inexact
    Case("graph.expm1", [f32(3, 5, 7, scale=0.2)]),  # near 0, where exp(x) - 1 is inexact
    Case("graph.fmod", [specials(3, 5, 7), specials(5, 7)[::-1].copy()]),
    Case("graph.ne", [specials(3, 5, 7), specials(5, 7)[::-1].copy()]),  # NaN != anything
    Case("graph.fmod", [ints(3, 5, 7, lo=-20, hi=21),
                        (ints(5, 1, lo=1, hi=6) * np.where(ints(5, 1, lo=0, hi=2) > 0, 1, -1)
                         ).astype(np.int32)]),
    Case("graph.gelu", [specials(3, 5, 7)], {"approximate": "tanh"}),
    Case("graph.gelu", [specials(3, 5, 7)]),
    Case("graph.clamp", [specials(3, 5, 7)], {"min": -0.5, "max": 0.75}),
    Case("graph.clamp", [ints(5, 7)], {"min": -3}),
    Case("graph.where", [f32(3, 1, 7) > 0, f32(3, 5, 7), f32(5, 1)]),
    Case("graph.cast", [f32(3, 5, 7)], {"dtype": dtypes.f16}),
    Case("graph.cast", [ints(3, 5, 7)], {"dtype": dtypes.f32}),
    Case("graph.cast", [f32(3, 5, 7) > 0], {"dtype": dtypes.i64}),
    *[Case(f"graph.reduce_{k}", [f32(3, 5, 7)], {"axes": (1,), "keepdim": keep})
      for k in ("sum", "mean", "max", "min") for keep in (False, True)],
    *[Case(f"graph.reduce_{k}", [specials(3, 5, 7)], {"axes": axes})
      for k in ("sum", "max", "min") for axes in ((2,), (0, 1))],
    *[Case(f"graph.reduce_{k}", [ints(3, 5, 7, lo=-100, hi=100)], {"axes": (1,)})
      for k in ("sum", "max", "min")],
    Case("graph.reduce_prod", [f32(3, 5, 7, positive=True)], {"axes": (2,)}),
    Case("graph.reduce_prod", [ints(3, 5, 7, lo=-3, hi=4)], {"axes": (0, 2), "keepdim": True}),
    *[Case(f"graph.reduce_{k}", [x], {"axes": axes})
      for k in ("all", "any") for x, axes in (
          (f32(3, 5, 7) > -1.0, (1,)), (ints(3, 5, 7, lo=0, hi=3).astype(np.float32), (2,)),
          (specials(3, 5, 7), ()))],
    *[Case(f"graph.{k}", [x], {"axis": axis, "keepdim": keep})
      for k in ("argmax", "argmin") for x, axis, keep in (
          (np.round(f32(3, 5, 7)), 1, False), (specials(3, 5, 7), 2, True),
          (ints(3, 5, 7, lo=-2, hi=3), 0, False))],
    Case("graph.cumsum", [f32(3, 5, 7)], {"axis": 1}),
    Case("graph.softmax", [f32(3, 5, 7)], {"axis": -1}),
    Case("graph.log_softmax", [f32(3, 5, 7)], {"axis": 1}),
    Case("graph.layer_norm", [f32(3, 5, 7), f32(7), f32(7)]),
    Case("graph.rms_norm", [f32(3, 5, 7), f32(7)]),
    Case("graph.batch_norm", [f32(2, 3, 5, 7), f32(3), f32(3, positive=True), f32(3), f32(3)]),
    Case("graph.attention", [f32(2, 3, 5, 8), f32(2, 3, 7, 8), f32(2, 3, 7, 8)],
         {"is_causal": True}),
    Case("graph.matmul", [f32(2, 3, 5), f32(5, 7)]),
    Case("graph.matmul", [f32(2, 5, 3), f32(2, 7, 5)],
         {"transpose_lhs": True, "transpose_rhs": True}),
    Case("graph.linear", [f32(3, 5), f32(7, 5), f32(7)]),
    Case("graph.conv2d", [f32(1, 3, 9, 7), f32(4, 3, 3, 3), f32(4)],
         {"padding": (1, 1), "stride": (2, 1)}),
    Case("graph.max_pool2d", [specials(1, 3, 9, 7)], {"kernel": (3, 2), "stride": (2, 2),
                                                      "padding": (1, 1)}),
    Case("graph.avg_pool2d", [f32(1, 3, 9, 7)], {"kernel": (3, 3), "stride": (2, 2),
                                                 "padding": (1, 1)}),
    Case("graph.adaptive_avg_pool2d", [f32(1, 3, 9, 7)], {"size": (2, 3)}),
    Case("graph.reshape", [f32(3, 5, 7)], result_types=[TensorType((5, 21), dtypes.f32)]),
    Case("graph.permute", [f32(3, 5, 7)], {"perm": (2, 0, 1)}),
    Case("graph.expand", [f32(3, 1, 7)], result_types=[TensorType((2, 3, 5, 7), dtypes.f32)]),
    Case("graph.slice", [f32(3, 9, 7)], {"axis": 1, "start": 1, "end": 8, "step": 3}),
    Case("graph.concat", [f32(3, 5, 7), f32(3, 2, 7)], {"axis": 1}),
    Case("graph.split", [f32(3, 9, 7)], {"axis": 1, "sizes": (4, 5)}),
    Case("graph.gather", [f32(3, 5, 7), ints(3, 4, 7, lo=0, hi=5, dtype=np.int64)], {"axis": 1}),
    Case("graph.index_select", [f32(3, 5, 7), ints(4, lo=0, hi=7, dtype=np.int64)],
         {"axis": 2}),
    Case("graph.index", [f32(3, 5, 7), ints(4, 1, lo=-5, hi=5, dtype=np.int64),
                         ints(6, lo=-7, hi=7, dtype=np.int64)], {"axes": (1, 2)}),
    Case("graph.embedding", [f32(11, 6), ints(3, 4, lo=0, hi=11, dtype=np.int64)]),
    Case("graph.pad", [f32(3, 5, 7)], {"pads": (0, 0, 1, 2, 2, 0), "value": -1.5}),
    Case("graph.full", [f32(3, 5)], {"value": 2.5}, [TensorType((3, 5), dtypes.f32)],
         add_input),
    Case("graph.arange", [f32(7)], {"start": -2.0, "step": 0.5},
         [TensorType((7,), dtypes.f32)], add_input),
    Case("graph.constant", [f32(2, 3)],
         {"value": ir.DenseAttr(TensorType((2, 3), dtypes.f32),
                                np.arange(6, dtype=np.float32).reshape(2, 3))},
         [TensorType((2, 3), dtypes.f32)], add_input),
]
QUANT = {"quant.linear": "linear", "quant.conv2d": "conv", "quant.dequantize": "linear"}


def build(case: Case) -> ir.Module:
    """A verified module: the op over inputs shaped as the case's arrays, then `after`."""
    m = ir.Module("t", [TensorType(a.shape, dtypes.from_numpy_dtype(a.dtype))
                        for a in case.arrays])
    b = ir.Builder.at_end(m.body)
    cls = ir.OP_REGISTRY[case.name]
    operands = [] if cls.has(Trait.SOURCE) else list(m.inputs)
    op = b.create(cls, *operands, result_types=case.result_types, **case.attrs)
    last = case.after(b, op, list(m.inputs)) if case.after else op
    b.create(ir.OP_REGISTRY["func.return"], *last.results)
    ir.verify(m)
    return m


def check(module: ir.Module, arrays: list[np.ndarray], name: str,
          run: Callable[..., object]) -> None:
    """Fuse, then run every kernel (one of which holds `name`) against the interpreter."""
    passes.run(module, "fuse")
    seen = False
    for kernel, args, ctx in kernel_calls(module, arrays):
        seen |= any(o.name == name for o in kernel.body_ops)
        run(kernel, args, ctx)
    assert seen, f"no kernel holds {name}"


def codegen_ops() -> list[str]:
    """bitsmith's own ops that reach kernels (other tests register ops of a `test` dialect)."""
    return sorted(n for n, cls in ir.OP_REGISTRY.items()
                  if cls.__module__.startswith("bitsmith.")
                  and not cls.has(Trait.TERMINATOR, Trait.REGION) and n not in NOT_CODEGEN)


def test_every_op_has_a_case() -> None:
    covered = {c.name for c in CASES} | set(QUANT) | set(OWN_TESTS)
    assert sorted(set(codegen_ops()) - covered) == []
    assert sorted(covered - set(codegen_ops())) == []


IDS = [f"{c.name}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_op_compiles_for_tvm_and_matches_the_interpreter(case: Case) -> None:
    check(build(case), case.arrays, case.name, run_tvm)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_op_compiles_for_triton_and_matches_the_interpreter(case: Case) -> None:
    check(build(case), case.arrays, case.name, run_triton)


@pytest.mark.parametrize("name", sorted(QUANT))
@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_quant_op_compiles_and_matches_the_interpreter(name: str, backend: str) -> None:
    module, arrays = quant_module(QUANT[name])
    if name == "quant.dequantize":  # the quantize pass fuses it away: ask for it explicitly
        module = dequantized(module)
    check(module, arrays, name, run_tvm if backend == "tvm" else run_triton)


def dequantized(module: ir.Module) -> ir.Module:
    """`module` with its quant.linear replaced by dequantize + graph.linear."""
    (qlin,) = [op for op in module.ops if op.name == "quant.linear"]
    b = ir.Builder.before_op(qlin)
    weight = b.create(ir.OP_REGISTRY["quant.dequantize"], *qlin.operands[1:])
    lin = b.create(ir.graph.LinearOp, qlin.operands[0], weight.results[0])
    qlin.results[0].replace_all_uses_with(lin.results[0])
    qlin.erase()
    ir.verify(module)
    return module


def test_quant_quantize_is_refused_by_codegen_with_the_reason() -> None:
    """A quant.quantize that reached a kernel anyway is refused, naming the op, by both."""
    qtype = ir.QuantType(dtypes.parse_dtype("u4"), group_size=32)
    m = ir.Module("t", [TensorType((4, 32), dtypes.f32), TensorType((4, 1), dtypes.f16)])
    b = ir.Builder.at_end(m.body)
    op = b.create(ir.OP_REGISTRY["quant.quantize"], *m.inputs,
                  result_types=[TensorType((4, 32), qtype)])
    b.create(ir.OP_REGISTRY["func.return"], *op.results)
    ir.verify(m)
    arrays = [f32(4, 32), np.ones((4, 1), np.float16)]
    for run in (run_tvm, run_triton):
        with pytest.raises(CodegenError, match="quant.quantize"):
            check(build_again(m), arrays, "quant.quantize", run)


def build_again(module: ir.Module) -> ir.Module:
    """A fresh copy of `module` (fusion rewrites in place)."""
    return ir.parse(str(module), weights=dict(module.weights))
