"""How distributed tuning scales with devices, on a local multi-node Ray cluster; what Ray
Serve adds to a request.

    python bench/scale_out.py [--devices 1 2 4 8] [--timing-ms 50] [--rounds 3]
    python bench/scale_out.py --serving [--gateway] [--requests 300] [--rounds 3]
    python bench/scale_out.py --routing [--artifact smol.bsm] [--prefixes 8] [--questions 6]

One machine cannot show a real speed-up (its nodes share its cores), so this measures what it
can: the RayRunner's scheduling efficiency. N nodes of a local `ray.cluster_utils.Cluster`
are N simulated devices of one fingerprint; a candidate's timing is a stand-in of known cost
(a sleep of `--timing-ms`, which takes no CPU), its build a stand-in that returns at once, so
the ideal is N timings in flight at all times. Each round runs 8 x N candidates through
`RayRunner.run` (the tuner's call) and takes trials per second over the wall time; the table
has the median over rounds, the speed-up over one device and its efficiency (speed-up / N;
goal >= 0.8).

`--serving`: the zoo MLP (dynamic batch) served by `bitsmith serve` and by one-replica Ray
Serve deployments of the same artifact (`bitsmith serve --ray local`: a local Ray cluster per
process), one behind Serve's own HTTP proxy, one behind Serve's HAProxy ingress
(`RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy forwards to the replica's own HTTP port); each a
process of its own on this machine. With `--gateway`: bitsmith serve against HAProxy and the
routing gateway in front of the replica (`--route round-robin`; one HAProxy Serve per machine,
its ports are fixed). One client sends single-row KServe requests one at a time,
rotating between them in rounds of `--requests` each, every answer checked against the
model's own output; p50/p90 latency per server (medians over rounds) and the p50 overhead over
`bitsmith serve` (goal < 1 ms).

`--routing`: an LLM (SmolLM2 W4A8 unless `--artifact`) as 2 replicas of 1 CPU on a local
two-node cluster, behind `serve --ray`'s gateway with prefix-affinity routing, then with
round-robin (redeployed each round: both start with empty caches). The workload: `--prefixes`
system prompts of `--prefix-words` words, `--questions` completions after each, shuffled,
`--gen` greedy tokens each, streamed by `--clients` clients in a closed loop; each replica's
KV cache holds 60% of the system prompts' pages and 3 pages per client (`--kv-pages`),
so a replica that sees every system prompt evicts them as it goes. Reported: TTFT p50/p90 and
the prefix-cache hit rate (cached prompt tokens, from each response's usage, over prompt
tokens), medians over rounds; both policies' answers must be identical.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

from bitsmith.autotune.candidates import MeasureInput, MeasureOptions, MeasureResult
from bitsmith.autotune.ray_runner import RayRunner


def stand_in_build(inp: MeasureInput) -> tuple[bytes | None, str | None]:
    return inp.config.encode(), None


def stand_in_timer(cost: float):
    def time_it(inp: MeasureInput, library: bytes,
                options: MeasureOptions) -> tuple[MeasureResult | None, str | None]:
        time.sleep(cost)
        return MeasureResult.of([cost] * 3), None
    return time_it


def devices_below(n: int):
    """Nodes with a resource 'sim_device_i' for i < n report the simulated fingerprint."""
    def fingerprint() -> str:
        import ray

        node = ray.get_runtime_context().get_node_id()
        resources = next(x["Resources"] for x in ray.nodes() if x["NodeID"] == node)
        return "sim" if any(f"sim_device_{i}" in resources for i in range(n)) else "idle"
    return fingerprint


def serving(requests: int, rounds: int, gateway: bool = False) -> None:
    """Ray Serve's per-request overhead over `bitsmith serve` (see the module doc)."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import httpx
    import numpy as np
    import torch

    import bitsmith
    from bitsmith import models

    tmp = Path(tempfile.mkdtemp(prefix="bitsmith-scale-"))
    spec = models.get("mlp")
    torch.manual_seed(0)
    path = tmp / "mlp.bsm"
    cm = bitsmith.compile(spec.build().eval(), spec.example_inputs(2), dynamic_batch=True,
                          name="mlp")
    cm.save(path)
    haproxy = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}  # one such Serve per machine: fixed ports
    servers = {"bitsmith serve": ([], {}),
               "Ray Serve, Serve's proxy": (["--ray", "local"], {}),
               "Ray Serve, HAProxy ingress": (["--ray", "local"], haproxy)}
    if gateway:
        servers = {"bitsmith serve": ([], {}),
                   "Ray Serve, HAProxy ingress, gateway (--route round-robin)": (
                       ["--ray", "local", "--route", "round-robin"], haproxy)}
    urls, procs, logs = {}, [], {}
    try:
        for name, (flags, env) in servers.items():
            port = free_port()
            logs[name] = tmp / f"server{len(logs)}.log"
            with logs[name].open("wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bitsmith", "serve", str(path), "--port", str(port),
                     *flags], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}))
            urls[name] = f"http://127.0.0.1:{port}/v2/models/mlp"
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        want = np.asarray(cm.executor.run(x)[0]).reshape(-1)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64],
                            "data": x.reshape(-1).tolist()}]}
        with httpx.Client(timeout=30) as client:
            for name, url in urls.items():  # all up and warm
                wait_ready(client, url + "/ready", name, logs[name])
            p50: dict[str, list[float]] = {n: [] for n in urls}
            p90: dict[str, list[float]] = {n: [] for n in urls}
            for r in range(rounds):
                order = list(urls.items())
                for name, url in order[r % len(order):] + order[:r % len(order)]:
                    times = []
                    for _ in range(requests):
                        t0 = time.perf_counter()
                        answer = client.post(url + "/infer", json=body)
                        times.append(time.perf_counter() - t0)
                        got = np.asarray(answer.json()["outputs"][0]["data"], np.float32)
                        if answer.status_code != 200 or np.abs(got - want).max() > 1e-5:
                            raise SystemExit(f"{name} answered wrongly: {answer.text[:200]}")
                    p50[name].append(statistics.median(times))
                    p90[name].append(statistics.quantiles(times, n=10)[8])
        print(f"{requests} single-row KServe requests a round, one at a time, {rounds} "
              f"rotating rounds; each Ray Serve deployment on a local cluster of its own "
              f"(`bitsmith serve --ray local`), 1 replica\n")
        print("| server | p50 ms | p90 ms | p50 overhead over bitsmith serve, ms |")
        print("|---|---|---|---|")
        base = statistics.median(p50["bitsmith serve"])
        for name in urls:
            mid = statistics.median(p50[name])
            print(f"| {name} | {mid * 1e3:.3f} | {statistics.median(p90[name]) * 1e3:.3f} | "
                  f"{(mid - base) * 1e3:.3f} |")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()


def routing(args: argparse.Namespace) -> None:
    """Prefix-affinity routing against round-robin on 2 LLM replicas (see the module doc)."""
    import asyncio
    import math
    import random
    import tempfile
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    import bitsmith.llm as bllm
    from bitsmith.serving import ray_serve
    from bitsmith.serving.server import ServeOptions

    artifact = Path(args.artifact) if args.artifact else None
    if artifact is None:
        artifact = Path(tempfile.mkdtemp(prefix="bitsmith-route-")) / "smol.bsm"
        start = time.perf_counter()
        bllm.compile("smollm2", act="int8", max_batch=8, max_seq=1024,
                     prefill=(32, 64, 128, 256), score_chunk=0).save(artifact)
        print(f"compiled SmolLM2 (W4A8) in {time.perf_counter() - start:.0f} s", flush=True)
    llm = bllm.load(artifact)
    words = ("the model serves requests that share long system prompts across replicas "
             "while caches hold pages of keys and values").split()
    rng = random.Random(0)
    systems = [f"System prompt {p}: " + " ".join(rng.choice(words)
                                                 for _ in range(args.prefix_words))
               for p in range(args.prefixes)]
    owner = {f"{systems[p]}\nUser: question {q} about {rng.choice(words)}?\nAssistant:": p
             for p in range(args.prefixes) for q in range(args.questions)}
    prompts = list(owner)
    rng.shuffle(prompts)
    blocks = llm.engine.blocks
    page_bytes = llm.engine.kv_memory // blocks.num_pages
    shared = min(len(llm.tokenizer.encode(s)) for s in systems)
    per_prefix = math.ceil(shared / blocks.page_size)
    pages = args.kv_pages or math.ceil(0.6 * args.prefixes) * per_prefix + 3 * args.clients
    del llm
    print(f"{len(prompts)} completions: {args.prefixes} system prompts of about {shared} "
          f"tokens x {args.questions} questions, shuffled; {args.gen} tokens each (greedy); "
          f"{args.clients} clients in a closed loop; 2 replicas of 1 CPU on a local 2-node "
          f"cluster, each with a prefix cache in {pages} KV pages of {blocks.page_size} tokens "
          f"(all {args.prefixes} system prompts need {args.prefixes * per_prefix}); "
          f"prefix routing's slack {args.slack} requests; "
          f"{args.rounds} alternating rounds, medians\n", flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    policies = ("prefix", "round-robin")
    rows: dict[str, list[tuple[float, float, float, int]]] = {p: [] for p in policies}
    texts: dict[str, list[str]] = {}
    port = free_port()
    try:
        for r in range(args.rounds):
            for policy in policies if r % 2 == 0 else policies[::-1]:
                ray_serve.start([("smol", artifact)],
                                ray_serve.LoadOptions(prefix_cache=True, max_batch=8,
                                                      kv_memory=pages * page_bytes),
                                ServeOptions(timeout_ms=600_000), address=None, port=port,
                                replicas=2, cpus=1, route=policy, slack=args.slack)
                try:
                    got = asyncio.run(completions(port, prompts, args.gen, args.clients))
                finally:
                    ray_serve.stop()
                    time.sleep(2)
                answers = [t for *_, t, _ in got]
                homes: dict[int, set[str]] = {}
                for prompt, (*_, replica) in zip(prompts, got, strict=True):
                    homes.setdefault(owner[prompt], set()).add(replica)
                alone = sum(len(h) == 1 for h in homes.values())
                if texts and answers != next(iter(texts.values())):
                    raise SystemExit(f"{policy} answered differently from "
                                     f"{next(iter(texts))}")
                texts.setdefault(policy, answers)
                ttft = sorted(f for f, *_ in got)
                hit = sum(c for _, c, *_ in got) / sum(n for _, _, n, *_ in got)
                rows[policy].append((statistics.median(ttft),
                                     statistics.quantiles(ttft, n=10)[8], hit, alone))
                print(f"round {r} {policy}: TTFT p50 {rows[policy][-1][0] * 1e3:.0f} ms, "
                      f"hit rate {hit:.2f}, system prompts served by one replica: {alone} "
                      f"of {args.prefixes}", flush=True)
        print("\n| routing | TTFT p50 ms | TTFT p90 ms | prefix-cache hit rate "
              "(cached / prompt tokens) | system prompts served by one replica |")
        print("|---|---|---|---|---|")
        for policy in policies:
            p50, p90, hit, alone = (statistics.median(v)
                                    for v in zip(*rows[policy], strict=True))
            print(f"| {policy} | {p50 * 1e3:.0f} | {p90 * 1e3:.0f} | {hit:.2f} | "
                  f"{alone:g} of {args.prefixes} |")
        a, b = (statistics.median(v[0] for v in rows[p]) for p in policies)
        print(f"\nTTFT p50, round-robin / prefix: {b / a:.2f}x")
    finally:
        ray.shutdown()
        cluster.shutdown()


async def completions(port: int, prompts: list[str], gen: int, clients: int
                      ) -> list[tuple[float, int, int, str, str]]:
    """Stream greedy completions of `prompts` from `clients` clients in a closed loop:
    (TTFT s, cached tokens, prompt tokens, text, replica) per prompt."""
    import asyncio

    import httpx
    import orjson

    url = f"http://127.0.0.1:{port}/v1/completions"
    queue = list(prompts)
    out: dict[str, tuple[float, int, int, str, str]] = {}
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker() -> None:
            while queue:
                prompt = queue.pop(0)
                body = {"model": "smol", "prompt": prompt, "max_tokens": gen,
                        "temperature": 0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                t0, first, text, usage = time.perf_counter(), None, "", None
                async with client.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        raise SystemExit(f"HTTP {r.status_code}: {await r.aread()}")
                    replica = r.headers.get("x-bitsmith-replica", "?")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        doc = orjson.loads(line[6:])
                        if doc.get("usage"):
                            usage = doc["usage"]
                        for choice in doc.get("choices", []):
                            if choice.get("text") and first is None:
                                first = time.perf_counter() - t0
                            text += choice.get("text", "")
                if first is None or usage is None:
                    raise SystemExit(f"no token or no usage for a request: {text!r}")
                out[prompt] = (first, usage["prompt_tokens_details"]["cached_tokens"],
                               usage["prompt_tokens"], text, replica)
        await asyncio.gather(*(worker() for _ in range(clients)))
    return [out[p] for p in prompts]


def wait_ready(client, url: str, name: str, log) -> None:
    """Until `url` answers 200 (else exit with the server's log's tail)."""
    import httpx

    deadline = time.monotonic() + 300
    while True:
        try:
            if client.get(url).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} never became ready; its log ends:\n"
                             + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--devices", nargs="*", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--timing-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serving", action="store_true",
                        help="Ray Serve's per-request overhead over bitsmith serve instead")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--gateway", action="store_true",
                        help="--serving: bitsmith serve against HAProxy and the routing "
                             "gateway (serve --route round-robin) instead")
    parser.add_argument("--routing", action="store_true",
                        help="prefix-affinity routing vs round-robin on 2 LLM replicas instead")
    parser.add_argument("--artifact", help="--routing: an LLM artifact (default: compile "
                        "SmolLM2 W4A8)")
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--prefix-words", type=int, default=400)
    parser.add_argument("--gen", type=int, default=8)
    parser.add_argument("--slack", type=int, default=4,
                        help="--routing: the prefix router's load slack (serve --route-slack)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kv-pages", type=int, default=0,
                        help="--routing: KV pages per replica (default: 60%% of the system "
                             "prompts' pages and 3 pages per client)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.routing:
        routing(args)
        return
    if args.serving:
        serving(args.requests, args.rounds, args.gateway)
        return
    import ray
    from ray.cluster_utils import Cluster

    most = max(args.devices)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "resources": {"sim_device_0": 1}})
    for i in range(1, most):
        cluster.add_node(num_cpus=1, resources={f"sim_device_{i}": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cost = args.timing_ms / 1e3
    print(f"local Ray cluster of {most} nodes; stand-in timing {args.timing_ms:g} ms a "
          f"candidate; median of {args.rounds} rounds of 8 x N candidates\n")
    print("| devices | trials/s | ideal trials/s | speed-up vs 1 | efficiency (speed-up / N) |")
    print("|---|---|---|---|---|")
    base = None
    try:
        for n in args.devices:
            with RayRunner(None, build_fn=stand_in_build, time_fn=stand_in_timer(cost),
                           fingerprint_fn=devices_below(n), fingerprint="sim") as runner:
                found = len(runner.devices())
                if found != n:
                    raise SystemExit(f"expected {n} simulated devices, found {found}")
                # warm: build workers for a whole round started, actors up
                runner.run([MeasureInput("k", "dense", json.dumps({"i": i, "warm": 1}))
                            for i in range(8 * n)])
                rates = []
                for r in range(args.rounds):
                    inputs = [MeasureInput("k", "dense", json.dumps({"i": i, "round": r}))
                              for i in range(8 * n)]
                    start = time.perf_counter()
                    results = runner.run(inputs)
                    wall = time.perf_counter() - start
                    if not all(res.ok for res in results):
                        raise SystemExit(f"a stand-in failed: {results}")
                    rates.append(len(inputs) / wall)
            rate = statistics.median(rates)
            base = base or rate
            print(f"| {n} | {rate:.1f} | {n / cost:.1f} | {rate / base:.2f} | "
                  f"{rate / base / n:.2f} |", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
