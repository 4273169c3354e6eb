"""The tuner's loop with a deterministic fake runner (no processes), and one real tuning run
through `bitsmith.compile(tune=...)`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from bitsmith import models, passes
from bitsmith.autotune.cache import ArtifactCache
from bitsmith.autotune.cost_model import CostModel
from bitsmith.autotune.database import TuningDatabase
from bitsmith.autotune.measure import MeasureInput, MeasureResult
from bitsmith.autotune.policy import keep_in_model_winners, model_tuner
from bitsmith.autotune.tuner import Budget, Tuner, group_tasks, timing_regime, working_set
from bitsmith.codegen.template import Config
from bitsmith.codegen.tvm.target import host_target
from bitsmith.compiler import build_artifact
from bitsmith.errors import TuningError
from bitsmith.frontend import from_torch

warnings.filterwarnings("ignore", category=FutureWarning)


class FakeRunner:
    """Times a config by a fixed formula: TILE_M=2, TILE_N=16 is the fastest dense config."""

    def __init__(self) -> None:
        self.calls: list[MeasureInput] = []

    def run(self, inputs):
        self.calls.extend(inputs)
        out = []
        for inp in inputs:
            c = json.loads(inp.config)
            if inp.template != "dense":
                out.append(MeasureResult(1e-5, (1e-5,) * 3))
                continue
            t = 1e-5 * (1 + abs(c["TILE_M"] - 2) + abs(c["TILE_N"] - 16) / 16
                        + 0.1 * (c["ORDER"] == "nm"))
            out.append(MeasureResult(t, (t,) * 3, library=b"lib"))
        return out

    def close(self) -> None:
        pass


def _kernels(name: str) -> list:
    spec = models.get(name)
    torch.manual_seed(0)
    module = from_torch(spec.build().eval(), spec.example_inputs(2), name=name,
                        dynamic_batch=True)
    passes.run(module, passes.default_pipeline("cpu"))
    return [op for op in module.ops if op.name == "kernel.fused"]


def test_budget_parsing() -> None:
    assert Budget.parse(200) == Budget(trials=200)
    assert Budget.parse("50") == Budget(trials=50)
    assert Budget.parse("10m") == Budget(seconds=600.0)
    assert Budget.parse("1.5h").seconds == 5400.0
    for bad in (0, "soon", True, 2.5):
        with pytest.raises(TuningError, match="budget"):
            Budget.parse(bad)


def test_identical_kernels_are_one_task() -> None:
    tasks = group_tasks(_kernels("bert"), host_target())
    sizes = sorted(len(t.kernels) for t in tasks)
    assert sum(sizes) == len(_kernels("bert")) and len(tasks) < sum(sizes)
    qkv = [t for t in tasks if t.template.name == "dense" and len(t.kernels) >= 3]
    assert qkv, "the q, k and v projections of both layers share one task"


def test_tuning_records_everything_caches_winners_and_never_tunes_twice(tmp_path) -> None:
    kernels = _kernels("mlp")
    runner = FakeRunner()
    with TuningDatabase(tmp_path / "db.sqlite3") as db:
        cache = ArtifactCache(tmp_path / "cache")
        tuner = Tuner(database=db, cache=cache, runner=runner, batch=8, seed=1)
        configs = tuner.tune(kernels, 48)
        assert len(runner.calls) == 48 and db.count() == 48
        for task in tuner.tasks(kernels):  # each task measures its untuned default first
            first = next(c for c in runner.calls if c.kernel_ir == task.kernel_ir)
            default = task.template.default_config(task.problem, tuner.target)
            assert json.loads(first.config) == dict(default)
        assert set(configs) == {op.kernel_name for op in kernels}
        for task in tuner.tasks(kernels):
            best = db.best(task.key, tuner.fp)
            entry = cache.get(tuner.cache_key(task))
            assert entry is not None and entry.config == best.config
            assert entry.median == min(r.median for r in db.records(task.key, tuner.fp))
            assert entry.library == b"lib"
        # a second run finds everything cached: no measurement at all
        again = Tuner(database=db, cache=cache, runner=runner).tune(kernels, 48)
        assert len(runner.calls) == 48 and again == configs
        # a corrupt entry is never used: it is rebuilt from the database, still unmeasured
        key = tuner.cache_key(tuner.tasks(kernels)[0])
        path = cache.path(key)
        path.write_bytes(path.read_bytes()[:-3] + b"xyz")
        with pytest.warns(Warning, match="corrupt|checksum"):
            rebuilt = Tuner(database=db, cache=cache, runner=runner).cached_configs(kernels)
        assert rebuilt == configs and len(runner.calls) == 48
        assert cache.get(key) is not None


def test_model_guided_search_finds_the_fastest_config_of_a_toy_surface(tmp_path) -> None:
    kernels = _kernels("bert")[5:6]  # a q/k/v projection: 16 rows per sample
    runner = FakeRunner()
    with TuningDatabase(tmp_path / "db.sqlite3") as db:
        tuner = Tuner(database=db, cache=ArtifactCache(tmp_path / "c"), runner=runner,
                      batch=8, seed=1)
        (config,) = tuner.tune(kernels, 32).values()
        task = tuner.tasks(kernels)[0]
    valid = list(task.template.valid_configs(task.problem))
    fastest = min(runner.run([MeasureInput("", "dense", json.dumps(dict(c)))])[0].median
                  for c in valid)
    assert len(valid) >= 4 * 32  # the search measured at most a quarter of the space
    got = runner.run([MeasureInput("", "dense", json.dumps(dict(config)))])[0].median
    assert got == fastest and config["TILE_M"] == 2 and config["TILE_N"] == 16


SCRIPT = """
import torch, bitsmith
from bitsmith import models
from bitsmith.autotune.database import TuningDatabase, default_database_path
spec = models.get("mlp")
torch.manual_seed(0)
model = spec.build().eval()
x = spec.example_inputs(4)[0]
cm = bitsmith.compile(model, (x,), name="mlp", tune=6)
with torch.no_grad():
    assert float((cm(x) - model(x)).abs().max() / model(x).abs().max()) < 1e-4
db = TuningDatabase(default_database_path())
records = [r for key, fp, _ in db.tasks() for r in db.records(key, fp)]
again = bitsmith.compile(model, (x,), name="mlp", tune=6)
steps = lambda m: {s["kernel"]: s["config"] for s in m.artifact.manifest.plan["steps"]}
print(len(records), sum(r.error is not None for r in records), db.count(),
      steps(cm) == steps(again))
"""


def test_compile_with_tune_from_a_script_without_a_main_guard(tmp_path) -> None:
    """Tuning measures for real in worker processes, which must not re-run the user's script;
    a second compile finds every kernel cached and measures nothing."""
    script = tmp_path / "tune_mlp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "BITSMITH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured, failed, total, same = proc.stdout.split()
    assert int(measured) == 6 and int(failed) == 0
    assert int(total) == 6 and same == "True"  # the second compile measured nothing


def test_a_tuned_config_that_loses_in_the_model_is_replaced_by_the_default(tmp_path,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    spec = models.get("bert")
    torch.manual_seed(0)
    module = from_torch(spec.build().eval(), spec.example_inputs(8), name="bert")
    passes.run(module, passes.default_pipeline("cpu"))
    (op,) = [o for o in module.ops if o.name == "kernel.fused"
             and o.kernel_name == "k10_linear_gelu"]
    task = group_tasks([op], host_target())[0]  # template and problem
    slow = Config({**task.template.default_config(task.problem, host_target()),
                   "TILE_M": 1, "TILE_N": 16, "PARALLEL": False})
    arrays = [t.numpy() for t in spec.example_inputs(8)]
    tuned = build_artifact(module, configs={op.kernel_name: slow})

    def profile(artifact, arrays):  # in-model kernel times, fixed so the verdict is certain
        steps = artifact.manifest.plan["steps"]
        return {s["kernel"]: 3e-5 if s["config"] == str(slow) else 1e-5 for s in steps}
    shipped = keep_in_model_winners(module, tuned, {op.kernel_name: slow}, arrays, 8, profile)
    step = next(s for s in shipped.manifest.plan["steps"] if s["kernel"] == op.kernel_name)
    assert step["config"] == str(task.template.default_config(task.problem, host_target()))
    with TuningDatabase(tmp_path / "db.sqlite3") as db:
        tuner = model_tuner(module, 8, db)  # the model's timing regime, as the compiler's
        (task,) = tuner.tasks([op])
        entry = tuner.cache.get(tuner.cache_key(task))
        assert entry is not None and "kept_default" in entry.meta
        assert tuner.cached_configs([op])[op.kernel_name] == \
            task.template.default_config(task.problem, host_target())


def test_a_new_task_starts_from_what_earlier_tasks_on_this_device_taught(tmp_path) -> None:
    """The cost model is fit on the device's history before a new task's first round, so that
    round already proposes what the model learned is fast (TILE_M=2, TILE_N=16 for the fake
    runner), which is not a neighbour of the default config."""
    dense = [t for t in group_tasks(_kernels("bert"), host_target())
             if t.template.name == "dense"]
    first = dense[0]
    second = dense[1]  # rows padded to whole tiles: TILE_M=2 is valid on any
    runner = FakeRunner()
    with TuningDatabase(tmp_path / "db.sqlite3") as db:
        cache = ArtifactCache(tmp_path / "cache")
        Tuner(database=db, cache=cache, runner=runner, batch=8, seed=1).tune(first.kernels, 24)
        tuner = Tuner(database=db, cache=cache, runner=runner, batch=8, seed=1)
        tuner.model = CostModel("rank:pairwise")  # not the model the first run saved
        tuner.model_path = tmp_path / "second-model"
        tuner.tune(second.kernels, 8)
        assert tuner.model.trained and tuner.model.records >= 24
    default = second.template.default_config(second.problem, tuner.target)
    assert (default["TILE_M"], default["TILE_N"]) != (2, 16)
    round_one = [json.loads(c.config) for c in runner.calls[24:]]
    assert len(round_one) == 8 and round_one[0] == dict(default)
    assert any((c["TILE_M"], c["TILE_N"]) == (2, 16) for c in round_one[1:])


def test_another_devices_measurements_seed_the_model_only_when_asked(tmp_path) -> None:
    """The same kernel tuned first for this CPU as an AVX2 machine (its candidates built for
    that target), then for the host: with `transfer=[that device]` the host's first round
    comes from a model trained on the AVX2 records (the fake runner's best shape is not a
    neighbour of the default); without it, the host's database history is empty and its
    model untrained. Records stay each device's own."""
    from bitsmith.codegen.tvm.target import avx2_target, target_from_json

    (task,) = [t for t in group_tasks(_kernels("bert"), host_target())
               if t.template.name == "dense"][:1]
    runner = FakeRunner()
    with TuningDatabase(tmp_path / "db.sqlite3") as db:
        cache = ArtifactCache(tmp_path / "cache")
        other = Tuner(target=avx2_target(), database=db, cache=cache, runner=runner, batch=8,
                      seed=1)
        other.model_path = tmp_path / "avx2-model"
        other.tune(task.kernels, 24)
        assert all(target_from_json(c.target) == avx2_target() for c in runner.calls)
        alone = Tuner(database=db, cache=ArtifactCache(tmp_path / "c2"), runner=FakeRunner(),
                      batch=8, seed=1)
        alone.model, alone.model_path = CostModel("rank:pairwise"), tmp_path / "m1"
        alone._run(alone.tasks(task.kernels), Budget(trials=8))
        assert alone._history == []
        seeded = Tuner(database=db, cache=ArtifactCache(tmp_path / "c3"), runner=runner,
                       batch=8, seed=1, transfer=[other.fingerprint])
        seeded.model, seeded.model_path = CostModel("rank:pairwise"), tmp_path / "m2"
        seeded.tune(task.kernels, 8)
        assert seeded.model.trained and len(seeded._history) >= 24
        assert all(key.endswith(f"@{other.fp}") for _, _, key in seeded._history)
        assert len(db.records(seeded.tasks(task.kernels)[0].key, other.fp)) == 24
    round_one = runner.calls[24:]
    assert all(c.target == "" for c in round_one)  # the host's own candidates
    configs = [json.loads(c.config) for c in round_one]
    assert any((c["TILE_M"], c["TILE_N"]) == (2, 16) for c in configs[1:])


def test_kernels_are_timed_hot_only_when_the_model_fits_in_the_last_level_cache() -> None:
    kernels = _kernels("mlp")
    need = working_set(kernels, {"B": 8})
    weights = sum(op.result.type.numel() * 4 for op in _mlp_weights())
    assert weights < need < weights + 64 * 1024  # the weights, plus small activations
    assert timing_regime(kernels, {"B": 8}, {"cache": {"l3": need}}) == "hot"
    assert timing_regime(kernels, {"B": 8}, {"cache": {"l3": need - 1}}) == "cold"
    assert timing_regime(kernels, {"B": 8}, {"cache": {}}) == "cold"  # unknown: too small
    hot, cold = (group_tasks(kernels, host_target(), t) for t in ("hot", "cold"))
    assert [t.key for t in hot] != [t.key for t in cold]  # measured apart, cached apart
    runner = FakeRunner()
    tuner = Tuner(runner=runner, timing="cold")
    assert tuner.tasks(kernels)[0].timing == "cold"
    tuner.tune(kernels[:1], 2)
    assert runner.calls and not any(c.hot for c in runner.calls)
    with pytest.raises(TuningError, match="timing expected"):
        Tuner(timing="warm")


def _mlp_weights() -> list:
    spec = models.get("mlp")
    module = from_torch(spec.build().eval(), spec.example_inputs(2), name="mlp")
    return [op for op in module.ops if op.name == "graph.constant"]


def test_the_in_model_verdict_is_per_task_so_identical_kernels_keep_one_config(
        tmp_path, monkeypatch) -> None:
    """q, k and v projections are one task: one of them timing slower with the tuned config
    does not split them when the three together are faster; when together they are slower,
    all three go back to the default, as the cache then says for every later compile."""
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    spec = models.get("bert")
    torch.manual_seed(0)
    module = from_torch(spec.build().eval(), spec.example_inputs(8), name="bert")
    passes.run(module, passes.default_pipeline("cpu"))
    kernels = [o for o in module.ops if o.name == "kernel.fused"]
    (task,) = [t for t in group_tasks(kernels, host_target())
               if t.template.name == "dense" and len(t.kernels) >= 3][:1]
    names = [op.kernel_name for op in task.kernels]
    tuned_config = Config({**task.template.default_config(task.problem, host_target()),
                           "PARALLEL": False})
    configs = {n: tuned_config for n in names}
    arrays = [t.numpy() for t in spec.example_inputs(8)]
    tuned = build_artifact(module, configs=configs)

    def verdict(first: float, others: float) -> set[str]:
        def profile(artifact, arrays):
            out = {}
            for s in artifact.manifest.plan["steps"]:
                is_tuned = s["config"] == str(tuned_config) and s["kernel"] in names
                out[s["kernel"]] = ((first if s["kernel"] == names[0] else others)
                                    if is_tuned else 1e-5)
            return out
        shipped = keep_in_model_winners(module, tuned, configs, arrays, 8, profile)
        return {s["kernel"] for s in shipped.manifest.plan["steps"]
                if s["config"] == str(tuned_config) and s["kernel"] in names}

    assert verdict(first=1.2e-5, others=0.8e-5) == set(names)  # 2.8e-5 < 3e-5 together
    assert verdict(first=0.9e-5, others=1.1e-5) == set()  # 3.1e-5 >= 3e-5: all revert
    with TuningDatabase(tmp_path / "cache" / "tuning.sqlite3") as db:
        cached = model_tuner(module, 8, db).cached_configs(task.kernels)
    assert set(cached.values()) == {task.template.default_config(task.problem, host_target())}
