"""Before/expected checks for rewrite passes: printed IR, interpreter results, a second run."""
from __future__ import annotations

import textwrap
from collections.abc import Mapping

import numpy as np

from bitsmith import ir
from bitsmith.ir import print_module
from bitsmith.passes import PassManager
from bitsmith.passes.manager import PassRecord

from ..support import assert_outputs_match, random_inputs


def func(signature: str, body: str) -> str:
    """Module text of one `@main`, e.g. func("(%x: tensor<3xf32>) -> (tensor<3xf32>)", ops)."""
    lines = textwrap.dedent(body).strip().splitlines()
    ops = "".join(f"    {line.strip()}\n" for line in lines)
    return f"module @m {{\n  func.func @main{signature} {{\n{ops}  }}\n}}\n"


def text(module: ir.Module) -> str:
    """The printed module without locations (what before/expected pairs compare)."""
    return print_module(module, locations=False)


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
    assert_outputs_match(ir.interpret(module, *inputs), want, rtol)
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
