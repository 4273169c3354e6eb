"""`bitsmith ir MODEL`: import a model, run passes, print the IR (and check it against torch)."""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import passes
from ..errors import CliError
from ..ir import Module, interpret
from ..passes.manager import count_ops
from .console import err


def add_parsers(sub: Any) -> None:
    """Register `ir` on the CLI's subparsers."""
    ir_cmd = sub.add_parser("ir", help="import a model and print its IR")
    ir_cmd.add_argument("model", help="zoo name, 'minilm', file.py:ClassOrFunction, or a "
                                      "local Hugging Face model directory")
    ir_cmd.add_argument("--dynamic-batch", action="store_true",
                        help="make dim 0 of every input a symbolic batch dim B")
    ir_cmd.add_argument("--batch", type=int, default=1, help="batch size of the example inputs")
    ir_cmd.add_argument("--seq", type=int, metavar="N",
                        help="sequence length of a token model's example inputs (default 16)")
    ir_cmd.add_argument("--dynamic-seq", action="store_true",
                        help="make dim 1 of the token inputs a symbolic sequence dim S")
    ir_cmd.add_argument("--check", action="store_true",
                        help="also run the interpreter and compare with torch")
    ir_cmd.add_argument("-o", "--output", help="write the IR to this file instead of stdout")
    ir_cmd.add_argument("--pipeline", help="passes to run after import, e.g. "
                        "'canonicalize,cse,layout{conv=nhwc},fuse{max-ops=64}'; 'default' is "
                        "the default pipeline of --target")
    ir_cmd.add_argument("--target", choices=("cpu", "gpu"), default="cpu",
                        help="whose default pipeline 'default' means")
    ir_cmd.add_argument("--print-ir-after-all", action="store_true",
                        help="print the IR (to stderr) after every pass")
    ir_cmd.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                        help="print the IR (to stderr) after each run of this pass")
    ir_cmd.add_argument("--explain-fusion", action="store_true",
                        help="say why each producer/consumer pair was or was not fused "
                        "(runs the default pipeline when --pipeline is not given)")
    ir_cmd.add_argument("--pass-stats", action="store_true",
                        help="print each pass's wall time and statistics")
    ir_cmd.add_argument("--no-verify", action="store_true",
                        help="skip verifying the IR after every pass")
    ir_cmd.set_defaults(func=cmd_ir)


def cmd_ir(args: argparse.Namespace) -> int:
    """`bitsmith ir MODEL`: print the imported module (and optionally check it)."""
    # torch is heavy: import the frontend only for the commands that need it
    from ..frontend import from_torch, load_model  # noqa: PLC0415

    if args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")
    warnings.filterwarnings("ignore", category=FutureWarning)
    with err.status(f"loading {args.model}"):
        loaded = load_model(args.model, args.seq)
    call_args, call_kwargs = loaded.call_args(args.batch)
    dynamic_dims = loaded.dynamic_dims() if args.dynamic_seq else None
    start = time.perf_counter()
    with err.status(f"importing {loaded.name} with torch.export"):
        module = from_torch(loaded.module, call_args, call_kwargs,
                            dynamic_batch=args.dynamic_batch, dynamic_dims=dynamic_dims,
                            name=loaded.name)
    err.print(f"imported {loaded.name}: {len(module.ops)} ops, {len(module.weights)} weights "
              f"in {time.perf_counter() - start:.1f}s", highlight=False)
    run_pipeline(module, args)
    text = str(module)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    if args.check:
        return check_against_torch(module, loaded.module, call_args, call_kwargs)
    return 0


def run_pipeline(module: Module, args: argparse.Namespace) -> None:
    """Run --pipeline (or the default one for --explain-fusion) and print what was asked."""
    pipeline = args.pipeline
    if pipeline is None and (args.explain_fusion or args.print_ir_after_all
                             or args.print_ir_after or args.pass_stats):
        pipeline = "default"
    if pipeline is None:
        return
    if pipeline == "default":
        pipeline = passes.default_pipeline(args.target)
    manager = passes.PassManager(
        pipeline, verify=not args.no_verify,
        print_ir_after=True if args.print_ir_after_all else args.print_ir_after,
        printer=lambda text: err.out(text, highlight=False))
    report = manager.run(module)
    if args.explain_fusion:
        ran_fuse = any(r.name.split("{")[0] == "fuse" for r in report.records)
        remarks = report.remarks("fuse")
        err.out("\n".join(remarks) if remarks else "(fuse found nothing to fuse)" if ran_fuse
                else "(the pipeline has no fuse pass)", highlight=False)
    if args.pass_stats:
        err.out(report.table(), highlight=False)
    kernels = sum(op.name == "kernel.fused" for op in module.ops)
    err.print(f"ran {manager} in {report.seconds * 1e3:.0f} ms: {count_ops(module)} ops, "
              f"{kernels} kernels", highlight=False)


def check_against_torch(module: Module, model: Callable[..., object], args: tuple,
                        kwargs: dict) -> int:
    """Run the interpreter and torch on the same inputs; report the relative error."""
    import torch  # noqa: PLC0415 - only this command needs it

    with torch.no_grad():
        ref = model(*args, **kwargs)
    refs = _flatten(ref, torch.Tensor)
    # input_names holds the keyword inputs too: args is shorter when some come by keyword
    named = {**dict(zip(module.input_names, args, strict=False)), **kwargs}
    with err.status("running the reference interpreter"):
        outs = interpret(module, *[named[n].numpy() for n in module.input_names])
    worst = 0.0
    # a count mismatch is reported: it fails `ok` below
    for i, (got, want) in enumerate(zip(outs, refs, strict=False)):
        want = want.detach().numpy()
        scale = float(np.abs(want).max()) or 1.0
        rel = float(np.abs(got.astype(np.float64) - want).max()) / scale
        worst = max(worst, rel)
        err.print(f"output {i}: shape {list(got.shape)} max |interp - torch| / max|torch| = "
                  f"{rel:.2e}", highlight=False)
    ok = len(outs) == len(refs) and worst < 1e-4
    err.print(("[green]check passed[/]" if ok else "[red]check FAILED[/]")
              + f" (tolerance 1e-4, {len(outs)} output(s))")
    return 0 if ok else 1


def _flatten(value: Any, tensor_type: type) -> list:
    """The tensors in a model's output: nested tuples, lists, dicts and ModelOutputs."""
    if isinstance(value, tensor_type):
        return [value]
    if hasattr(value, "to_tuple"):  # a transformers ModelOutput (a dict too)
        value = value.to_tuple()
    elif isinstance(value, dict):
        value = tuple(value.values())
    out: list = []
    for item in value if isinstance(value, (tuple, list)) else []:
        out.extend(_flatten(item, tensor_type))
    return out
