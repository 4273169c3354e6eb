"""Helpers for the fusion tests: parse a body, fuse, list kernels and refusals."""
from __future__ import annotations

import re

import numpy as np

from bitsmith import ir
from bitsmith.passes.manager import PassManager, PipelineReport

from ..support import assert_outputs_match, random_inputs

T = "tensor<3x5x7xf32>"  # odd sizes everywhere, so a wrong axis shows up
R = "tensor<3x5x1xf32>"
W = "tensor<7x7xf32>"
V = "tensor<7xf32>"
S = "tensor<f32>"
RTOL = 1e-6


def parse(body: list[str], inputs: dict[str, str], outputs: list[str],
          weights: dict[str, np.ndarray] | None = None) -> ir.Module:
    """A verified module from its body lines, argument types and result types."""
    args = ", ".join(f"%{name}: {type}" for name, type in inputs.items())
    lines = "\n".join(f"    {line}" for line in body)
    return ir.parse(f"module @m {{\n  func.func @main({args}) -> ({', '.join(outputs)}) {{\n"
                    f"{lines}\n  }}\n}}\n", weights=weights)


def weights(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Random f32 weights by name, from a fixed seed."""
    rng = np.random.default_rng(7)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def fuse(module: ir.Module, pipeline: str = "fuse",
         inputs: list[np.ndarray] | None = None) -> PipelineReport:
    """Run `pipeline` checking that outputs are kept and that a second `fuse` changes nothing."""
    inputs = random_inputs(module, seed=3) if inputs is None else inputs
    before = ir.interpret(module, *inputs)
    report = PassManager(pipeline).run(module)
    assert_outputs_match(ir.interpret(module, *inputs), before, RTOL)
    text = str(module)
    again = PassManager("fuse").run(module)
    assert str(module) == text
    assert again.records[0].stats.get("kernels-formed", 0) == 0
    assert not any(op.name.startswith("graph.") and op.name != "graph.constant"
                   for op in module.ops), "every graph op but constants belongs to a kernel"
    return report


def kernels(module: ir.Module) -> list[tuple[str, list[str]]]:
    """(kind, op names in the region) of each kernel, in program order."""
    return [(op.kind, [inner.name for inner in op.body_ops])
            for op in module.ops if op.name == "kernel.fused"]


def separate(report: PipelineReport) -> list[str]:
    """The fusion refusals."""
    return [r for r in report.remarks("fuse") if r.startswith("separate")]


def ret(*values: str, type: str = T) -> str:
    """The `func.return` line."""
    return f'"func.return"({", ".join(values)}) : ({", ".join([type] * len(values))}) -> ()'



REFUSAL = re.compile(r"separate .+?: (\S.*)\Z")


def assert_every_refusal_has_a_reason(report: PipelineReport) -> None:
    """Each remark says fused or separate; each separate one gives a reason after ': '."""
    remarks = report.remarks("fuse")
    for remark in remarks:
        assert remark.startswith(("fused ", "separate ", "attention kernel at ", "kernel ")), \
            remark
    for remark in separate(report):
        match = REFUSAL.match(remark)
        assert match and match.group(1).strip(), f"no reason in {remark!r}"


LINEAR_WEIGHTS = weights(w=(7, 7), b=(7,))
