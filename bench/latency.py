"""Median latency of bitsmith vs torch eager (and torch.compile) per zoo model and batch size,
measured side by side in one run, with the ratios.

    python bench/latency.py [--models bert mlp ...] [--batch 1 8] [--repeat 20] [--torch-compile]
"""
from __future__ import annotations

import argparse
import warnings
import torch

import bitsmith
from bitsmith import models
from bitsmith.cli_compile import median_ms


def main() -> None:
    """Print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=models.names())
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--torch-compile", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch threads {torch.get_num_threads()}; median of {args.repeat} runs\n")
    head = "| model | batch | bitsmith ms | eager ms | bitsmith / eager |"
    rule = "|---|---|---|---|---|"
    if args.torch_compile:
        head += " torch.compile ms | bitsmith / compile |"
        rule += "---|---|"
    print(head + "\n" + rule)
    for name in args.models:
        spec = models.get(name)
        torch.manual_seed(0)
        model = spec.build().eval()
        cm = bitsmith.compile(model, spec.example_inputs(2), name=name, dynamic_batch=True)
        compiled = torch.compile(model) if args.torch_compile else None
        for batch in args.batch:
            inputs = spec.example_inputs(batch)
            arrays = [t.numpy() for t in inputs]
            with torch.no_grad():
                ours = median_ms(lambda: cm(*arrays), args.repeat)
                eager = median_ms(lambda: model(*inputs), args.repeat)
                row = f"| {name} | {batch} | {ours:.2f} | {eager:.2f} | {ours / eager:.2f} |"
                if compiled is not None:
                    tc = median_ms(lambda: compiled(*inputs), args.repeat)
                    row += f" {tc:.2f} | {ours / tc:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
