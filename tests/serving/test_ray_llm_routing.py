"""`serve --ray` with an LLM: requests go through the gateway and its prefix-affinity router to
2 replicas on a local two-node cluster. Greedy answers (streamed or not, concurrent) equal the
artifact's own; chats sharing a system prompt find it cached on the replica they are sent to
(round-robin sends the second one elsewhere); a KServe model is served through the same
gateway; a killed replica's share of the traffic is answered by the other."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import bitsmith  # noqa: E402
import bitsmith.llm as bllm  # noqa: E402
from bitsmith.serving import ray_serve  # noqa: E402
from bitsmith.serving.server import ServeOptions  # noqa: E402

pytestmark = pytest.mark.cluster
PORT = 8618
URL = f"http://127.0.0.1:{PORT}"
NEW = 6


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    import torch

    from bitsmith import models

    folder = tmp_path_factory.mktemp("art")
    llm = bllm.compile("llama", kv="f32", max_batch=4, max_seq=512, page_size=8,
                       prefill=(32,), score_chunk=0)
    llm.save(folder / "zoo.bsm")
    spec = models.get("mlp")
    torch.manual_seed(0)
    bitsmith.compile(spec.build().eval(), spec.example_inputs(2), dynamic_batch=True,
                     name="mlp").save(folder / "mlp.bsm")
    return {"zoo": folder / "zoo.bsm", "mlp": folder / "mlp.bsm"}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _deploy(artifacts: dict[str, Path], route: str) -> None:
    ray_serve.start(list(artifacts.items()), ray_serve.LoadOptions(prefix_cache=True),
                    ServeOptions(timeout_ms=20000), address=None, port=PORT, replicas=2,
                    route=route)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{URL}/v1/models", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the deployment never answered")


def _chats() -> list[list[dict[str, str]]]:
    # system prompts past one routing-key link (128 characters) of text they share
    return [[{"role": "system", "content": f"Rule {p}. " + "Be terse. " * 20},
             {"role": "user", "content": f"Question {q}?"}] for p in range(3) for q in range(3)]


def _want(path: Path, chats: list) -> list[str]:
    llm = bllm.load(path)
    return [llm.complete([llm.chat_prompt(c)], max_new_tokens=NEW, temperature=0.0,
                         ignore_eos=True)[0].text for c in chats]


async def _ask(chats: list, stream: bool, concurrency: int,
               replicas: list | None = None) -> list[tuple[int, str, int]]:
    """(status, text, cached prompt tokens) per chat; the replica that answered each appended
    to `replicas`."""
    import httpx
    import orjson

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(
            max_connections=concurrency)) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(chat: list) -> tuple[int, str, int]:
            body = {"model": "zoo", "messages": chat, "max_tokens": NEW, "temperature": 0,
                    "ignore_eos": True, "stream": stream,
                    "stream_options": {"include_usage": True}} if stream else {
                "model": "zoo", "messages": chat, "max_tokens": NEW, "temperature": 0,
                "ignore_eos": True}
            async with gate:
                r = await client.post(f"{URL}/v1/chat/completions", json=body)
            if replicas is not None:
                replicas.append(r.headers.get(ray_serve.REPLICA_HEADER.decode()))
            if r.status_code != 200:
                return r.status_code, "", -1
            if not stream:
                doc = r.json()
                return 200, doc["choices"][0]["message"]["content"], \
                    doc["usage"]["prompt_tokens_details"]["cached_tokens"]
            events = [orjson.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events
                           if e.get("choices"))
            usage = next(e["usage"] for e in events if e.get("usage"))
            return 200, text, usage["prompt_tokens_details"]["cached_tokens"]
        return await asyncio.gather(*(one(c) for c in chats))


def _replicas() -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")])
            if "ServeReplica" in a.class_name and "Replica" in a.class_name.split(":")[-1]
            and ray_serve.APP_NAME in a.class_name]


def test_prefix_routing_answers_as_the_model_and_finds_the_prefix(cluster, artifacts) -> None:
    chats = _chats()
    want = _want(artifacts["zoo"], chats)
    _deploy(artifacts, "prefix")
    try:
        served: list = []
        got = asyncio.run(_ask(chats, stream=False, concurrency=1, replicas=served))
        assert [(s, t) for s, t, _ in got] == [(200, w) for w in want]  # one at a time
        for p in range(3):  # each system prompt's chats answered by one replica
            assert len(set(served[3 * p:3 * p + 3])) == 1 and served[3 * p], served
        for p in range(3):  # a system prompt's later chats find it where the first left it
            first, *later = [cached for _, _, cached in got[3 * p:3 * p + 3]]
            assert all(c > first for c in later), (p, first, later)
        mixed = chats * 4
        streamed = asyncio.run(_ask(mixed, stream=True, concurrency=12))
        assert [(s, t) for s, t, _ in streamed] == [(200, w) for w in want * 4]
        import httpx

        row = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        r = httpx.post(f"{URL}/v2/models/mlp/infer", timeout=60, json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 64], "data": row.ravel().tolist()}]})
        assert r.status_code == 200
        local = np.asarray(bitsmith.load(artifacts["mlp"]).executor.run(row)[0])
        got_row = np.asarray(r.json()["outputs"][0]["data"], np.float32)
        assert np.abs(got_row - local.ravel()).max() <= 1e-5 * np.abs(local).max()

        victim = _replicas()[0]  # the other one answers while Serve replaces it
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        after = asyncio.run(_ask(chats, stream=False, concurrency=3))
        assert [(s, t) for s, t, _ in after] == [(200, w) for w in want]
    finally:
        ray_serve.stop()


def test_round_robin_sends_the_second_chat_elsewhere(cluster, artifacts) -> None:
    chats = _chats()[:2]  # one system prompt, two questions
    _deploy({"zoo": artifacts["zoo"]}, "round-robin")
    try:
        served: list = []
        got = asyncio.run(_ask(chats, stream=False, concurrency=1, replicas=served))
        assert [s for s, _, _ in got] == [200, 200] and served[0] != served[1]
        assert got[1][2] == got[0][2]  # the other replica: the system prompt not cached there
    finally:
        ray_serve.stop()
