"""Tuner efficiency: trials the model-guided search needs to reach 95% of the best config ever
found for a kernel, against random search, from nothing and from another device's
measurements, measured in one run on this machine.

    python bench/tuner_efficiency.py [--trials 48] [--seeds 2] [--batch 8] [--kernels ...]

The suite is the large kernels of BERT-base and ResNet-50 at batch 1 (BERT's FFN and
attention-output linears at sequence 128, a 3x3 convolution of ResNet's first stage), each
built as the default pipeline fuses it, on their templates' full knob spaces. For every kernel
and seed, each method tunes it for `--trials` measured configs:
- "model": the model-guided search from nothing (a fresh database, cache and cost model);
- "random": random search from nothing;
- "transfer": the model-guided search on a database holding what tuning the *whole suite*
  measured on another device, whose records train the cost model with that device's
  descriptors (`Tuner(transfer=[its fingerprint])`). The other device is this CPU as an
  AVX2 + FMA machine (code for LLVM's "haswell", 8 lanes): a different ISA, vector width
  and best config, timed on the same silicon.
A config's time is the median of every run's measurement of it; "best ever" is the fastest
config any run found on this device; a run's trials-to-95% is the first trial by which it has
measured a config within 1/0.95 of that (the budget + 1 if never). "default / best" is the
template's default config against that best: what tuning gains.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from bitsmith import passes
from bitsmith.autotune.cache import ArtifactCache
from bitsmith.autotune.cost_model import CostModel
from bitsmith.autotune.database import Record, TuningDatabase
from bitsmith.autotune.features import features
from bitsmith.autotune.fingerprint import device_descriptors, device_fingerprint
from bitsmith.autotune.measure import LocalRunner
from bitsmith.autotune.tuner import Tuner, config_json, group_tasks
from bitsmith.codegen.template import Config, Target
from bitsmith.codegen.tvm.target import avx2_target, host_target
from bitsmith.frontend import from_torch


class Ffn(torch.nn.Module):
    """BERT-base's FFN up-projection with its GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(768, 3072)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.up(x))


class Residual(torch.nn.Module):
    """A linear layer and the residual add after it (BERT's attention output, FFN down)."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(k, n)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + r


class Conv(torch.nn.Module):
    """ResNet-50's first-stage 3x3 convolution, with its (folded) batch norm's bias and ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


KERNELS = {
    "bert-base:ffn_up_gelu": (Ffn, lambda: (torch.randn(1, 128, 768),)),
    "bert-base:ffn_down_add": (lambda: Residual(3072, 768),
                               lambda: (torch.randn(1, 128, 3072), torch.randn(1, 128, 768))),
    "bert-base:attn_out_add": (lambda: Residual(768, 768),
                               lambda: (torch.randn(1, 128, 768), torch.randn(1, 128, 768))),
    "resnet-50:conv3x3_relu": (Conv, lambda: (torch.randn(1, 64, 56, 56),)),
}


def suite(names: list[str]) -> list[tuple[str, object]]:
    """(label, kernel op) of the kernels to tune: each module's one contraction kernel."""
    out = []
    for name in names:
        make, inputs = KERNELS[name]
        module = from_torch(make().eval(), inputs(), {}, name=name.split(":")[1])
        passes.run(module, passes.default_pipeline("cpu"), verify=False)
        (op,) = [op for op in module.ops if op.name == "kernel.fused"
                 and op.attributes.get("kind") in ("matmul", "conv")]
        out.append((name, op))
    return out


def measured_configs(tuner: Tuner, task_key: str) -> list[tuple[str, float | None]]:
    """(config, median or None on failure) of each trial, in measurement order."""
    return [(r.config, r.median) for r in tuner.database.records(task_key, tuner.fp)]


def curve(trials: list[tuple[str, float | None]], pooled: dict[str, float]) -> list[float]:
    """After each trial, the pooled time of the best config measured so far.

    Pooled time: the median of every run's measurement of that config. Scoring each run by
    which configs it found (not by its own, noisy, timing of them) keeps a lucky measurement
    in one run from setting a goal no other run can reach.
    """
    best, out = float("inf"), []
    for config, median in trials:
        if median is not None:
            best = min(best, pooled[config])
        out.append(best)
    return out


History = list[tuple[object, list[Record]]]
"""(task, its records) of kernels tuned before."""


def tune_once(op: object, method: str, seed: int, trials: int, batch: int,
              runner: LocalRunner, history: History = (), target: Target | None = None,
              transfer: tuple[dict, ...] = ()) -> tuple[list[tuple[str, float | None]], Tuner]:
    """Tune one kernel (for `target`, the host by default) from a fresh cache and a database
    holding only `history` (another device's records, with `transfer` its fingerprint);
    what it measured, in order."""
    tmp = Path(tempfile.mkdtemp(prefix="bitsmith-bench-"))
    os.environ["BITSMITH_CACHE_DIR"] = str(tmp)
    database = TuningDatabase(tmp / "db.sqlite3")
    for task, records in history:
        database.add_task(task.key, task.template.name, task.template.version,
                          task.problem.params)
        database.add_many(records)
    tuner = Tuner(target=target, database=database, cache=ArtifactCache(tmp / "cache"),
                  runner=runner, bindings={"B": 1}, batch=batch, seed=seed,
                  search="random" if method == "random" else "model", transfer=transfer)
    tuner.tune([op], trials)
    (task,) = tuner.tasks([op])
    return measured_configs(tuner, task.key), tuner


def other_device(kernels: list, trials: int, batch: int, runner: LocalRunner,
                 ) -> tuple[History, dict]:
    """The suite tuned (model-guided, seed 0) for this CPU as an AVX2 machine: every
    kernel's task and records, and that device's fingerprint."""
    target = avx2_target()
    history: list[tuple[object, list[Record]]] = []
    fingerprint: dict = {}
    for _, op in kernels:
        _, tuner = tune_once(op, "model", 0, trials, batch, runner, target=target)
        (task,) = tuner.tasks([op])
        history.append((task, tuner.database.records(task.key, tuner.fp)))
        fingerprint = tuner.fingerprint
    return history, fingerprint


def quality(kernels: list, measured: dict[str, dict[str, float]], seed: int = 0) -> list[str]:
    """Per template and objective: Spearman correlation and top-5 recall of a cost model on
    held-out measured configs (30% of each kernel's configs), fit on the other 70%."""
    target = host_target()
    descriptors = device_descriptors(device_fingerprint(target))
    by_template: dict[str, list[tuple[str, dict, float]]] = {}
    for label, op in kernels:
        (task,) = group_tasks([op], target)
        for config, median in measured.get(label, {}).items():
            row = features(task.template.name, task.problem.params, Config(json.loads(config)),
                           descriptors)
            by_template.setdefault(task.template.name, []).append((label, row, median))
    lines = []
    rng = random.Random(seed)
    for template, records in sorted(by_template.items()):
        train, test = [], []
        for record in records:
            (test if rng.random() < 0.3 else train).append(record)
        for objective in ("rank:pairwise", "reg:squarederror"):
            model = CostModel(objective).fit([r[1] for r in train], [r[2] for r in train],
                                             [r[0] for r in train])
            rhos, recalls = [], []
            for label in sorted({r[0] for r in test}):
                group = [r for r in test if r[0] == label]
                if len(group) < 6:
                    continue
                scores = model.predict([r[1] for r in group])
                times = np.array([r[2] for r in group])
                rhos.append(spearmanr(scores, -times).statistic)
                best5 = set(np.argsort(times)[:5])
                recalls.append(len(best5 & set(np.argsort(-scores)[:5])) / 5)
            if rhos:
                lines.append(f"| {template} | {objective} | {len(train)} | {len(test)} | "
                             f"{statistics.mean(rhos):.2f} | {statistics.mean(recalls):.2f} |")
    return lines


def trials_to(curve_: list[float], goal: float, budget: int) -> int:
    """1-based trial at which the curve reaches `goal` seconds (budget + 1 if it never does)."""
    return next((i + 1 for i, t in enumerate(curve_) if t <= goal), budget + 1)


def main() -> None:
    """Print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    kernels = suite(args.kernels)
    runner = LocalRunner()
    history, avx2 = other_device(kernels, args.trials, args.batch, runner)
    curves: dict[tuple[str, str], list[list[tuple[str, float | None]]]] = {}
    samples: dict[str, dict[str, list[float]]] = {}  # label -> config -> medians of runs
    defaults: dict[str, str] = {}
    for seed in range(args.seeds):  # methods interleaved: a slow spell hits them alike
        for label, op in kernels:
            for method in ("model", "random", "transfer"):
                points, tuner = tune_once(op, method, seed, args.trials, args.batch, runner,
                                          history if method == "transfer" else (),
                                          transfer=(avx2,) if method == "transfer" else ())
                curves.setdefault((label, method), []).append(points)
                for config, median in points:
                    if median is not None:
                        samples.setdefault(label, {}).setdefault(config, []).append(median)
                (task,) = tuner.tasks([op])
                defaults[label] = config_json(task.template.default_config(task.problem,
                                                                           host_target()))
    runner.close()
    measured = {label: {c: statistics.median(t) for c, t in by_config.items()}
                for label, by_config in samples.items()}
    target = host_target()
    print(f"{args.trials} trials per run, {args.seeds} seeds, batch {args.batch}; trials to "
          "reach a config within 95% of the best one any run found (pooled times; median "
          "over seeds); transfer: from the suite tuned as an AVX2 device\n")
    print("| kernel | template | valid configs | default us | best us | default / best | "
          "model | random | random / model | transfer | random / transfer |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {"model": [], "transfer": []}
    for label, op in kernels:
        (task,) = group_tasks([op], target)
        valid = sum(1 for _ in task.template.valid_configs(task.problem))
        pooled = measured[label]
        best = min(pooled.values())
        default = pooled.get(defaults[label], float("nan"))
        need = {m: statistics.median(trials_to(curve(c, pooled), best / 0.95, args.trials)
                                     for c in curves[(label, m)])
                for m in ("model", "random", "transfer")}
        for m in ratios:
            ratios[m].append(need["random"] / need[m])
        print(f"| {label} | {task.template.name} | {valid} | {default * 1e6:.1f} | "
              f"{best * 1e6:.1f} | {default / best:.2f} | {need['model']:g} | "
              f"{need['random']:g} | {ratios['model'][-1]:.2f} | {need['transfer']:g} | "
              f"{ratios['transfer'][-1]:.2f} |", flush=True)
    print(f"\ngeometric mean random / model: {statistics.geometric_mean(ratios['model']):.2f}; "
          f"random / transfer: {statistics.geometric_mean(ratios['transfer']):.2f}")
    print("\ncost model quality on held-out configs (mean over kernels with >= 6 held out)\n")
    print("| template | objective | train | held out | Spearman | top-5 recall |\n"
          "|---|---|---|---|---|---|")
    print("\n".join(quality(kernels, measured)))


if __name__ == "__main__":
    main()
