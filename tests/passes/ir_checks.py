"""Before/expected checks for rewrite passes: printed IR, interpreter results, a second run."""
from __future__ import annotations

import textwrap
from collections.abc import Mapping

import numpy as np

from bitsmith import ir
from bitsmith.ir import print_module
from bitsmith.passes import PassManager
from bitsmith.passes.manager import PassRecord

SYMBOL_SIZE = 2  # what a symbolic input dim is bound to when making random inputs


def func(signature: str, body: str) -> str:
    """Module text of one `@main`, e.g. func("(%x: tensor<3xf32>) -> (tensor<3xf32>)", ops)."""
    lines = textwrap.dedent(body).strip().splitlines()
    ops = "".join(f"    {line.strip()}\n" for line in lines)
    return f"module @m {{\n  func.func @main{signature} {{\n{ops}  }}\n}}\n"


def text(module: ir.Module) -> str:
    """The printed module without locations (what before/expected pairs compare)."""
    return print_module(module, locations=False)


def random_inputs(module: ir.Module, seed: int = 0) -> list[np.ndarray]:
    """One random array per input (floats normal, ints small, symbolic dims SYMBOL_SIZE)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for arg in module.inputs:
        shape = tuple(d if isinstance(d, int) else SYMBOL_SIZE for d in arg.type.shape)
        dtype = arg.type.dtype
        if dtype.is_float:
            arrays.append(dtype.cast(rng.standard_normal(shape)))
        else:
            arrays.append(dtype.cast(rng.integers(-5, 6, shape)))
    return arrays


def assert_same_outputs(got: list[np.ndarray], want: list[np.ndarray], rtol: float) -> None:
    """Equal outputs: bit for bit when rtol is 0, else within rtol of each output's largest."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if rtol == 0:
            np.testing.assert_array_equal(a, b)
        else:
            scale = float(np.max(np.abs(b.astype(np.float64)))) if b.size else 0.0
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def check_pass(before: str, expected: str, pipeline: str, *,
               weights: Mapping[str, np.ndarray] | None = None,
               rtol: float = 0.0) -> tuple[ir.Module, PassRecord]:
    """Run `pipeline` on `before`; check it prints as `expected`, computes what `before`
    computed on random inputs, and that a second run changes nothing (all stats zero).

    Returns the rewritten module and the record of the first pass.
    """
    module = ir.parse(before, weights=weights)
    inputs = random_inputs(module)
    want = ir.interpret(module, *inputs)
    report = PassManager(pipeline).run(module)
    got = text(module)
    assert got == text(ir.parse(expected, weights=module.weights))
    assert_same_outputs(ir.interpret(module, *inputs), want, rtol)
    again = PassManager(pipeline).run(module)
    assert text(module) == got
    assert [r.stats for r in again.records] == [dict.fromkeys(r.stats, 0)
                                               for r in again.records]
    return module, report.records[0]


def check_unchanged(before: str, pipeline: str, *,
                    weights: Mapping[str, np.ndarray] | None = None) -> PassRecord:
    """Nothing matches: the text (locations included) is identical and no pattern fired."""
    module = ir.parse(before, weights=weights)
    original = str(module)
    record = PassManager(pipeline).run(module).records[0]
    assert str(module) == original
    assert all(n == 0 for n in record.stats.values()), record.stats
    return record
