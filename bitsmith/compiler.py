"""The driver: torch model -> graph IR -> passes -> kernels -> artifact -> CompiledModel.

Every `kernel.fused` op is built by the first CPU template that matches it (with its default
config, untuned) and all kernels are compiled into one shared library; weights a template wants
pre-packed are packed here, once, and stored packed. The execution plan records the
kernel calls in order, with every value's (symbolic) shape and dtype.
"""
from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from rich.progress import Progress

from . import __version__
from .autotune.cache import LibraryCache
from .autotune.database import TuningDatabase, default_database_path
from .autotune.tuner import Budget, Tuner, timing_regime
from .codegen.template import CodegenError, Config, Target
from .codegen.tvm.lower import compile_funcs, library_key
from .codegen.tvm.target import host_target, tvm_target
from .codegen.tvm.templates import TvmKernel, build_kernel
from .errors import InputError
from .frontend import from_torch
from .ir import Module, Operation, Value
from .ir.types import QuantType, format_dim
from .passes import default_pipeline, run
from .passes.quant_spec import quant_pipeline_entry
from .runtime.artifact import NUMPY_DTYPES, Artifact, Manifest, TensorSpec
from .runtime.executor import Executor, value_spec
from .runtime.host import host_description
from .runtime.model import CompiledModel

LIBRARY = "kernels.so"
TARGETS = ("cpu", "cuda")


def compile(model: Any, example_inputs: Sequence[Any], *, target: str = "cpu",
            pipeline: str | None = None, dynamic_batch: bool = False, name: str | None = None,
            example_kwargs: Mapping[str, Any] | None = None, tune: int | str | None = None,
            quant: str | None = None, calib: Iterable[Any] | None = None,
            progress: bool = False) -> CompiledModel:
    """Compile a torch model for `target`; returns a callable, savable CompiledModel.

    `tune` (trials, or a time like "10m") tunes every kernel that this device's cache does not
    hold yet; without it, cached tuned configs are still used and the rest run their template's
    default config.

    `quant` quantizes the weights of linear layers and convs (a spec such as "w4g128",
    "w3g128:gptq", "f6e3m2g64"; see `passes.quant_spec`); `calib` is an iterable of input
    tuples (or single inputs) that calibrates it, in the model's positional input order.
    `cm.report()` then lists every layer's format and error.
    """
    if target not in TARGETS:
        raise CodegenError(f"target {target!r} is not supported yet; valid: {', '.join(TARGETS)}")
    module = from_torch(model, tuple(example_inputs), dict(example_kwargs or {}),
                        dynamic_batch=dynamic_batch, name=name or type(model).__name__.lower())
    pipeline = pipeline or default_pipeline(target)
    if quant is not None:
        pipeline = f"canonicalize,cse,{quant_pipeline_entry(quant)},{pipeline}"
    if calib is not None:
        module.calibration = calibration_batches(module, calib)
    run(module, pipeline, verify=False)
    batch = _example_batch(example_inputs)
    if target == "cuda":
        gpu = triton_target()
        configs, _ = tuned_configs(module, tune, batch, progress, target=gpu)
        return CompiledModel(build_triton_artifact(module, progress=progress, configs=configs,
                                                   target=gpu))
    configs, measured = tuned_configs(module, tune, batch, progress)
    artifact = build_artifact(module, progress=progress, configs=configs)
    if measured:  # winners of isolated timing must also win in the model
        arrays = example_arrays(artifact, example_inputs, example_kwargs or {})
        artifact = keep_in_model_winners(module, artifact, configs, arrays, batch)
    return CompiledModel(artifact)


IN_MODEL_ROUNDS = 3
"""Alternating profiles of the tuned and the default build that the in-model verdict takes."""


def profile_kernels(artifact: Artifact, arrays: Sequence[np.ndarray]) -> dict[str, float]:
    """Median seconds of every kernel of an artifact run on `arrays`."""
    return dict(Executor(artifact).profile(*arrays, repeat=30))


def keep_in_model_winners(module: Module, artifact: Artifact, configs: Mapping[str, Config],
                          arrays: Sequence[np.ndarray], batch: int,
                          profile: Callable[[Artifact, Sequence[np.ndarray]],
                                            Mapping[str, float]] = profile_kernels,
                          ) -> Artifact:
    """Time every kernel in the model with its tuned and its default config, alternating
    (`IN_MODEL_ROUNDS` profiles of each, per-kernel median). Identical kernels share one tuned
    config (one task), so the verdict is per task: a tuned config whose kernels together are
    not faster than with the default gives way to it, and the cache records that so that
    later compiles do too. The default is the burden-free choice: it is what the untuned model
    runs. Returns the artifact to ship."""
    default = build_artifact(module)
    defaults = {s["kernel"]: s["config"] for s in default.manifest.plan["steps"]}
    changed = {name: c for name, c in configs.items() if str(c) != defaults.get(name)}
    if not changed:
        return artifact
    rounds = [(profile(artifact, arrays), profile(default, arrays))
              for _ in range(IN_MODEL_ROUNDS)]
    tuned_times = {n: statistics.median(t[n] for t, _ in rounds) for n in changed}
    default_times = {n: statistics.median(d[n] for _, d in rounds) for n in changed}
    losers: set[str] = set()
    with TuningDatabase(default_database_path()) as database:
        tuner = model_tuner(module, batch, database)
        for task in tuner.tasks([op for op in module.ops if op.name == "kernel.fused"
                                 and op.kernel_name in changed]):
            names = [op.kernel_name for op in task.kernels]
            tuned = sum(tuned_times[n] for n in names)
            plain = sum(default_times[n] for n in names)
            if tuned >= plain:
                losers.update(names)
                tuner.keep_default(task.kernels, f"in model {module.name}: tuned "
                                                 f"{tuned * 1e6:.1f} us, default "
                                                 f"{plain * 1e6:.1f} us over {len(names)} "
                                                 "kernel(s)")
    if not losers:
        return artifact
    return build_artifact(module, configs={k: v for k, v in configs.items()
                                           if k not in losers})


def example_arrays(artifact: Artifact, args: Sequence[Any],
                    kwargs: Mapping[str, Any]) -> list[np.ndarray]:
    """Positional and keyword inputs as numpy arrays, in the artifact's input order."""
    names = [spec.name for spec in artifact.manifest.inputs]
    named = {**dict(zip(names, args, strict=True)), **kwargs}
    return [np.asarray(named[n].detach().cpu().numpy() if hasattr(named[n], "detach")
                       else named[n]) for n in names]


def fused_module(loaded: Any, batch: int, target: str = "cpu") -> Module:
    """A loaded model (`frontend.load_model`) imported and run through the target's pipeline."""
    args, kwargs = loaded.call_args(batch)
    module = from_torch(loaded.module, tuple(args), dict(kwargs), dynamic_batch=True,
                        name=loaded.name)
    run(module, default_pipeline(target), verify=False)
    return module


def model_tuner(module: Module, batch: int, database: TuningDatabase,
                progress: bool = False, target: Target | None = None) -> Tuner:
    """A tuner for this model's kernels at `batch` on `target` (this CPU unless given). On the
    CPU it times them hot or cold as the whole model (weights and activations) fits in the
    last-level cache or not; on a GPU, hot (its L2 holds what a kernel just wrote)."""
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    tuner = Tuner(target=target, database=database, bindings={"B": batch}, progress=progress)
    tuner.timing = ("hot" if tuner.target.kind == "cuda"
                    else timing_regime(kernels, tuner.bindings, tuner.fingerprint))
    return tuner


def tuned_configs(module: Module, tune: int | str | None, batch: int,
                  progress: bool = False, target: Target | None = None,
                  ) -> tuple[dict[str, Config], bool]:
    """The tuned config of each kernel (by name) that has one, tuned now or from the cache,
    and whether anything was measured now."""
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    with TuningDatabase(default_database_path()) as database:
        tuner = model_tuner(module, batch, database, progress=progress, target=target)
        try:
            if tune is None:
                return tuner.cached_configs(kernels), False
            before = database.count()
            configs = tuner.tune(kernels, Budget.parse(tune))
            return configs, database.count() > before
        finally:
            tuner.close()


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
    arrays = [tuple(np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
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


def build_artifact(module: Module, *, progress: bool = False,
                   configs: Mapping[str, Config] | None = None) -> Artifact:
    """Schedule and compile every kernel of a fused module; return the artifact in memory."""
    host = host_description()
    target = host_target()
    built: dict[Operation, TvmKernel] = {}
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    configs = configs or {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"scheduling {module.name}", total=len(kernels))
        for op in kernels:
            bar.update(task, description=f"scheduling {op.kernel_name}")
            built[op] = build_kernel(op, target, configs.get(op.kernel_name))
            bar.advance(task)
        funcs = {op.kernel_name: k.func for op, k in built.items()}
        libraries = LibraryCache()
        key = library_key(funcs, tvm_target(target))
        library = libraries.get(key)
        if library is None:  # not compiled before with exactly these schedules
            bar.update(task, description=f"compiling {len(kernels)} kernels with LLVM")
            executable = compile_funcs(funcs, module.name, tvm_target(target))
            with tempfile.TemporaryDirectory(prefix="bitsmith-") as tmp:
                path = Path(tmp) / LIBRARY
                executable.export_library(str(path))
                library = path.read_bytes()
            libraries.put(key, library)
    plan = _Planner(module, built, lambda op, kernel: {"library": LIBRARY})
    manifest = Manifest(
        name=module.name, inputs=plan.specs(module.inputs, module.input_names),
        outputs=plan.specs(module.outputs, [f"output{i}" for i in range(len(module.outputs))]),
        plan=plan.to_json(), requires={"machine": host["machine"]},
        toolchain={"tvm": tvm.__version__, "mcpu": target.mcpu},
        bitsmith_version=__version__, metadata=dict(module.metadata))
    return Artifact(manifest, plan.weights, {LIBRARY: library})


def triton_target() -> Target:
    """The GPU (or Triton's interpreter) the cuda target compiles for; a clear error without
    Triton."""
    try:
        import triton  # noqa: F401, PLC0415 - the cuda target only
    except ImportError:
        raise CodegenError("target 'cuda' needs Triton: pip install -e \".[gpu]\" "
                         "(triton==3.6.0)") from None
    from .codegen.triton.templates import cuda_target  # noqa: PLC0415
    return cuda_target()


def build_triton_artifact(module: Module, *, progress: bool = False,
                          configs: Mapping[str, Config] | None = None,
                          target: Target | None = None) -> Artifact:
    """Generate the Triton source of every kernel of a fused module (one file each) for
    `target` (`triton_target()` unless given); the artifact carries the sources and their
    launches, and the GPU compiles them at load."""
    target = target or triton_target()
    import triton  # noqa: PLC0415 - the cuda target only

    from .codegen.triton.templates import build_kernel as build_triton  # noqa: PLC0415
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    configs = configs or {}
    built = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"generating Triton kernels for {module.name}", total=len(kernels))
        for op in kernels:
            built[op] = build_triton(op, target, configs.get(op.kernel_name))
            bar.advance(task)
    plan = _Planner(module, built, lambda op, kernel: {
        "library": f"{op.kernel_name}.py", "launches": kernel.launches})
    manifest = Manifest(
        name=module.name, inputs=plan.specs(module.inputs, module.input_names),
        outputs=plan.specs(module.outputs, [f"output{i}" for i in range(len(module.outputs))]),
        plan=plan.to_json(), requires={"device": "cuda"},
        toolchain={"triton": triton.__version__, "device": target.mcpu},
        bitsmith_version=__version__, metadata=dict(module.metadata))
    sources = {f"{op.kernel_name}.py": k.source.encode() for op, k in built.items()}
    return Artifact(manifest, plan.weights, sources)


class _Planner:
    """Names values, collects weights and kernel calls for the execution plan; `step` gives
    a kernel call's backend-specific entries (its library, a Triton kernel's launches)."""

    def __init__(self, module: Module, built: Mapping[Operation, Any],
                 step: Callable[[Operation, Any], dict]) -> None:
        self.ids: dict[Value, str] = {}
        self.constants: dict[Value, Any] = {}
        self.packed: dict[tuple[Value, str], str] = {}
        self.values: dict[str, dict] = {}
        self.weights: dict[str, Any] = {}
        self.weight_ids: dict[str, str] = {}
        self.steps: list[dict] = []
        for i, arg in enumerate(module.inputs):
            self._name(arg, f"in{i}")
        for op in module.ops:
            if op.name == "graph.constant":
                self._constant(op, module)
            elif op.name == "kernel.fused":
                kernel = built[op]
                self.steps.append({"kernel": op.kernel_name, **step(op, kernel),
                                   "template": kernel.template, "config": str(kernel.config),
                                   "inputs": [self._operand(v, kernel.packs.get(i))
                                              for i, v in enumerate(op.operands)],
                                   "outputs": [self._name(r, f"v{len(self.ids)}")
                                               for r in op.results]})
            elif op.name != "func.return":
                raise CodegenError(f"'{op.name}' at the top level after fusion; every op must "
                                   "be in a kernel.fused (run the fuse pass)")
        self.inputs = [self.ids[a] for a in module.inputs]
        self.outputs = [self._value(v) for v in module.outputs]

    def _name(self, value: Value, vid: str) -> str:
        self.ids[value] = vid
        self.values[vid] = value_spec([_dim(d) for d in value.type.shape], str(value.type.dtype))
        return vid

    def _constant(self, op: Any, module: Module) -> None:
        """Remember a constant; it enters the artifact when a kernel reads it as it is."""
        name = op.weight if op.weight is not None else f"literal{len(self.constants)}"
        array = module.weights[op.weight] if op.weight is not None else op.value.array
        self.constants[op.result] = (name, array)

    def _weight(self, name: str, array: np.ndarray, dtype: str) -> str:
        vid = f"w{len(self.weight_ids)}"
        self.values[vid] = value_spec(list(array.shape), dtype)
        self.weights[name] = array
        self.weight_ids[vid] = name
        return vid

    def _value(self, value: Value) -> str:
        """The id of a value; a constant's first use stores it (a quantized one packed)."""
        if value not in self.ids and value in self.constants:
            name, array = self.constants[value]
            stored = "u32" if isinstance(value.type.dtype, QuantType) else str(value.type.dtype)
            self.ids[value] = self._weight(name, array, stored)
        return self.ids[value]

    def _operand(self, value: Value, pack: Any) -> str:
        """The value id a kernel reads: the value, or its pre-packed copy (a new weight)."""
        if pack is None:
            return self._value(value)
        layout, fn = pack
        if value not in self.constants:
            raise CodegenError(f"a template packs an operand that is not a weight ({value.type})")
        key = (value, layout)
        if key not in self.packed:
            name, array = self.constants[value]
            packed = fn(np.asarray(array))
            dtype = next(k for k, v in NUMPY_DTYPES.items() if v == packed.dtype.name)
            self.packed[key] = self._weight(f"{name}.{layout}", packed, dtype)
        return self.packed[key]

    def specs(self, values: Sequence[Value], names: Sequence[str]) -> tuple[TensorSpec, ...]:
        """Signature entries of inputs or outputs."""
        return tuple(TensorSpec(n, tuple(_dim(d) for d in v.type.shape), str(v.type.dtype))
                     for v, n in zip(values, names, strict=True))

    def to_json(self) -> dict:
        """The execution plan."""
        return {"values": self.values, "inputs": self.inputs, "outputs": self.outputs,
                "weights": self.weight_ids, "steps": self.steps}


def _dim(d: Any) -> int | str:
    return d if isinstance(d, int) else format_dim(d)
