"""Median latency of bitsmith (untuned default configs) vs torch eager and torch.compile, per
model and batch size, measured side by side in one run, with the ratios.

    python bench/latency.py [--models bert mlp minilm ...] [--batch 1 8] [--repeat 30]
                            [--no-torch-compile]

Every model is compiled once with a dynamic batch and run at each batch size. A model is a zoo
name or `minilm` (all-MiniLM-L6-v2 with its real weights, 16 tokens).
"""
from __future__ import annotations

import argparse
import warnings
from functools import partial

import torch

import bitsmith
from bitsmith import models
from bitsmith.cli.compile import median_ms
from bitsmith.compiler import example_arrays
from bitsmith.frontend import load_model


def main() -> None:
    """Print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=models.names() + ["minilm"])
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--no-torch-compile", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.repeat} runs\n")
    head = "| model | batch | bitsmith ms | eager ms | torch.compile ms | bitsmith / eager " \
           "| bitsmith / compile |"
    print(head + "\n|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        loaded = load_model(name)
        call_args, call_kwargs = loaded.call_args(2)
        cm = bitsmith.compile(loaded.module, call_args, example_kwargs=call_kwargs,
                              name=loaded.name, dynamic_batch=True)
        compiled = None if args.no_torch_compile else torch.compile(loaded.module)
        for batch in args.batch:
            call_args, call_kwargs = loaded.call_args(batch)
            arrays = example_arrays(cm.artifact, call_args, call_kwargs)
            with torch.no_grad():
                ours = median_ms(partial(cm.executor.run, *arrays), args.repeat)
                eager = median_ms(partial(loaded.module, *call_args, **call_kwargs), args.repeat)
                tc = (median_ms(partial(compiled, *call_args, **call_kwargs), args.repeat)
                      if compiled is not None else float("nan"))
            print(f"| {name} | {batch} | {ours:.3f} | {eager:.3f} | {tc:.3f} | "
                  f"{ours / eager:.2f} | {ours / tc:.2f} |", flush=True)


if __name__ == "__main__":
    main()
