"""`serve --ray`: the server's app as Ray Serve replicas on a local multi-node cluster: 200
concurrent KServe requests answered as the model computes them by 2 replicas, a replica killed
while requests keep coming, artifacts checked by digest, the deployment drained on stop."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import bitsmith  # noqa: E402
from bitsmith.errors import ServingError  # noqa: E402
from bitsmith.serving import ray_serve  # noqa: E402
from bitsmith.serving.server import ServeOptions  # noqa: E402

pytestmark = pytest.mark.cluster
PORT = 8617


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    import torch

    from bitsmith import models

    spec = models.get("mlp")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("art") / "mlp.bsm"
    bitsmith.compile(spec.build().eval(), spec.example_inputs(2), dynamic_batch=True,
                     name="mlp").save(path)
    return path


@pytest.fixture(scope="module")
def deployed(artifact):
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    ray_serve.start([("mlp", artifact)], ray_serve.LoadOptions(max_batch=8),
                    ServeOptions(timeout_ms=20000), address=None, port=PORT, replicas=2)
    yield c
    ray_serve.stop()
    ray.shutdown()
    c.shutdown()


def _replicas() -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")])
            if "ServeReplica" in a.class_name and ray_serve.APP_NAME in a.class_name]


async def _infer_all(rows: np.ndarray, concurrency: int, answered: list | None = None,
                     ) -> list[tuple[int, np.ndarray | None]]:
    import httpx

    url = f"http://127.0.0.1:{PORT}/v2/models/mlp/infer"
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(
            max_connections=concurrency)) as client:
        async def one(x: np.ndarray) -> tuple[int, np.ndarray | None]:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, x.size],
                                "data": x.tolist()}]}
            r = await client.post(url, json=body)
            if answered is not None:
                answered.append(r.status_code)
            if r.status_code != 200:
                return r.status_code, None
            return 200, np.asarray(r.json()["outputs"][0]["data"], np.float32)
        return await asyncio.gather(*(one(x) for x in rows))


def _wait_ready() -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/v2/models/mlp/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the deployment never became ready")


def test_two_replicas_answer_200_concurrent_requests_as_the_model(deployed, artifact) -> None:
    _wait_ready()
    assert len(_replicas()) == 2
    local = bitsmith.load(artifact)
    rows = np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32)
    answers = asyncio.run(_infer_all(rows, 200))
    assert [status for status, _ in answers] == [200] * 200
    want = np.asarray(local.executor.run(rows)[0])
    got = np.stack([out for _, out in answers])
    assert np.abs(got - want.reshape(got.shape)).max() <= 1e-5 * np.abs(want).max()


def test_a_killed_replica_is_replaced_and_the_other_keeps_answering(deployed) -> None:
    _wait_ready()
    victim = _replicas()[0]
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    rows = np.random.default_rng(1).standard_normal((60, 64)).astype(np.float32)
    answers = asyncio.run(_infer_all(rows, 20))
    assert [status for status, _ in answers].count(200) == 60
    deadline = time.monotonic() + 120
    while len(_replicas()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_replicas()) == 2 and victim.actor_id not in {a.actor_id for a in _replicas()}


def test_an_artifact_that_arrives_changed_is_refused(deployed, tmp_path) -> None:
    (item,) = ray_serve.ship([("mlp", Path(__file__))])
    forged = ray_serve.Shipped(item.name, "0" * 64, item.size, item.ref)
    with pytest.raises(ServingError, match="arrived with digest .* expected 0000"):
        ray_serve.fetch(forged, tmp_path)
    assert ray_serve.fetch(item, tmp_path).read_bytes() == Path(__file__).read_bytes()


def test_stop_drains_what_is_in_flight(deployed) -> None:
    """Every request gets an HTTP answer, none is cut off: those a replica holds are answered
    (200), a replica already draining says 503, and once the route is gone Serve's proxy says
    404."""
    import threading

    _wait_ready()
    rows = np.random.default_rng(2).standard_normal((400, 64)).astype(np.float32)
    result: list = []
    answered: list = []
    sender = threading.Thread(target=lambda: result.extend(
        asyncio.run(_infer_all(rows, 50, answered))))
    sender.start()
    deadline = time.monotonic() + 60
    while len(answered) < 20 and time.monotonic() < deadline:  # requests are flowing
        time.sleep(0.01)
    serve.delete(ray_serve.APP_NAME)
    sender.join()
    statuses = [status for status, _ in result]
    assert len(statuses) == 400 and set(statuses) <= {200, 503, 404}
    assert statuses.count(200) >= 20
