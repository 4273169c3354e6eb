"""bitsmith against the engines users deploy with, at the sizes they deploy, on this machine.

    python bench/vs_engines.py [--models bert-base resnet-50 minilm zoo] [--batch 1 8]
                               [--rounds 5] [--reps 5] [--threads 2] [--json FILE]
                               [--tune 10m] [--quant w4g128] [--skip ENGINE ...]
    python bench/vs_engines.py --roofline [--threads 2] [--rounds 5]

Every engine runs with the same thread count: bitsmith (untuned: the templates' default
configs), torch eager, torch.compile, ONNX Runtime, OpenVINO with f32 inference and OpenVINO's
default precision (bf16 on a CPU with AMX), and bitsmith with precision="bf16" and "int8"
(AMX); with `--quant SPEC`, bitsmith with weights quantized to SPEC, its activations f32 and,
with precision="int8", int8 blocks (W4A8 on AVX-512 VNNI). Each engine's output is checked
against torch eager before it is timed: f32 engines within 1e-3 of the output's range, a
reduced-precision engine by cosine similarity (>= 0.99; quantized weights >= 0.95; reported).
An engine that fails to load, convert or match is reported as such, never timed. Timing: `--rounds`
rounds; in each, every engine (in a rotated order) runs `--reps` calls after one warm-up and
its round median is kept; the table has the median over rounds and bitsmith's ratio to the
fastest f32 rival.

Models: BERT-base (12 layers, hidden 768, sequence 128; random weights from its config),
ResNet-50 (224 px; random weights), MiniLM-L6 (real weights, sequence 128), and the zoo.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch


@dataclass
class Case:
    """One model at one batch size: a module returning one tensor, and its inputs."""

    name: str
    batch: int
    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]


@dataclass
class Engine:
    name: str
    run: Callable[[], np.ndarray] | None = None
    error: str | None = None
    precision: str = "f32"
    agreement: str = ""
    times: list[float] = field(default_factory=list)


class FirstTensor(torch.nn.Module):
    """A model whose output is a ModelOutput or tuple, as a module returning its first tensor;
    with `names`, its positional inputs are passed to the model by those keywords."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = (self.model(**dict(zip(self.names, args, strict=True))) if self.names
               else self.model(*args))
        if isinstance(out, torch.Tensor):
            return out
        first = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
        return first


def cases(names: list[str], batches: list[int]) -> list[Case]:
    import transformers

    from bitsmith import models
    from bitsmith.frontend import load_model

    out: list[Case] = []
    for name in names:
        torch.manual_seed(0)
        if name == "bert-base":
            model = transformers.BertModel(transformers.BertConfig()).eval()
            for b in batches:
                ids = torch.randint(1000, 20000, (b, 128), generator=torch.Generator()
                                    .manual_seed(b))
                out.append(Case(name, b, FirstTensor(model), (ids, torch.ones_like(ids)),
                                ("input_ids", "attention_mask")))
        elif name == "resnet-50":  # ResNetConfig's defaults are ResNet-50's
            model = transformers.ResNetForImageClassification(
                transformers.ResNetConfig()).eval()
            for b in batches:
                x = torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b))
                out.append(Case(name, b, FirstTensor(model), (x,), ("pixel_values",)))
        elif name == "minilm":
            loaded = load_model("minilm", seq=128)
            for b in batches:
                args, kwargs = loaded.call_args(b)
                keys = tuple(loaded.input_names)
                values = tuple(args) + tuple(kwargs[n] for n in keys[len(args):])
                out.append(Case(name, b, FirstTensor(loaded.module.eval(), keys), values,
                                keys))
        elif name == "zoo":
            for zoo in models.names():
                loaded = load_model(zoo)
                for b in batches:
                    args, kwargs = loaded.call_args(b)
                    if kwargs:
                        continue
                    out.append(Case(f"zoo:{zoo}", b, FirstTensor(loaded.module.eval()),
                                    tuple(args), tuple(f"in{i}" for i in range(len(args)))))
        else:
            raise SystemExit(f"unknown model {name!r}: expected bert-base, resnet-50, minilm "
                             f"or zoo")
    return out


def _agreement(got: np.ndarray, want: np.ndarray, precision: str) -> tuple[bool, str]:
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    if got.shape != want.shape:
        return False, f"shape {got.shape} vs torch {want.shape}"
    if not np.isfinite(got).all():
        return False, "non-finite output"
    rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
    cos = float(got @ want / max(float(np.linalg.norm(got) * np.linalg.norm(want)), 1e-30))
    # quantized weights (4-bit on this random-init model) move the output more than bf16/int8
    ok = rel <= 1e-3 if precision == "f32" else cos >= (0.95 if precision == "quant" else 0.99)
    return ok, f"rel {rel:.1e}, cos {cos:.5f}"


def _bitsmith(case: Case, precision: str = "f32", tune: str | None = None,
              quant: str | None = None) -> Callable[[], np.ndarray]:
    import bitsmith
    from bitsmith.compiler import example_arrays

    cm = bitsmith.compile(case.module, case.inputs, name=case.name.replace(":", "_"),
                          precision=precision, tune=tune, quant=quant)
    arrays = example_arrays(cm.artifact, case.inputs, {})
    return lambda: cm.executor.run(*arrays)[0]


def _torch(case: Case, compiled: bool) -> Callable[[], np.ndarray]:
    fn = torch.compile(case.module) if compiled else case.module

    def run() -> np.ndarray:
        with torch.no_grad():
            return fn(*case.inputs).numpy()
    return run


def _onnx(case: Case, tmp: Path) -> Path:
    """The case exported to ONNX once (TorchScript exporter, opset 17), shared by ORT and
    OpenVINO."""
    path = tmp / f"{case.name.replace(':', '_')}_b{case.batch}.onnx"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(case.module, case.inputs, str(path),
                              input_names=list(case.input_names), output_names=["out"],
                              dynamo=False, opset_version=17)
    return path


def _feeds(case: Case) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in zip(case.input_names, case.inputs, strict=True)}


def _ort(case: Case, threads: int, tmp: Path) -> Callable[[], np.ndarray]:
    import onnxruntime as rt

    options = rt.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = rt.InferenceSession(str(_onnx(case, tmp)), options,
                                  providers=["CPUExecutionProvider"])
    feeds = _feeds(case)
    return lambda: np.asarray(session.run(None, feeds)[0])


def _openvino(case: Case, threads: int, tmp: Path,
              precision: str | None) -> Callable[[], np.ndarray]:
    import openvino as ov

    config: dict[str, object] = {"INFERENCE_NUM_THREADS": threads,
                                 "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    model = ov.Core().compile_model(str(_onnx(case, tmp)), "CPU", config)
    request = model.create_infer_request()
    feeds = _feeds(case)
    return lambda: np.asarray(request.infer(feeds)[model.output(0)])


def engines(case: Case, threads: int, tmp: Path, skip: set[str],
            tune: str | None = None, quant: str | None = None) -> list[Engine]:
    """Every engine loaded for `case`, each checked against torch eager; with `tune`, bitsmith
    tuned with that budget too (after the untuned build, in the run's own cache); with
    `quant`, bitsmith with quantized weights (f32 and int8 activations)."""
    with torch.no_grad():
        want = case.module(*case.inputs).numpy()
    makers: list[tuple[str, Callable[[], Callable[[], np.ndarray]], str]] = [
        ("bitsmith", lambda: _bitsmith(case), "f32"),
        ("bitsmith bf16", lambda: _bitsmith(case, "bf16"), "bf16"),
        ("bitsmith int8", lambda: _bitsmith(case, "int8"), "int8"),
        *([("bitsmith tuned", lambda: _bitsmith(case, tune=tune), "f32")] if tune else []),
        *([(f"bitsmith {quant}", lambda: _bitsmith(case, quant=quant), "quant"),
           (f"bitsmith {quant} int8", lambda: _bitsmith(case, "int8", quant=quant), "quant")]
          if quant else []),
        ("torch eager", lambda: _torch(case, False), "f32"),
        ("torch.compile", lambda: _torch(case, True), "f32"),
        ("ONNX Runtime", lambda: _ort(case, threads, tmp), "f32"),
        ("OpenVINO f32", lambda: _openvino(case, threads, tmp, "f32"), "f32"),
        ("OpenVINO default", lambda: _openvino(case, threads, tmp, None), "default")]
    found: list[Engine] = []
    for name, make, precision in makers:
        if name in skip:
            continue
        engine = Engine(name, precision=precision)
        try:
            run = make()
            ok, engine.agreement = _agreement(run(), want, precision)
            if ok:
                engine.run = run
            else:
                engine.error = f"output differs from torch: {engine.agreement}"
        except Exception as exc:  # a rival that fails is reported, not fatal
            lines = str(exc).strip().splitlines() or [""]
            engine.error = f"{type(exc).__name__}: {lines[-1][:160]}"
        found.append(engine)
    return found


def timed(engines_: list[Engine], rounds: int, reps: int) -> None:
    live = [e for e in engines_ if e.run is not None]
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for engine in order:
            assert engine.run is not None
            # the previous engine's thread pool spins for a while after its last call (ONNX
            # Runtime's, OpenMP's): let it go idle, or this engine's threads lose the cores
            time.sleep(0.2)
            engine.run()
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                engine.run()
                samples.append(time.perf_counter() - t0)
            engine.times.append(statistics.median(samples))


PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <omp.h>
int main(void) {
  long iters = 100000000;
  double best = 0;
  for (int rep = 0; rep < 5; rep++) {
    double t0 = omp_get_wtime();
    float total = 0;
    #pragma omp parallel reduction(+:total)
    {
      __m512 a[12];
      for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps(i * 0.001f);
      __m512 b = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-6f);
      for (long i = 0; i < iters / 12; i++) {
        #pragma GCC unroll 12
        for (int j = 0; j < 12; j++) a[j] = _mm512_fmadd_ps(a[j], b, c);
      }
      for (int i = 0; i < 12; i++) total += _mm512_reduce_add_ps(a[i]);
    }
    double t = omp_get_wtime() - t0;
    double gf = (double)(iters / 12) * 12 * 16 * 2 * omp_get_max_threads() / t / 1e9;
    if (gf > best) best = gf;
    if (total == 12345.0f) printf("-");
  }
  printf("%.1f\n", best);
  return 0;
}
"""


def fma_peak(threads: int, tmp: Path) -> float | None:
    """The AVX-512 FMA peak (GFLOP/s) on `threads` threads: 12 independent FMA chains per
    thread, best of 5 (gcc, as the README's system dependency)."""
    import subprocess

    src, exe = tmp / "peak.c", tmp / "peak"
    src.write_text(PEAK_C)
    made = subprocess.run(["gcc", "-O2", "-mavx512f", "-mfma", "-fopenmp", str(src), "-o",
                           str(exe)], capture_output=True, text=True)
    if made.returncode:
        return None
    ran = subprocess.run([str(exe)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return float(ran.stdout.strip().splitlines()[-1]) if ran.returncode == 0 else None


def _dense_kernel(m: int, k: int, n: int, precision: str) -> tuple[Callable[[], None],
                                                                    Callable[[], np.ndarray],
                                                                    np.ndarray]:
    """bitsmith's kernel for x[m, k] @ W[n, k]^T (its template's default config), timed as a
    kernel; (call, output, reference from torch)."""
    import bitsmith
    from bitsmith.compiler import example_arrays

    torch.manual_seed(0)
    layer = torch.nn.Linear(k, n, bias=False).eval()
    x = torch.randn(m, k)
    cm = bitsmith.compile(layer, (x,), precision=precision, check=False)
    arrays = example_arrays(cm.artifact, (x,), {})
    executor = cm.executor
    bound = executor.bind(*arrays)
    for view, array in zip(bound.inputs, arrays, strict=True):
        if view is not None:
            np.copyto(view, array)
    (kernel, args), = bound.calls
    with torch.no_grad():
        want = layer(x).numpy()
    return lambda: kernel(*args), lambda: bound.outputs[0].copy(), want


def roofline(threads: int, rounds: int) -> None:
    """GFLOP/s of bitsmith's GEMM kernels (f32 dense, bf16 and int8 AMX) against torch's own
    GEMM and the FMA peak, each output checked against torch first; medians of interleaved
    rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = fma_peak(threads, Path(tmp))
    print(f"\nGEMM roofline, {threads} threads: AVX-512 FMA peak "
          f"{peak if peak else float('nan'):.0f} GFLOP/s (12 FMA chains per thread)\n")
    print("| M x K x N | bitsmith f32 GFLOP/s | torch f32 | bitsmith f32 % of peak | "
          "bitsmith bf16 (AMX) | torch bf16 | bitsmith int8 (AMX) GOP/s |")
    print("|---|---|---|---|---|---|---|")
    for m, k, n in ((128, 768, 768), (128, 768, 3072), (128, 3072, 768), (1024, 1024, 1024),
                    (2048, 2048, 2048), (4096, 4096, 4096)):
        flops = 2.0 * m * k * n
        a, b = torch.randn(m, k), torch.randn(k, n)
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        ours, ours_out, want = _dense_kernel(m, k, n, "f32")
        low, low_out, want_low = _dense_kernel(m, k, n, "bf16")
        q8, q8_out, _ = _dense_kernel(m, k, n, "int8")
        ours()
        low()
        q8()
        scale = float(np.abs(want).max())
        assert np.abs(ours_out() - want).max() <= 1e-3 * scale, "f32 kernel output"
        assert np.abs(low_out() - want_low).max() <= 3e-2 * scale, "bf16 kernel output"
        assert np.abs(q8_out() - want_low).max() <= 4e-2 * scale, "int8 kernel output"
        calls = {"ours": ours, "low": low, "q8": q8, "torch": partial(torch.matmul, a, b),
                 "torch16": partial(torch.matmul, a16, b16)}
        times: dict[str, list[float]] = {key: [] for key in calls}
        reps = max(2, int(2e10 / flops))
        for _ in range(rounds):
            for key, call in calls.items():
                time.sleep(0.1)
                call()
                samples = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    call()
                    samples.append(time.perf_counter() - t0)
                times[key].append(statistics.median(samples))
        rate = {key: flops / statistics.median(v) / 1e9 for key, v in times.items()}
        share = f"{100 * rate['ours'] / peak:.0f}%" if peak else "-"
        print(f"| {m} x {k} x {n} | {rate['ours']:.0f} | {rate['torch']:.0f} | {share} | "
              f"{rate['low']:.0f} | {rate['torch16']:.0f} | {rate['q8']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", nargs="*",
                        default=["bert-base", "resnet-50", "minilm", "zoo"])
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="engines to leave out")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tune", metavar="BUDGET",
                        help="add bitsmith tuned with this budget per model (e.g. 10m)")
    parser.add_argument("--quant", metavar="SPEC",
                        help="add bitsmith with weights quantized to SPEC (e.g. w4g128), with "
                             "f32 and with int8 activations")
    parser.add_argument("--roofline", action="store_true",
                        help="only the GEMM table: kernels against torch and the FMA peak")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    # a cache of the run's own: "untuned" uses no config this machine tuned before
    cache = tempfile.TemporaryDirectory(prefix="bitsmith-vs-cache-")
    os.environ["BITSMITH_CACHE_DIR"] = cache.name
    if args.roofline:
        roofline(args.threads, args.rounds)
        return
    rows = []
    names = ["bitsmith", "bitsmith bf16", "bitsmith int8",
             *(["bitsmith tuned"] if args.tune else []),
             *([f"bitsmith {args.quant}", f"bitsmith {args.quant} int8"] if args.quant else []),
             "torch eager", "torch.compile", "ONNX Runtime", "OpenVINO f32", "OpenVINO default"]
    print(f"torch {torch.__version__}; {args.threads} threads each; median over {args.rounds} "
          f"interleaved rounds of the median of {args.reps} calls\n", flush=True)
    print("| model | batch | " + " | ".join(f"{n} ms" for n in names)
          + " | bitsmith / fastest f32 rival | bitsmith bf16 / OpenVINO default |"
          + " bitsmith bf16 / bitsmith int8 |"
          + (" bitsmith tuned / fastest f32 rival |" if args.tune else "")
          + (f" bitsmith {args.quant} / bitsmith {args.quant} int8 |" if args.quant else ""))
    print("|---|---|" + "---|" * (len(names) + 3 + bool(args.tune) + bool(args.quant)),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bitsmith-vs-") as tmp:
        for case in cases(args.models, args.batch):
            try:
                found = engines(case, args.threads, Path(tmp), set(args.skip), args.tune,
                                args.quant)
            except Exception as exc:  # torch itself failed on the case: say so, go on
                print(f"| {case.name} | {case.batch} | torch failed: {type(exc).__name__}: "
                      f"{str(exc)[:120]} |", flush=True)
                continue
            timed(found, args.rounds, args.reps)
            by_name = {e.name: e for e in found}
            cells = []
            for n in names:
                e = by_name.get(n)
                if e is None:
                    cells.append("-")
                elif e.error:
                    cells.append("failed")
                    print(f"<!-- {case.name} b{case.batch} {n}: {e.error} -->", file=sys.stderr)
                else:
                    ms = statistics.median(e.times) * 1e3
                    cells.append(f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}")
            ours = by_name.get("bitsmith")
            rivals = [statistics.median(e.times) for e in found
                      if not e.name.startswith("bitsmith") and e.precision == "f32"
                      and e.times]
            ratio = (f"{statistics.median(ours.times) / min(rivals):.2f}"
                     if ours and ours.times and rivals else "-")
            low, theirs = by_name.get("bitsmith bf16"), by_name.get("OpenVINO default")
            low_ratio = (f"{statistics.median(low.times) / statistics.median(theirs.times):.2f}"
                         if low and low.times and theirs and theirs.times else "-")
            int8 = by_name.get("bitsmith int8")
            int8_ratio = (f"{statistics.median(low.times) / statistics.median(int8.times):.2f}"
                          if low and low.times and int8 and int8.times else "-")
            tuned = by_name.get("bitsmith tuned")
            tuned_ratio = ([f"{statistics.median(tuned.times) / min(rivals):.2f}"
                            if tuned and tuned.times and rivals else "-"] if args.tune else [])
            wq, wq8 = (by_name.get(f"bitsmith {args.quant}{s}") for s in ("", " int8"))
            quant_ratio = ([f"{statistics.median(wq.times) / statistics.median(wq8.times):.2f}"
                            if wq and wq.times and wq8 and wq8.times else "-"]
                           if args.quant else [])
            print(f"| {case.name} | {case.batch} | " + " | ".join(cells)
                  + f" | {ratio} | {low_ratio} | {int8_ratio} |"
                  + "".join(f" {c} |" for c in tuned_ratio + quant_ratio),
                  flush=True)
            rows.append({"model": case.name, "batch": case.batch, "engines": {
                e.name: {"ms": statistics.median(e.times) * 1e3 if e.times else None,
                         "error": e.error, "agreement": e.agreement,
                         "precision": e.precision} for e in found}})
    for row in rows:
        notes = "; ".join(f"{n}: {v['agreement']}" for n, v in row["engines"].items()
                          if v["precision"] != "f32" and v["agreement"])
        if notes:
            print(f"\n{row['model']} b{row['batch']} reduced precision vs torch f32: {notes}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
