"""The tuning policy of a model compile: which kernels to tune and at what batch and timing
regime, which tuned configs to ship (the in-model verdict), and what the cache remembers."""
from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..codegen.backend import Backend, kernels_of
from ..codegen.template import Config, Target
from ..codegen.tvm.build import TvmBackend
from ..ir import Module
from ..runtime.artifact import Artifact
from ..runtime.executor import Executor
from .cache import LibraryCache
from .candidates import Runner
from .database import TuningDatabase, default_database_path
from .tuner import Budget, Tuner, timing_regime

IN_MODEL_ROUNDS = 3
"""Alternating profiles of the tuned and the default build that the in-model verdict takes."""


def profile_kernels(artifact: Artifact, arrays: Sequence[np.ndarray]) -> dict[str, float]:
    """Median seconds of every kernel of an artifact run on `arrays`."""
    return dict(Executor(artifact).profile(*arrays, repeat=30))


def model_tuner(module: Module, batch: int, database: TuningDatabase,
                progress: bool = False, target: Target | None = None,
                runner: Runner | None = None) -> Tuner:
    """A tuner for this model's kernels at `batch` on `target` (this CPU unless given),
    measuring with `runner` (a local worker pool unless given). On the CPU it times them hot
    or cold as the whole model (weights and activations) fits in the last-level cache or not;
    on a GPU, hot (its L2 holds what a kernel just wrote)."""
    tuner = Tuner(target=target, database=database, bindings={"B": batch}, progress=progress,
                  runner=runner)
    tuner.timing = ("hot" if tuner.target.kind == "cuda"
                    else timing_regime(kernels_of(module), tuner.bindings, tuner.fingerprint))
    return tuner


def tuned_configs(module: Module, tune: int | str | None, batch: int,
                  progress: bool = False, target: Target | None = None,
                  runner: Runner | None = None) -> tuple[dict[str, Config], bool]:
    """The tuned config of each kernel (by name) that has one, tuned now (within the budget
    `tune`, measured by `runner` if given) or from the cache, and whether anything was
    measured now. A given runner stays open (its owner closes it)."""
    kernels = kernels_of(module)
    with TuningDatabase(default_database_path()) as database:
        tuner = model_tuner(module, batch, database, progress=progress, target=target,
                            runner=runner)
        try:
            if tune is None:
                return tuner.cached_configs(kernels), False
            before = database.count()
            configs = tuner.tune(kernels, Budget.parse(tune))
            return configs, database.count() > before
        finally:
            if runner is None:  # the tuner's own worker pool
                tuner.close()


def keep_in_model_winners(module: Module, artifact: Artifact, configs: Mapping[str, Config],
                          arrays: Sequence[np.ndarray], batch: int,
                          profile: Callable[[Artifact, Sequence[np.ndarray]],
                                            Mapping[str, float]] = profile_kernels,
                          backend: Backend | None = None) -> Artifact:
    """Time every kernel in the model with its tuned and its default config, alternating
    (`IN_MODEL_ROUNDS` profiles of each, per-kernel median). Identical kernels share one tuned
    config (one task), so the verdict is per task: a tuned config whose kernels together are
    not faster than with the default gives way to it, and the cache records that so that
    later compiles do too. The default is the burden-free choice: it is what the untuned model
    runs. Returns the artifact to ship (built by `backend`, the CPU's unless given)."""
    backend = backend or TvmBackend(LibraryCache())
    default = backend.build(module)
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
        for task in tuner.tasks([op for op in kernels_of(module) if op.kernel_name in changed]):
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
    return backend.build(module, {k: v for k, v in configs.items() if k not in losers})
