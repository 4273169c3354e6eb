"""The driver: torch model -> graph IR -> passes -> tuned configs -> backend -> CompiledModel.

The frontend imports the model, the passes fuse (and quantize) it, the autotuner's policy picks
each kernel's config, and the target's backend (`codegen/tvm/build.py` for "cpu",
`codegen/triton/build.py` for "cuda") builds the artifact.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import selfcheck
from .autotune.cache import LibraryCache
from .autotune.candidates import Runner
from .autotune.policy import keep_in_model_winners, tuned_configs
from .codegen.backend import Backend
from .codegen.template import Config
from .codegen.triton.build import TritonBackend
from .codegen.tvm.build import TvmBackend
from .errors import CodegenError, InputError
from .frontend import from_torch
from .ir import Module
from .passes import default_pipeline, run
from .passes.quant_spec import quant_pipeline_entry
from .runtime.artifact import Artifact
from .runtime.model import CompiledModel

TARGETS = ("cpu", "cuda")


def backend(target: str = "cpu") -> Backend:
    """The backend that builds artifacts for `target` ("cpu": TVM, "cuda": Triton)."""
    if target == "cpu":
        return TvmBackend(LibraryCache())
    if target == "cuda":
        return TritonBackend()
    raise CodegenError(f"target {target!r} is not supported yet; valid: {', '.join(TARGETS)}")


def build_artifact(module: Module, *, target: str = "cpu", progress: bool = False,
                   configs: Mapping[str, Config] | None = None) -> Artifact:
    """Build every kernel of a fused module for `target`; the artifact in memory."""
    return backend(target).build(module, configs, progress=progress)


def compile(model: Any, example_inputs: Sequence[Any], *, target: str = "cpu",
            pipeline: str | None = None, dynamic_batch: bool = False, name: str | None = None,
            example_kwargs: Mapping[str, Any] | None = None, tune: int | str | None = None,
            quant: str | None = None, calib: Iterable[Any] | None = None,
            progress: bool = False, check: bool = True,
            dynamic_dims: Mapping[str, Mapping[int, Any]] | None = None,
            precision: str = "f32", runner: Runner | None = None) -> CompiledModel:
    """Compile a torch model for `target`; returns a callable, savable CompiledModel.

    `tune` (trials, or a time like "10m") tunes every kernel that this device's cache does not
    hold yet; without it, cached tuned configs are still used and the rest run their template's
    default config. `runner` measures the candidates (e.g. `autotune.RayRunner("auto")`: builds
    and timings spread over a Ray cluster); a local worker pool by default.

    `quant` quantizes the weights of linear layers and convs (a spec such as "w4g128",
    "w3g128:gptq", "f6e3m2g64"; see `passes.quant_spec`); `calib` is an iterable of input
    tuples (or single inputs) that calibrates it, in the model's positional input order.
    `cm.report()` then lists every layer's format and error.

    `dynamic_dims` makes more dims symbolic than `dynamic_batch`'s dim 0: {input name: {axis:
    torch.export.Dim}}, e.g. a sequence dim S (`frontend.LoadedModel.dynamic_dims()`).

    `precision="bf16"` computes linear layers, matmuls against weights and NHWC convolutions
    of static shape in bf16 with f32 accumulation, on the AMX tile unit; `precision="int8"`
    computes them in int8 (each row of activations quantized on its own scale as the model
    runs, weights per output channel at compile time; int32 sums) on AMX-INT8. A CPU without
    the tile unit keeps f32 and says so in one warning. The check then holds the model to the
    precision's tolerance (`selfcheck.PRECISION_TOLERANCES`), and `cm.report()` lists the
    kernels marked and the measured error against torch's f32.

    `check` (on by default) runs the built model on the example inputs and compares it with
    torch (a quantized model: with the interpreter of its quantized graph) before returning;
    a mismatch is a MismatchError naming the first kernel, or the first imported op, that
    diverges (`selfcheck`).
    """
    builder = backend(target)
    device = builder.target()  # a missing GPU or Triton is an error before the import
    module = from_torch(model, tuple(example_inputs), dict(example_kwargs or {}),
                        dynamic_batch=dynamic_batch, dynamic_dims=dynamic_dims,
                        name=name or type(model).__name__.lower())
    pipeline = pipeline or default_pipeline(target)
    if quant is not None:
        pipeline = f"canonicalize,cse,{quant_pipeline_entry(quant)},{pipeline}"
    if calib is not None:
        module.calibration = calibration_batches(module, calib)
    run(module, pipeline, verify=False)
    lowered = _lower_precision(module, precision, target, device)
    smoothed = _calibrate_int8(module, example_inputs, example_kwargs or {}) \
        if precision == "int8" and lowered else []
    batch = _example_batch(example_inputs)
    configs, measured = tuned_configs(module, tune, batch, progress,
                                      target=device if target == "cuda" else None,
                                      runner=runner)
    artifact = builder.build(module, configs, progress=progress)
    if measured and target == "cpu":  # winners of isolated timing must also win in the model
        arrays = example_arrays(artifact, example_inputs, example_kwargs or {})
        artifact = keep_in_model_winners(module, artifact, configs, arrays, batch,
                                         backend=builder)
    cm = CompiledModel(artifact)
    if check:
        kwargs = dict(example_kwargs or {})
        arrays = example_arrays(artifact, example_inputs, kwargs)
        cm.checked = selfcheck.check(cm, module, arrays, model=model, args=example_inputs,
                                     kwargs=kwargs, quantized=quant is not None,
                                     dynamic_batch=dynamic_batch, dynamic_dims=dynamic_dims,
                                     precision=precision if lowered else "f32")
    if lowered:  # the report states what the precision cost on the example inputs
        kwargs = dict(example_kwargs or {})
        error = selfcheck.largest_error(cm, example_arrays(artifact, example_inputs, kwargs),
                                        model=model, args=example_inputs, kwargs=kwargs)
        cm.artifact.manifest.metadata["precision"] = {"mode": precision, "kernels": lowered,
                                                      "error": error, "smoothed": smoothed}
    return cm


def _lower_precision(module: Module, precision: str, target: str, device: Any) -> list[str]:
    """Mark the kernels that run below f32 for `precision`; their names."""
    from .codegen.tvm.templates_amx import PRECISIONS, mark_precision  # noqa: PLC0415

    if precision not in PRECISIONS:
        raise InputError(f"precision expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "f32":
        return []
    if target != "cpu":
        raise InputError(f"precision={precision!r} runs on the CPU's AMX tiles; the "
                         f"{target} backend computes in the model's own types: drop precision")
    from .ir.dialects.kernel import FusedOp  # noqa: PLC0415

    marked, note = mark_precision([op for op in module.ops if isinstance(op, FusedOp)], device,
                                  precision)
    if note:
        warnings.warn(note, stacklevel=3)
    return marked


def _calibrate_int8(module: Module, args: Sequence[Any], kwargs: Mapping[str, Any]
                    ) -> list[str]:
    """SmoothQuant for the int8 linear layers, on the calibration batches (`calib=`) or else
    the example inputs; the kernels calibrated."""
    from .codegen.tvm.templates_amx import calibrate_smoothing  # noqa: PLC0415

    batches = module.calibration
    if not batches:
        named = {**dict(zip(module.input_names, args, strict=False)), **kwargs}
        batches = [tuple(selfcheck.as_numpy(named[n]) if hasattr(named[n], "detach")
                         else np.asarray(named[n]) for n in module.input_names)]
    return calibrate_smoothing(module, batches)


def example_arrays(artifact: Artifact, args: Sequence[Any],
                    kwargs: Mapping[str, Any]) -> list[np.ndarray]:
    """Positional and keyword inputs as numpy arrays, in the artifact's input order."""
    names = [spec.name for spec in artifact.manifest.inputs]
    # names holds the keyword inputs too: args is shorter when some come by keyword
    named = {**dict(zip(names, args, strict=False)), **kwargs}
    return [selfcheck.as_numpy(named[n]) if hasattr(named[n], "detach") else np.asarray(named[n])
            for n in names]


def fused_module(loaded: Any, batch: int, target: str = "cpu") -> Module:
    """A loaded model (`frontend.load_model`) imported and run through the target's pipeline."""
    args, kwargs = loaded.call_args(batch)
    module = from_torch(loaded.module, tuple(args), dict(kwargs), dynamic_batch=True,
                        name=loaded.name)
    run(module, default_pipeline(target), verify=False)
    return module


def calibration_batches(module: Module, calib: Iterable[Any]) -> list[tuple[np.ndarray, ...]]:
    """Calibration inputs as numpy tuples the module accepts: with a static batch, all the
    samples are concatenated and cut into batches of the module's size (a short rest is
    dropped)."""
    items = [tuple(item) if isinstance(item, (tuple, list)) else (item,) for item in calib]
    arity = len(module.inputs)
    for i, item in enumerate(items):
        if len(item) != arity:
            raise InputError(f"calibration item {i} has {len(item)} input(s); the model takes "
                             f"{arity} ({', '.join(module.input_names)})")
    arrays = [tuple(selfcheck.as_numpy(x) if hasattr(x, "detach") else np.asarray(x)
                    for x in item) for item in items]
    if not arrays:
        raise InputError("calib is empty: give at least one batch of example inputs")
    dim0 = module.inputs[0].type.shape[0] if module.inputs[0].type.rank else None
    if not isinstance(dim0, int):
        return arrays
    columns = [np.concatenate([a[j] for a in arrays]) for j in range(arity)]
    count = len(columns[0]) // dim0
    if count == 0:
        raise InputError(f"calibration holds {len(columns[0])} sample(s); the model was "
                         f"compiled for batches of {dim0}: give at least {dim0}")
    return [tuple(c[i * dim0:(i + 1) * dim0] for c in columns) for i in range(count)]


def _example_batch(example_inputs: Sequence[Any]) -> int:
    shapes = [getattr(x, "shape", ()) for x in example_inputs]
    return next((int(s[0]) for s in shapes if len(s) > 0), 1)
