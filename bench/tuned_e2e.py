"""End to end after tuning: every model tuned cold (`--tune`, default 10 minutes), recompiled
warm from the cache, then timed against its untuned build, torch eager and torch.compile, all in
one run.

    python bench/tuned_e2e.py [--models bert mlp ...] [--tune 10m] [--batch 8] [--repeat 30]

All models share one fresh cache directory, as they would on a user's machine: a kernel that an
earlier model already tuned is not tuned again. The cold compile tunes every kernel not yet
cached; the warm one compiles the same model with the same `--tune` and should measure nothing.
"Measurements" counts the records the tuning database gained. The untuned build comes from a
second, empty cache directory, so it uses every template's default config.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch

import bitsmith
from bitsmith import models
from bitsmith.autotune.cache import ENV_CACHE_DIR
from bitsmith.autotune.database import TuningDatabase, default_database_path
from bitsmith.cli.compile import median_ms
from bitsmith.compiler import example_arrays
from bitsmith.frontend import load_model


def measurements() -> int:
    """Records in the current cache directory's tuning database."""
    with TuningDatabase(default_database_path()) as db:
        return db.count()


def timed_compile(loaded, call_args, call_kwargs, tune) -> tuple[object, float, int]:
    """(compiled model, wall seconds, measurements made) of one compile."""
    before = measurements()
    start = time.perf_counter()
    cm = bitsmith.compile(loaded.module, call_args, example_kwargs=call_kwargs,
                          name=loaded.name, tune=tune)
    return cm, time.perf_counter() - start, measurements() - before


SETTLE_S = 0.5
"""Pause before each timing: torch's OpenMP threads keep spinning for a while after a call
and would otherwise slow whatever is timed next (here, by up to 2x)."""


def interleaved(fns: list, repeat: int, rounds: int = 8) -> list[float]:
    """Median ms of each function: `rounds` rounds, each timing every function `repeat` times
    in turn, after a pause, starting from a different function each round (so that each
    takes every place in the order equally often); the median of its round medians. This
    machine is shared: slow spells of a second or more come and go, and the first timing
    after torch's runs is the likeliest to land in one."""
    medians: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i in range(len(fns)):
            k = (r + i) % len(fns)
            time.sleep(SETTLE_S)
            medians[k].append(median_ms(fns[k], repeat))
    return [statistics.median(column) for column in medians]


def main() -> None:
    """Print two markdown tables: compile times, then latencies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=models.names() + ["minilm"])
    parser.add_argument("--tune", default="10m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tuned_dir, untuned_dir = (Path(tempfile.mkdtemp(prefix=f"bitsmith-{p}-"))
                              for p in ("tuned", "untuned"))
    compiles, latencies = [], []
    for name in args.models:
        torch.manual_seed(0)
        loaded = load_model(name)
        call_args, call_kwargs = loaded.call_args(args.batch)
        os.environ[ENV_CACHE_DIR] = str(untuned_dir)
        untuned = bitsmith.compile(loaded.module, call_args, example_kwargs=call_kwargs,
                                   name=loaded.name)
        os.environ[ENV_CACHE_DIR] = str(tuned_dir)
        _, cold_s, cold_n = timed_compile(loaded, call_args, call_kwargs, args.tune)
        cm, warm_s, warm_n = timed_compile(loaded, call_args, call_kwargs, args.tune)
        compiles.append(f"| {name} | {cold_s:.1f} | {cold_n} | {warm_s:.1f} | {warm_n} | "
                        f"{cold_s / warm_s:.0f}x |")
        arrays = example_arrays(cm.artifact, call_args, call_kwargs)
        compiled = torch.compile(loaded.module)
        with torch.no_grad():
            tuned, base, eager, tc = interleaved(
                [partial(cm.executor.run, *arrays), partial(untuned.executor.run, *arrays),
                 partial(loaded.module, *call_args, **call_kwargs),
                 partial(compiled, *call_args, **call_kwargs)], args.repeat)
        latencies.append(f"| {name} | {tuned:.3f} | {base:.3f} | {eager:.3f} | {tc:.3f} | "
                         f"{tuned / base:.2f} | {tuned / eager:.2f} | {tuned / tc:.2f} |")
        print(compiles[-1], latencies[-1], sep="\n", flush=True)
    print(f"\nbatch {args.batch}, tune={args.tune}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; latencies: median of 8 interleaved rounds of "
          f"{args.repeat} runs each\n")
    print("| model | cold compile s | measurements | warm compile s | measurements | "
          "cold / warm |\n|---|---|---|---|---|---|")
    print("\n".join(compiles))
    print("\n| model | tuned ms | untuned ms | eager ms | torch.compile ms | tuned / untuned | "
          "tuned / eager | tuned / compile |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(latencies))


if __name__ == "__main__":
    main()
