"""RayRunner on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`): builds spread as
tasks, timings on one actor per node of the tuned fingerprint, the same winners as the local
runner, a node killed mid-round costing nothing recorded, a fingerprint with no node refused.

The timings are stand-ins of known cost (a function of the config), so that winners are
deterministic and the nodes, which share this machine's cores, can be compared."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from bitsmith.autotune.candidates import MeasureInput, MeasureOptions, MeasureResult  # noqa: E402
from bitsmith.autotune.ray_runner import RayRunner  # noqa: E402
from bitsmith.errors import TuningError  # noqa: E402

from .test_tuner import _kernels  # noqa: E402

pytestmark = pytest.mark.cluster

SLOW_FLAG = "BITSMITH_TEST_SLOW_TIMING"  # a file: while it exists, timings take 3 s


def fake_build(inp: MeasureInput) -> tuple[bytes | None, str | None]:
    if "BAD" in inp.config:
        return None, "the template refused this config"
    return f"library of {inp.config}".encode(), None


def fake_cost(config: str) -> float:
    """The stand-in kernel time of a config: known, distinct per config."""
    return 1e-6 * (1 + int(hashlib.sha256(config.encode()).hexdigest()[:8], 16) / 2**32)


def fake_time(inp: MeasureInput, library: bytes,
              options: MeasureOptions) -> tuple[MeasureResult | None, str | None]:
    marks = Path(os.environ["BITSMITH_TEST_MARKS"])
    node = ray.get_runtime_context().get_node_id()
    (marks / f"{node}-{abs(hash(inp.config))}").write_text(inp.config)
    if (marks / SLOW_FLAG).exists():
        time.sleep(3)
    if library != f"library of {inp.config}".encode():
        return None, "the library is not this candidate's"
    return MeasureResult.of([fake_cost(inp.config)] * 3), None


def two_devices() -> str:
    """Nodes with the resource 'other_cpu' report another device fingerprint."""
    node = ray.get_runtime_context().get_node_id()
    resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node)
    return "fp-other" if "other_cpu" in resources else "fp-main"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    marks = tmp_path_factory.mktemp("marks")
    os.environ["BITSMITH_TEST_MARKS"] = str(marks)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.add_node(num_cpus=1, resources={"other_cpu": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"BITSMITH_TEST_MARKS": str(marks)}})
    yield c, nodes, marks
    ray.shutdown()
    c.shutdown()


@contextlib.contextmanager
def killed_when_busy(cluster: Cluster, victim, marks: Path) -> Iterator[None]:
    """Timings slowed down while the body runs; `victim` removed from the cluster as soon as
    it has started one."""
    for f in marks.iterdir():
        f.unlink()
    (marks / SLOW_FLAG).write_text("")

    def kill() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(f.name.startswith(victim.node_id) for f in marks.iterdir()):
                (marks / SLOW_FLAG).unlink()
                cluster.remove_node(victim)
                return
            time.sleep(0.05)
    killer = threading.Thread(target=kill)
    killer.start()
    try:
        yield
    finally:
        killer.join()


def _inputs(n: int, bad: int = -1) -> list[MeasureInput]:
    return [MeasureInput("kernel text", "dense", json.dumps({"TILE_M": i, "TILE_N": 2 * i,
                                                             "X": "BAD" if i == bad else "ok"}))
            for i in range(n)]


def _runner(options: MeasureOptions | None = None) -> RayRunner:
    return RayRunner(None, build_fn=fake_build, time_fn=fake_time, fingerprint_fn=two_devices,
                     fingerprint="fp-main", options=options)


def test_builds_anywhere_timings_only_on_nodes_of_the_fingerprint(cluster) -> None:
    c, _, marks = cluster
    for f in marks.iterdir():
        f.unlink()
    with _runner() as runner:
        assert len(runner.devices()) == 3  # head + 2 nodes; not the 'other_cpu' node
        inputs = _inputs(9, bad=4)
        results = runner.run(inputs)
    assert [r.ok for r in results] == [i != 4 for i in range(9)]
    assert "refused" in (results[4].error or "")
    for inp, r in zip(inputs, results, strict=True):
        if r.ok:
            assert r.median == pytest.approx(fake_cost(inp.config))
            assert r.library == f"library of {inp.config}".encode()
    other = next(n["NodeID"] for n in ray.nodes() if "other_cpu" in n["Resources"])
    timed_on = {f.name.split("-")[0] for f in marks.iterdir()}
    assert other not in timed_on and len(timed_on) >= 2  # spread over the devices


def test_a_fingerprint_no_node_has_is_refused(cluster) -> None:
    runner = RayRunner(None, build_fn=fake_build, time_fn=fake_time,
                       fingerprint_fn=two_devices, fingerprint="fp-nowhere")
    with pytest.raises(TuningError, match="no live node of device fingerprint fp-nowhere"):
        runner.run(_inputs(2))
    runner.close()
    with RayRunner(None, build_fn=fake_build, time_fn=fake_time, fingerprint_fn=two_devices,
                   fingerprint="fp-other") as other:
        assert len(other.devices()) == 1
        assert all(r.ok for r in other.run(_inputs(3)))


def test_a_node_killed_mid_round_loses_no_candidate(cluster) -> None:
    c, nodes, marks = cluster
    victim = nodes[0]
    with _runner(options=MeasureOptions(run_timeout=60)) as runner:
        assert victim.node_id in runner.devices()
        with killed_when_busy(c, victim, marks):
            results = runner.run(_inputs(6))
        assert all(r.ok for r in results), [r.error for r in results]
        assert victim.node_id not in runner.devices()
    assert not math.isinf(max(r.median for r in results))


class InProcess:
    """The same stand-ins run in this process: what local tuning measures."""

    def run(self, inputs):
        return [MeasureResult.of([fake_cost(inp.config)] * 3, fake_build(inp)[0] or b"")
                if fake_build(inp)[0] else MeasureResult(math.inf, error="refused")
                for inp in inputs]

    def close(self) -> None:
        pass


def _tune(tmp_path: Path, name: str, runner, monkeypatch, trials: int = 30):
    """Tune the MLP with its own database, cache and cost model (which a tuner saves and the
    next one on the device loads)."""
    from bitsmith.autotune.cache import ArtifactCache
    from bitsmith.autotune.database import TuningDatabase
    from bitsmith.autotune.tuner import Tuner

    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / f"{name}-cache"))
    db = TuningDatabase(tmp_path / f"{name}.sqlite3")
    tuner = Tuner(database=db, cache=ArtifactCache(tmp_path / name), runner=runner, batch=8,
                  seed=3)
    kernels = _kernels("mlp")
    configs = tuner.tune(kernels, trials)
    records = [r for task in tuner.tasks(kernels) for r in db.records(task.key, tuner.fp)]
    return configs, db, records


def test_ray_tuning_finds_the_local_winners_and_records_alike(cluster, tmp_path,
                                                              monkeypatch) -> None:
    local, local_db, _ = _tune(tmp_path, "local", InProcess(), monkeypatch)
    with _runner() as runner:
        distributed, ray_db, _ = _tune(tmp_path, "ray", runner, monkeypatch)
    assert {k: str(c) for k, c in distributed.items()} == {k: str(c) for k, c in local.items()}
    assert ray_db.count() == local_db.count() == 30
    local_db.close()
    ray_db.close()


def test_a_node_killed_mid_tuning_loses_nothing_recorded(cluster, tmp_path,
                                                        monkeypatch) -> None:
    """Every trial recorded once though its node died; a second driver tuning on with the same
    database (the first one's cache gone) measures only configs not recorded yet."""
    c, nodes, marks = cluster
    victim = nodes[1]
    with _runner() as runner:
        assert victim.node_id in runner.devices()
        with killed_when_busy(c, victim, marks):
            _, db, records = _tune(tmp_path, "killed", runner, monkeypatch, trials=12)
    assert victim.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(records) == db.count() == 12 and all(r.median is not None for r in records)
    assert len({(r.task_key, r.config) for r in records}) == 12  # nothing measured twice
    db.close()
    shutil.rmtree(tmp_path / "killed")  # the first driver's cache is lost
    with _runner() as second:
        configs, again, records = _tune(tmp_path, "killed", second, monkeypatch, trials=6)
    assert again.count() == 18 and len({(r.task_key, r.config) for r in records}) == 18
    assert configs
    again.close()
