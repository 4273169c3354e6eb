"""Op count before and kernel count after the default pipeline, and intermediate memory
unplanned vs planned, for every zoo model and the transformers architectures.

    python bench/fusion_table.py [--batch 8] [--target cpu]
"""
from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter

import torch

from bitsmith import ir, models, passes
from bitsmith.frontend import from_torch
from bitsmith.models.hf import ARCHS
from bitsmith.passes.memory import format_bytes, plan_memory


def compute_ops(module: ir.Module) -> int:
    """Ops that compute something (not weights, not the terminator)."""
    return sum(op.name not in ("graph.constant", "func.return") for op in module.walk())


def row(name: str, model: torch.nn.Module, inputs: tuple, batch: int, target: str) -> str:
    """One markdown table row for a model."""
    module = from_torch(model.eval(), inputs, name=name, dynamic_batch=True)
    ops = compute_ops(module)
    bindings = {"B": batch}
    unfused = plan_memory(module, bindings)
    start = time.perf_counter()
    passes.run(module, passes.default_pipeline(target))
    seconds = time.perf_counter() - start
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    kinds = Counter(op.kind for op in kernels)
    fused = plan_memory(module, bindings)
    kind_text = " ".join(f"{k}:{n}" for k, n in sorted(kinds.items()))
    return (f"| {name} | {ops} | {len(kernels)} | {len(kernels) / ops:.2f} | {kind_text} | "
            f"{format_bytes(unfused.naive_bytes)} | {format_bytes(unfused.arena_bytes)} | "
            f"{format_bytes(fused.naive_bytes)} | {format_bytes(fused.arena_bytes)} | "
            f"{seconds * 1e3:.0f} |")


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--target", default="cpu", choices=("cpu", "gpu"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"default pipeline ({args.target}): {passes.default_pipeline(args.target)}; "
          f"memory at batch {args.batch}\n")
    print("| model | ops | kernels | ratio | kernel kinds | unfused: unplanned | unfused: "
          "planned | fused: unplanned | fused: planned | pipeline ms (verify on) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in models.names():
        torch.manual_seed(0)
        spec = models.get(name)
        print(row(name, spec.build(), spec.example_inputs(2), args.batch, args.target),
              flush=True)
    for arch in sorted(ARCHS):
        torch.manual_seed(0)
        build, make_inputs = ARCHS[arch]
        print(row(f"hf-{arch}", build(), make_inputs(2), args.batch, args.target), flush=True)


if __name__ == "__main__":
    main()
