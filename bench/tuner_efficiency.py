"""Tuner efficiency: trials the model-guided search needs to reach 95% of the best config ever
found for a kernel, against random search, measured in one run on this machine.

    python bench/tuner_efficiency.py [--trials 64] [--seeds 2] [--batch 8]

For every kernel of the suite (matmul shapes of the zoo BERT and MiniLM, a conv of the zoo
ResNet, a layer norm and an attention kernel) and every seed, each method tunes the kernel from
nothing (a fresh database, cache and cost model) for `--trials` measured configs. A config's time
is the median of every run's measurement of it; "best ever" is the fastest config any run found;
a run's trials-to-95% is the first trial by which it has measured a config within 1/0.95 of that
(the budget + 1 if never). The "seeded" method is the model-guided search on a database that
already holds the model runs' (seed 0) measurements of the *other* kernels of the suite: what a
new task gains from the kernels this device tuned before.
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
from bitsmith.autotune.tuner import Tuner, group_tasks
from bitsmith.codegen.template import Config
from bitsmith.codegen.tvm.target import host_target
from bitsmith.frontend import from_torch, load_model


def suite() -> list[tuple[str, object]]:
    """(label, kernel op) of the kernels to tune."""
    picks = {"bert": ["k5_linear", "k10_linear_gelu", "k11_linear_add", "k9_layer_norm",
                      "k0_matmul_div_add_softmax"],
             "resnet": ["k4_conv2d_add_relu"], "minilm": ["k15_linear_gelu"]}
    out = []
    for name, kernels in picks.items():
        loaded = load_model(name)
        args, kwargs = loaded.call_args(2)
        module = from_torch(loaded.module, tuple(args), dict(kwargs), dynamic_batch=True,
                            name=name)
        passes.run(module, passes.default_pipeline("cpu"), verify=False)
        by_name = {op.kernel_name: op for op in module.ops if op.name == "kernel.fused"}
        out += [(f"{name}:{k}", by_name[k]) for k in kernels if k in by_name]
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
              runner: LocalRunner, history: History = (),
              ) -> tuple[list[tuple[str, float | None]], Tuner]:
    """Tune one kernel from a fresh cache and a database holding only `history`; what it
    measured, in order."""
    tmp = Path(tempfile.mkdtemp(prefix="bitsmith-bench-"))
    os.environ["BITSMITH_CACHE_DIR"] = str(tmp)
    database = TuningDatabase(tmp / "db.sqlite3")
    for task, records in history:
        database.add_task(task.key, task.template.name, task.template.version,
                          task.problem.params)
        database.add_many(records)
    tuner = Tuner(database=database, cache=ArtifactCache(tmp / "cache"), runner=runner,
                  bindings={"B": 8}, batch=batch, seed=seed,
                  search="random" if method == "random" else "model")
    tuner.tune([op], trials)
    (task,) = tuner.tasks([op])
    return measured_configs(tuner, task.key), tuner


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
    """Print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    kernels = suite()
    runner = LocalRunner()
    curves: dict[tuple[str, str], list[list[tuple[str, float | None]]]] = {}
    tuned_before: dict[str, tuple[object, list[Record]]] = {}
    samples: dict[str, dict[str, list[float]]] = {}  # label -> config -> medians of runs
    for method in ("model", "random"):
        for label, op in kernels:
            for seed in range(args.seeds):
                points, tuner = tune_once(op, method, seed, args.trials, args.batch, runner)
                curves.setdefault((label, method), []).append(points)
                for config, median in points:
                    if median is not None:
                        samples.setdefault(label, {}).setdefault(config, []).append(median)
                if method == "model" and seed == 0:
                    (task,) = tuner.tasks([op])
                    tuned_before[label] = (task, tuner.database.records(task.key, tuner.fp))
    for label, op in kernels:  # seeded by what tuning every other kernel measured
        others = [v for k, v in tuned_before.items() if k != label]
        for seed in range(args.seeds):
            points, _ = tune_once(op, "seeded", seed, args.trials, args.batch, runner, others)
            curves.setdefault((label, "seeded"), []).append(points)
            for config, median in points:
                if median is not None:
                    samples.setdefault(label, {}).setdefault(config, []).append(median)
    runner.close()
    measured = {label: {c: statistics.median(t) for c, t in by_config.items()}
                for label, by_config in samples.items()}
    target = host_target()
    print(f"{args.trials} trials per run, {args.seeds} seeds, batch {args.batch}; trials to "
          "reach a config within 95% of the best one any run found (pooled times; median "
          "over seeds)\n")
    print("| kernel | template | valid configs | best us | model | random | random / model "
          "| seeded |\n|---|---|---|---|---|---|---|---|")
    ratios = []
    for label, op in kernels:
        (task,) = group_tasks([op], target)
        valid = sum(1 for _ in task.template.valid_configs(task.problem))
        pooled = measured[label]
        best = min(pooled.values())
        need = {m: statistics.median(trials_to(curve(c, pooled), best / 0.95, args.trials)
                                     for c in curves[(label, m)])
                for m in ("model", "random", "seeded")}
        ratio = need["random"] / need["model"]
        ratios.append(ratio)
        print(f"| {label} | {task.template.name} | {valid} | {best * 1e6:.1f} | "
              f"{need['model']:g} | {need['random']:g} | {ratio:.2f} | {need['seeded']:g} |",
              flush=True)
    print(f"\ngeometric mean random / model: {statistics.geometric_mean(ratios):.2f}")
    print("\ncost model quality on held-out configs (mean over kernels with >= 6 held out)\n")
    print("| template | objective | train | held out | Spearman | top-5 recall |\n"
          "|---|---|---|---|---|---|")
    print("\n".join(quality(kernels, measured)))


if __name__ == "__main__":
    main()
