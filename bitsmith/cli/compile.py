"""`bitsmith compile`, `bitsmith run` and `bitsmith bench`.

`run` needs only the runtime: it must work where torch is not installed, so the compiler (which
imports torch) is imported inside the commands that need it.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ..errors import CliError
from .console import err, read_key


def add_parsers(sub: Any) -> None:
    """Register the three subcommands on the CLI's subparsers."""
    comp = sub.add_parser("compile", help="compile a model to a .bsm artifact")
    comp.add_argument("model", help="zoo name, 'minilm', file.py:Name, or a Hugging Face dir")
    comp.add_argument("-o", "--output", help="artifact path (default: MODEL.bsm)")
    comp.add_argument("--batch", type=int, default=1, help="batch size of the example inputs")
    comp.add_argument("--dynamic-batch", action="store_true",
                      help="accept any batch size (dim 0 of every input is a symbol B)")
    comp.add_argument("--seq", type=int, metavar="N",
                      help="sequence length of a token model's example inputs (default 16)")
    comp.add_argument("--dynamic-seq", action="store_true",
                      help="accept any sequence length (dim 1 of the token inputs is a "
                           "symbol S)")
    comp.add_argument("--pipeline", help="passes to run (default: the target's pipeline)")
    comp.add_argument("--tune", metavar="BUDGET",
                      help="tune kernels not in the cache first: trials (200) or time (10m)")
    comp.add_argument("--ray", metavar="ADDRESS",
                      help="with --tune: measure on a Ray cluster ('auto': the one 'ray start' "
                           "made; needs bitsmith[cluster])")
    comp.add_argument("--quant", metavar="SPEC",
                      help="quantize linear weights: w4g128, w3g128:gptq, f6e3m2g64, ...")
    comp.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32",
                      help="bf16: linear layers and convs in bf16 with f32 accumulation on "
                           "the CPU's AMX tiles; int8: in int8 (activations quantized per row "
                           "at run time, weights per channel), int32 sums (a CPU without "
                           "them keeps f32 and says so)")
    comp.add_argument("--calib", metavar="DATA.npz",
                      help="calibration inputs for --quant: one array per model input, in "
                           "input order (arr_0, arr_1, ... or the input names), samples on "
                           "axis 0")
    comp.add_argument("--no-check", action="store_true",
                      help="skip comparing the built model with torch on the example inputs "
                           "(by default a mismatch is an error and nothing is written)")
    comp.add_argument("--sign", metavar="KEYFILE",
                      help="sign the artifact with the secret in KEYFILE (at least 16 bytes, "
                           "e.g. `head -c 32 /dev/urandom > bitsmith.key`); load it with "
                           "--key KEYFILE / bitsmith.load(path, key=...)")
    comp.set_defaults(func=cmd_compile)
    tune = sub.add_parser("tune", help="tune a model's kernels into the cache")
    tune.add_argument("model")
    tune.add_argument("--budget", default="10m", help="trials (200) or time (10m, 90s)")
    tune.add_argument("--batch", type=int, default=8, help="batch size the kernels are timed at")
    tune.add_argument("--seq", type=int, metavar="N",
                      help="sequence length of a token model's inputs (default 16)")
    tune.add_argument("--search", choices=("model", "random"), default="model",
                      help="model-guided evolutionary search (default) or random search")
    tune.add_argument("--ray", metavar="ADDRESS",
                      help="build and time on a Ray cluster ('auto': the one 'ray start' made; "
                           "needs bitsmith[cluster]): builds anywhere, timings on its nodes of "
                           "this machine's device fingerprint")
    tune.set_defaults(func=cmd_tune)
    run = sub.add_parser("run", help="run a .bsm artifact on .npy inputs")
    run.add_argument("artifact")
    run.add_argument("--input", action="append", required=True, metavar="[NAME=]X.npy",
                     help="one per model input: in order, or each named (input_ids=ids.npy)")
    run.add_argument("--output", required=True, metavar="Y.npy",
                     help="where to write the output (several outputs: Y.0.npy, Y.1.npy, ...)")
    run.add_argument("--key", metavar="KEYFILE",
                     help="refuse the artifact unless it is signed with the key in KEYFILE")
    run.set_defaults(func=cmd_run)
    bench = sub.add_parser("bench", help="median latency: bitsmith vs torch eager (and "
                                         "torch.compile)")
    bench.add_argument("model")
    bench.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    bench.add_argument("--seq", type=int, metavar="N",
                       help="sequence length of a token model's inputs (default 16)")
    bench.add_argument("--repeat", type=int, default=20)
    bench.add_argument("--torch-compile", action="store_true",
                       help="also time torch.compile (its compile takes a while on CPU)")
    bench.add_argument("--profile", action="store_true",
                       help="also print the median time of every kernel at the last batch size")
    bench.add_argument("--generate", action="store_true",
                       help="an LLM (a zoo decoder, smollm2, a .gguf file, a Hugging Face "
                            "directory or a .bsm): prefill and decode tokens/s, time to first "
                            "token")
    bench.add_argument("--prompt-len", type=int, nargs="+", default=[128],
                       help="with --generate: prompt lengths to prefill")
    bench.add_argument("--gen-len", type=int, default=64,
                       help="with --generate: decode steps timed per batch size")
    bench.add_argument("--quant", help="with --generate: quantize (e.g. w4g128:gptq)")
    bench.add_argument("--kv", default="f16", help="with --generate: KV cache element type")
    bench.add_argument("--act", default="f32", choices=("f32", "int8"),
                       help="with --generate: int8 activation blocks for the quantized layers")
    bench.set_defaults(func=cmd_bench)


def _load(name: str, seq: int | None = None) -> Any:
    from ..frontend import load_model  # noqa: PLC0415 - torch only here

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's own noise
    return load_model(name, seq)


def _compile(loaded: Any, batch: int, dynamic: bool, pipeline: str | None,
             tune: str | None = None, quant: str | None = None,
             calib: list[tuple[np.ndarray, ...]] | None = None, check: bool = True,
             dynamic_seq: bool = False, precision: str = "f32", ray: str | None = None) -> Any:
    from .. import compiler  # noqa: PLC0415 - imports torch; `run` must not

    args, kwargs = loaded.call_args(batch)
    with _ray_runner(ray) as runner:
        return compiler.compile(loaded.module, args, example_kwargs=kwargs, name=loaded.name,
                                dynamic_batch=dynamic, pipeline=pipeline, tune=tune,
                                progress=True, quant=quant, calib=calib, check=check,
                                precision=precision, runner=runner,
                                dynamic_dims=loaded.dynamic_dims() if dynamic_seq else None)


@contextlib.contextmanager
def _ray_runner(address: str | None) -> Iterator[Any]:
    """A RayRunner on the cluster at `address` (closed after), or None without one."""
    if address is None:
        yield None
        return
    from ..autotune.ray_runner import RayRunner  # noqa: PLC0415 - Ray only when asked

    with RayRunner(address) as runner:
        yield runner


def load_calibration(path: str, names: tuple[str, ...]) -> list[tuple[np.ndarray, ...]]:
    """A .npz of calibration inputs: arrays named after the model inputs, or arr_0, arr_1..."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"--calib {path}: cannot read it as .npz ({exc})") from None
    keys = list(names) if all(n in data for n in names) else [f"arr_{i}"
                                                                for i in range(len(names))]
    missing = [k for k in keys if k not in data]
    if missing:
        raise CliError(f"--calib {path}: expected arrays {', '.join(names)} (or "
                       f"arr_0..arr_{len(names) - 1}), got {', '.join(data.files)}")
    return [tuple(data[k] for k in keys)]


def cmd_tune(args: argparse.Namespace) -> int:
    """Tune every kernel of a model that the cache lacks; print what was tuned."""
    from .. import compiler  # noqa: PLC0415 - imports torch; `run` must not
    from ..autotune.database import TuningDatabase, default_database_path  # noqa: PLC0415
    from ..autotune.tuner import Budget, Tuner  # noqa: PLC0415
    from ..codegen.backend import kernels_of  # noqa: PLC0415

    budget = Budget.parse(args.budget)
    loaded = _load(args.model, args.seq)
    module = compiler.fused_module(loaded, args.batch)
    kernels = kernels_of(module)
    start = time.perf_counter()
    with TuningDatabase(default_database_path()) as database, _ray_runner(args.ray) as runner:
        tuner = Tuner(database=database, bindings={"B": args.batch}, search=args.search,
                      progress=True, runner=runner)
        try:
            before = tuner.cached_configs(kernels)
            configs = tuner.tune(kernels, budget)
        finally:
            tuner.close()
    table = Table(title=f"{loaded.name}: {len(kernels)} kernels, {len(before)} already cached, "
                        f"{time.perf_counter() - start:.1f} s")
    for col in ("kernel", "config"):
        table.add_column(col)
    for op in kernels:
        config = configs.get(op.kernel_name)
        table.add_row(op.kernel_name, str(config) if config else "(not tuned: budget spent)")
    err.print(table)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile, save, and print a summary table."""
    if args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")
    key = read_key(args.sign) if args.sign else None  # a bad key fails before the compile
    loaded = _load(args.model, args.seq)
    start = time.perf_counter()
    calib = load_calibration(args.calib, loaded.input_names) if args.calib else None
    if args.ray and not args.tune:
        raise CliError("--ray measures what --tune tunes: give --tune BUDGET too")
    cm = _compile(loaded, args.batch, args.dynamic_batch, args.pipeline, args.tune,
                  args.quant, calib, check=not args.no_check, dynamic_seq=args.dynamic_seq,
                  precision=args.precision, ray=args.ray)
    seconds = time.perf_counter() - start
    out = Path(args.output or f"{loaded.name}.bsm")
    cm.save(out, key=key)
    steps = cm.artifact.manifest.plan["steps"]
    table = Table(title=f"{loaded.name} -> {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    table.add_column("kernels")
    table.add_column("inputs")
    table.add_column("outputs")
    table.add_column("compile s")
    table.add_row(str(len(steps)), ", ".join(map(str, cm.artifact.manifest.inputs)),
                  str(len(cm.artifact.manifest.outputs)), f"{seconds:.1f}")
    err.print(table)
    err.print(_template_table(steps))
    err.print(f"checked: {cm.checked}" if cm.checked else
              "[yellow]not checked against torch (--no-check)[/]", highlight=False)
    if args.quant or args.precision != "f32":
        err.print(cm.report())
    return 0


def profile_table(cm: Any, arrays: list[np.ndarray], repeat: int) -> Table:
    """Every kernel's median time on `arrays`, slowest first, with its template and share."""
    steps = {step["kernel"]: step for step in cm.artifact.manifest.plan["steps"]}
    times = sorted(cm.executor.profile(*arrays, repeat=repeat), key=lambda kt: -kt[1])
    total = sum(t for _, t in times) or 1.0
    batch = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
    table = Table(title=f"kernels at batch {batch}: median of {repeat} runs")
    for col in ("kernel", "template", "us", "share"):
        table.add_column(col, justify="right" if col in ("us", "share") else "left")
    for kernel, seconds in times:
        table.add_row(kernel, steps[kernel].get("template", "?"), f"{seconds * 1e6:.1f}",
                      f"{seconds / total:.0%}")
    return table


def _template_table(steps: list[dict]) -> Table:
    """Kernels per template, with the configs they run (untuned: each template's default)."""
    table = Table(title="kernels by template")
    for col in ("template", "kernels", "configs"):
        table.add_column(col)
    by_template: dict[str, list[str]] = {}
    for step in steps:
        by_template.setdefault(step.get("template", "?"), []).append(step.get("config", ""))
    for template, configs in sorted(by_template.items()):
        table.add_row(template, str(len(configs)), "; ".join(sorted(set(configs))))
    return table


def cmd_run(args: argparse.Namespace) -> int:
    """Run an artifact on .npy inputs and write the outputs."""
    from ..runtime.model import load  # noqa: PLC0415 - keeps `bitsmith ir` free of TVM

    cm = load(args.artifact, key=read_key(args.key) if args.key else None)
    paths = ordered_inputs(args.input, [spec.name for spec in cm.artifact.manifest.inputs])
    try:
        arrays = [np.load(path) for path in paths]
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read an input: {exc}") from None
    outs = cm.executor.run(*arrays)
    target = Path(args.output)
    paths = [target] if len(outs) == 1 else [
        target.with_suffix(f".{i}{target.suffix or '.npy'}") for i in range(len(outs))]
    for path, array in zip(paths, outs, strict=True):
        np.save(path, array)
        err.print(f"wrote {path}: {array.dtype}{list(array.shape)}", highlight=False)
    return 0


def ordered_inputs(given: list[str], names: list[str]) -> list[str]:
    """--input values as paths in the model's input order: all positional, or all NAME=path
    (a path that holds '=' is positional unless it starts with an input's name)."""
    named = [g.split("=", 1) for g in given if g.split("=", 1)[0] in names and "=" in g]
    if not named:
        return given
    if len(named) != len(given):
        raise CliError("--input: name every input (NAME=X.npy) or none; inputs are "
                       f"{', '.join(names)}")
    by_name = dict(named)
    if len(by_name) != len(named) or set(by_name) != set(names):
        raise CliError(f"--input: expected each of {', '.join(names)} once, got "
                       f"{', '.join(n for n, _ in named)}")
    return [by_name[n] for n in names]


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of fn() in ms, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cmd_bench(args: argparse.Namespace) -> int:
    """Median latencies of bitsmith, torch eager (and torch.compile), side by side."""
    if args.generate:
        return bench_generate(args)
    import torch  # noqa: PLC0415 - only the commands that need torch import it

    from .. import compiler  # noqa: PLC0415 - imports torch; `run` must not

    loaded = _load(args.model, args.seq)
    cm = _compile(loaded, 2, True, None)
    compiled = torch.compile(loaded.module) if args.torch_compile else None
    table = Table(title=f"{loaded.name}: median of {args.repeat} runs")
    for col in ("batch", "bitsmith ms", "eager ms", "bitsmith/eager") + (
            ("torch.compile ms", "bitsmith/compile") if compiled else ()):
        table.add_column(col, justify="right")
    arrays: list[np.ndarray] = []  # the last batch's, for --profile (--batch takes 1 or more)
    for batch in args.batch:
        call_args, call_kwargs = loaded.call_args(batch)
        arrays = compiler.example_arrays(cm.artifact, call_args, call_kwargs)
        with torch.no_grad():
            ours = median_ms(partial(cm.executor.run, *arrays), args.repeat)
            eager = median_ms(partial(loaded.module, *call_args, **call_kwargs), args.repeat)
            row = [str(batch), f"{ours:.2f}", f"{eager:.2f}", f"{ours / eager:.2f}"]
            if compiled is not None:
                tc = median_ms(partial(compiled, *call_args, **call_kwargs), args.repeat)
                row += [f"{tc:.2f}", f"{ours / tc:.2f}"]
        table.add_row(*row)
    err.print(table)
    if args.profile:
        err.print(profile_table(cm, arrays, args.repeat))
    err.print(f"{len(cm.artifact.manifest.plan['steps'])} kernels, untuned (each template's "
              "default config)", highlight=False)
    return 0


def bench_generate(args: argparse.Namespace) -> int:
    """`bitsmith bench MODEL --generate`: an LLM's prefill and decode speed (medians of
    --repeat rounds, capped at 5)."""
    from ..llm.measure import decode_rate, prefill_seconds  # noqa: PLC0415

    max_seq = max(args.prompt_len) + args.gen_len + 64
    if args.model.endswith(".bsm"):
        from ..llm.artifact import load as load_llm  # noqa: PLC0415 - the runtime alone

        llm = load_llm(args.model)
    else:
        from ..llm import compile as compile_llm  # noqa: PLC0415 - the compiler, torch

        llm = compile_llm(args.model, quant=args.quant, kv=args.kv, act=args.act,
                          max_batch=max(args.batch),
                          max_seq=max_seq, prefill=(128,), score_chunk=0,
                          progress=err.is_terminal)
    rounds = max(1, min(args.repeat, 5))
    table = Table(title=f"{llm.name} ({llm.info.get('quant')}, act {llm.info.get('act', 'f32')}"
                        f", KV {llm.info.get('kv')}): "
                        f"medians of {rounds} rounds")
    for col in ("what", "tokens/s", "ms"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for n in args.prompt_len:
        ids = [(11 + 7 * i) % llm.vocab_size for i in range(n)]
        seconds = statistics.median(prefill_seconds(llm, ids) for _ in range(rounds))
        table.add_row(f"prefill {n} tokens (time to first token)", f"{n / seconds:.0f}",
                      f"{seconds * 1e3:.1f}")
    for batch in args.batch:
        rate = statistics.median(decode_rate(llm, batch, args.gen_len) for _ in range(rounds))
        table.add_row(f"decode, batch {batch}", f"{rate:.1f}", f"{batch / rate * 1e3:.2f}")
    err.print(table)
    return 0
