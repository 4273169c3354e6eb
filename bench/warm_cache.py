"""Cold tuning compile vs warm recompile of the same model, in one run, in a fresh cache.

    python bench/warm_cache.py [--model bert] [--tune 64]

The cold compile tunes every kernel (`--tune`: trials or time) into an empty cache directory;
the warm one compiles the same model again with the same `--tune`: every kernel is in the cache,
so it should measure nothing. Prints both wall times, the measurements each made (records added
to the tuning database) and the speed-up, and the latency of the tuned model against the
untuned one (medians, side by side).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch

import bitsmith
from bitsmith.autotune.database import TuningDatabase, default_database_path
from bitsmith.cli_compile import median_ms
from bitsmith.compiler import example_arrays
from bitsmith.frontend import load_model


def main() -> None:
    """Print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert")
    parser.add_argument("--tune", default="64")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ["BITSMITH_CACHE_DIR"] = tempfile.mkdtemp(prefix="bitsmith-warm-")
    loaded = load_model(args.model)
    call_args, call_kwargs = loaded.call_args(args.batch)
    untuned = bitsmith.compile(loaded.module, call_args, example_kwargs=call_kwargs,
                               name=loaded.name)
    rows = []
    for label in ("cold", "warm"):
        with TuningDatabase(default_database_path()) as db:
            before = db.count()
        start = time.perf_counter()
        cm = bitsmith.compile(loaded.module, call_args, example_kwargs=call_kwargs,
                              name=loaded.name, tune=args.tune)
        seconds = time.perf_counter() - start
        with TuningDatabase(default_database_path()) as db:
            rows.append((label, seconds, db.count() - before))
    arrays = example_arrays(cm.artifact, call_args, call_kwargs)
    with torch.no_grad():
        tuned_ms = median_ms(lambda: cm.executor.run(*arrays), args.repeat)
        untuned_ms = median_ms(lambda: untuned.executor.run(*arrays), args.repeat)
        eager_ms = median_ms(lambda: loaded.module(*call_args, **call_kwargs), args.repeat)
    print(f"{args.model}, batch {args.batch}, tune={args.tune}\n")
    print("| compile | seconds | measurements |\n|---|---|---|")
    for label, seconds, count in rows:
        print(f"| {label} | {seconds:.1f} | {count} |")
    print(f"\nwarm / cold speed-up: {rows[0][1] / rows[1][1]:.1f}x")
    print(f"latency ms: tuned {tuned_ms:.3f}, untuned {untuned_ms:.3f}, eager {eager_ms:.3f}; "
          f"tuned / untuned {tuned_ms / untuned_ms:.2f}, tuned / eager {tuned_ms / eager_ms:.2f}")


if __name__ == "__main__":
    main()
