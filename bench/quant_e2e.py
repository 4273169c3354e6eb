"""End to end: one decode step of a Llama-style decoder at batch 1, quantized vs f32, one run.

    python bench/quant_e2e.py [--specs w8g128 w4g128 w4g128:rot w3g128] [--layers 4]
                              [--repeat 20]

The zoo's Llama architecture (`bitsmith.models.llama`) at TinyLlama-1.1B's layer shapes
(dim 2048, SwiGLU hidden 5632, 16 query / 4 kv heads, vocab 32000; --layers of them), one
token in (batch 1, sequence 1: the shape of a decode step, which has no KV cache here). Its
weights are far larger than the last-level cache, so the step streams them from memory as a
real one does. Every variant is compiled by `bitsmith.compile` (untuned default configs) and
timed side by side with torch eager f32 in this run: medians of --repeat calls, and the
speed-up of each quantized variant over bitsmith's own f32 build.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from functools import partial

import torch

import bitsmith
from bitsmith.cli.compile import median_ms
from bitsmith.compiler import example_arrays
from bitsmith.models import llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="+",
                        default=["w8g128", "w4g128", "w4g128:rot", "w3g128"])
    parser.add_argument("--layers", type=int, default=llama.LLAMA_1B.layers)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = dataclasses.replace(llama.LLAMA_1B, layers=args.layers)
    model = llama.build(cfg)
    ids = torch.randint(0, cfg.vocab, (1, 1), generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters())
    print(f"Llama decoder {cfg}: {params / 1e6:.0f}M parameters, one token at batch 1; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeat} calls\n")
    print("| variant | weights MiB | ms / step | vs bitsmith f32 | vs torch eager f32 "
          "| compile s |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        eager = median_ms(lambda: model(ids), args.repeat)
    base = None
    for spec in ["f32"] + args.specs:
        start = time.perf_counter()
        cm = bitsmith.compile(model, (ids,), name="llama", quant=None if spec == "f32" else spec)
        seconds = time.perf_counter() - start
        arrays = example_arrays(cm.artifact, (ids,), {})
        ms = median_ms(partial(cm.executor.run, *arrays), args.repeat)
        base = base or ms
        mib = sum(a.nbytes for a in cm.artifact.weights.values()) / 2**20
        print(f"| bitsmith {spec} | {mib:.0f} | {ms:.2f} | {base / ms:.2f}x | {eager / ms:.2f}x "
              f"| {seconds:.0f} |", flush=True)
    print(f"| torch eager f32 | {params * 4 / 2**20:.0f} | {eager:.2f} | | | |")


if __name__ == "__main__":
    main()
