"""Measuring Triton candidates: built from their template and timed in this process, on the GPU
(CUDA events) or, under TRITON_INTERPRET=1, through Triton's interpreter on the CPU (where the
times say nothing about a GPU, but the whole tuning path runs and every candidate is checked).

Each candidate's outputs are checked against the interpreter before its time counts, as on the
CPU. Candidates run one after another in this process: a GPU kernel that faults takes the
process with it (a worker process per GPU, as `LocalRunner` has for the CPU, is the next step).
Needs neither TVM nor torch at import (the runtime module that launches imports torch).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence

from ..codegen.template import TEMPLATES, CodegenError, Config, Target
from ..codegen.triton.templates import TritonTemplate
from ..ir.packing import to_storage
from .candidates import MeasureInput, MeasureOptions, MeasureResult, mismatch, reference


class TritonRunner:
    """Builds, checks and times Triton candidates for `target` in this process."""

    def __init__(self, target: Target, options: MeasureOptions | None = None) -> None:
        self.target = target
        self.options = options or MeasureOptions()

    def run(self, inputs: Sequence[MeasureInput]) -> list[MeasureResult]:
        return [self._one(inp) for inp in inputs]

    def _one(self, inp: MeasureInput) -> MeasureResult:
        try:
            return self.measure(inp)
        except Exception as exc:  # a failing candidate is its result, not the tuner's
            return MeasureResult(math.inf, error=f"{type(exc).__name__}: "
                                                 f"{str(exc).strip()[-400:]}")

    def measure(self, inp: MeasureInput) -> MeasureResult:
        from ..runtime.triton_executor import benchmark  # noqa: PLC0415 - imports torch

        kernel, arrays, want = reference(inp)
        template = TEMPLATES.get(inp.template)
        if (not isinstance(template, TritonTemplate)
                or (problem := template.match(kernel)) is None):
            raise CodegenError(f"Triton template {inp.template!r} does not match the kernel")
        config = template.space.check(Config(json.loads(inp.config)))
        if not template.valid(problem, config):
            raise CodegenError(f"config {config} is not valid for {dict(problem.params)}")
        built = template.build(problem, config, self.target)
        stored = [(to_storage(v.type, a), str(v.type.dtype))
                  for v, a in zip(kernel.operands, arrays, strict=True)]
        opts = self.options
        got, times = benchmark(kernel.kernel_name, built.source, built.launches, stored, want,
                               dict(inp.bindings), opts.warmup, opts.repeats, opts.min_seconds)
        error = mismatch(got, want)
        if error:
            return MeasureResult(math.inf, error=error)
        return MeasureResult.of(times, built.source.encode())

    def close(self) -> None:
        """Nothing to stop: candidates run in this process."""
