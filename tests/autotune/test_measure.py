"""Candidates measured in worker processes: canonical kernel text, real timings checked against
the interpreter, and failures (invalid configs, timeouts, wrong results) that cost only the
candidate."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from bitsmith import ir, models, passes
from bitsmith.autotune.measure import (
    LocalRunner,
    MeasureInput,
    MeasureOptions,
    _mismatch,
    kernel_text,
)
from bitsmith.codegen.tvm.target import host_target
from bitsmith.codegen.tvm.templates import select
from bitsmith.frontend import from_torch

warnings.filterwarnings("ignore", category=FutureWarning)
FAST = MeasureOptions(repeats=5, min_seconds=0.0, rotate_bytes=1 << 20)


@pytest.fixture(scope="module")
def bert_kernels() -> list:
    spec = models.get("bert")
    torch.manual_seed(0)
    module = from_torch(spec.build().eval(), spec.example_inputs(2), name="bert",
                        dynamic_batch=True)
    passes.run(module, passes.default_pipeline("cpu"))
    return [op for op in module.ops if op.name == "kernel.fused"]


def _input(op, config: dict | None = None) -> MeasureInput:
    template, problem = select(op, host_target())
    config = config or dict(template.default_config(problem, host_target()))
    return MeasureInput(kernel_text(op), template.name, json.dumps(config), (("B", 3),))


def test_kernel_text_is_the_same_for_identical_kernels_and_parses(bert_kernels) -> None:
    texts = [kernel_text(op) for op in bert_kernels]
    by_name = dict(zip([op.kernel_name for op in bert_kernels], texts, strict=True))
    assert by_name["k5_linear"] == by_name["k6_linear"]  # q and k projections, other weights
    assert by_name["k5_linear"] != by_name["k10_linear_gelu"]
    assert "k5_linear" not in by_name["k5_linear"] and "loc(" not in by_name["k5_linear"]
    module = ir.parse(by_name["k5_linear"])
    assert [op.name for op in module.ops] == ["graph.constant", "graph.constant",
                                              "kernel.fused", "func.return"]


def test_runner_times_candidates_and_isolates_failures(bert_kernels) -> None:
    linear = next(op for op in bert_kernels if op.kernel_name == "k5_linear")
    default = _input(linear)
    base = json.loads(default.config)
    inputs = [default,
              _input(linear, {**base, "TILE_M": 8, "ORDER": "nm"}),
              _input(linear, {**base, "TILE_K": 512}),  # a slice past K: invalid
              _input(next(op for op in bert_kernels if "softmax" in op.kernel_name)),
              _input(next(op for op in bert_kernels if op.kernel_name[-10:] == "layer_norm"))]
    with LocalRunner(FAST, build_workers=2) as runner:
        results = runner.run(inputs)
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert "is not valid" in results[2].error and math.isinf(results[2].median)
    for r in (results[0], results[1], results[3], results[4]):
        assert 0 < r.median < 0.1 and len(r.times) >= 5 and r.spread >= 0
        assert r.library[:4] == b"\x7fELF"


def test_a_hung_build_costs_a_timeout_and_the_next_run_goes_on(bert_kernels) -> None:
    linear = _input(bert_kernels[5])
    with LocalRunner(MeasureOptions(build_timeout=0.01), build_workers=1) as runner:
        (slow,) = runner.run([linear])
        assert not slow.ok and "timed out" in slow.error
        runner.options = FAST.__class__(**{**FAST.__dict__})
        (ok,) = runner.run([linear])
        assert ok.ok, ok.error


def test_a_wrong_result_is_refused() -> None:
    want = [np.ones((2, 3), np.float32)]
    assert _mismatch([np.ones((2, 3), np.float32)], want) is None
    assert "relative error" in _mismatch([np.full((2, 3), 1.1, np.float32)], want)
    assert "shape" in _mismatch([np.ones((3, 2), np.float32)], want)
    assert "differs" in _mismatch([np.zeros(2, np.int64)], [np.ones(2, np.int64)])


FAULTS = '''
import os, time
from bitsmith.autotune.measure import _build_worker

def build(inp):
    if inp.template == "crash":
        os.abort()
    if inp.template == "hang":
        time.sleep(600)
    return _build_worker(inp)
'''


@pytest.mark.slow  # waits out a hung build's 20 s timeout and restarts the pool: 39-53 s
def test_a_crashing_and_a_hanging_candidate_do_not_stop_the_others(bert_kernels, tmp_path,
                                                                   monkeypatch) -> None:
    (tmp_path / "bitsmith_faults.py").write_text(FAULTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import bitsmith_faults  # a module the spawned workers can import too

    good = _input(bert_kernels[5])
    crash = MeasureInput(good.kernel_ir, "crash", good.config, good.bindings)
    hang = MeasureInput(good.kernel_ir, "hang", good.config, good.bindings)
    options = MeasureOptions(repeats=5, min_seconds=0.0, rotate_bytes=1 << 20, build_timeout=20)
    with LocalRunner(options, build_workers=1, build_fn=bitsmith_faults.build) as runner:
        results = runner.run([crash, good, hang, good])
    assert [r.ok for r in results] == [False, True, False, True]
    assert "crashed" in results[0].error and "timed out" in results[2].error
