"""bitsmith's tuner vs TVM's own MetaSchedule on one f32 matmul, same trial budget, one run.

    python bench/vs_metaschedule.py [--size 1024] [--trials 64]

Both tune C = A @ B^T (B a constant weight, as in a linear layer: bitsmith packs it, which is
part of its template) for `--trials` measured candidates, then the winners are timed side by
side with torch's matmul on the same shape (medians of TVM's time_evaluator / perf_counter).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from tvm import te
from tvm.s_tir import meta_schedule as ms

from bitsmith import ir, passes
from bitsmith.autotune.cache import ArtifactCache
from bitsmith.autotune.database import TuningDatabase
from bitsmith.autotune.tuner import Tuner
from bitsmith.cli.compile import median_ms
from bitsmith.codegen.tvm.lower import compile_funcs
from bitsmith.codegen.tvm.target import host_target, tvm_target
from bitsmith.codegen.tvm.templates import build_kernel
from bitsmith.runtime.tvm_runtime import tvm


def linear_kernel(n: int) -> object:
    """The fused kernel of y = x @ w^T for n x n operands."""
    t = f"tensor<{n}x{n}xf32>"
    text = (f'module @mm {{\n  func.func @main(%x: {t}) -> ({t}) {{\n'
            f'    %0 = "graph.constant"() {{weight = "w"}} : () -> {t}\n'
            f'    %1 = "graph.linear"(%x, %0) : ({t}, {t}) -> {t}\n'
            f'    "func.return"(%1) : ({t}) -> ()\n  }}\n}}\n')
    module = ir.parse(text, weights={"w": np.zeros((n, n), np.float32)})
    passes.run(module, "fuse")
    return next(op for op in module.ops if op.name == "kernel.fused")


def time_bitsmith(n: int, trials: int) -> tuple[float, float]:
    """(seconds spent tuning, median seconds of the tuned kernel)."""
    os.environ["BITSMITH_CACHE_DIR"] = tempfile.mkdtemp(prefix="bitsmith-ms-")
    op = linear_kernel(n)
    start = time.perf_counter()
    with TuningDatabase(tempfile.mktemp(suffix=".sqlite3")) as db:
        tuner = Tuner(database=db, cache=ArtifactCache(), bindings={})
        configs = tuner.tune([op], trials)
        tuner.close()
        (task,) = tuner.tasks([op])
    tuning = time.perf_counter() - start
    target = host_target()
    built = build_kernel(op, target, configs[op.kernel_name])
    exe = compile_funcs({"main": built.func}, "matmul", tvm_target(target))
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(built.packs[1][1](w)),
            tvm.runtime.empty((n, n), "float32")]
    exe["main"](*args)
    np.testing.assert_allclose(args[2].numpy(), x @ w.T, rtol=1e-3, atol=1e-3)
    return tuning, exe.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=7)(*args).median


def time_metaschedule(n: int, trials: int) -> tuple[float, float]:
    """(seconds spent tuning, median seconds of MetaSchedule's best schedule)."""
    a = te.placeholder((n, n), "float32", name="A")
    b = te.placeholder((n, n), "float32", name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[j, k], axis=k), name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    target = tvm_target(host_target())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        db = ms.tune_tir(mod, target, work, max_trials_global=trials,
                         num_trials_per_iter=min(64, trials))
        sch = ms.tir_integration.compile_tir(db, mod, target)
    tuning = time.perf_counter() - start
    exe = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal((n, n)).astype(np.float32)),
            tvm.runtime.tensor(rng.standard_normal((n, n)).astype(np.float32)),
            tvm.runtime.empty((n, n), "float32")]
    return tuning, exe.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=7)(*args).median


def main() -> None:
    """Print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--trials", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    n, flops = args.size, 2 * args.size ** 3
    ours_tuning, ours = time_bitsmith(n, args.trials)
    ms_tuning, theirs = time_metaschedule(n, args.trials)
    x, w = torch.randn(n, n), torch.randn(n, n)
    with torch.no_grad():
        torch_s = median_ms(lambda: torch.nn.functional.linear(x, w), 30) / 1e3
    print(f"{n}x{n}x{n} f32, {args.trials} trials each\n")
    print("| | tuning s | kernel ms | GFLOP/s |\n|---|---|---|---|")
    for label, tuning, seconds in (("bitsmith", ours_tuning, ours),
                                   ("MetaSchedule", ms_tuning, theirs),
                                   ("torch (MKL/oneDNN)", float("nan"), torch_s)):
        print(f"| {label} | {tuning:.0f} | {seconds * 1e3:.2f} | {flops / seconds / 1e9:.0f} |")
    print(f"\nbitsmith / MetaSchedule time: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
