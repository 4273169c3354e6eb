"""How distributed tuning scales with devices, on a local multi-node Ray cluster; what Ray
Serve adds to a request.

    python bench/scale_out.py [--devices 1 2 4 8] [--timing-ms 50] [--rounds 3]
    python bench/scale_out.py --serving [--requests 300] [--rounds 3]

One machine cannot show a real speed-up (its nodes share its cores), so this measures what it
can: the RayRunner's scheduling efficiency. N nodes of a local `ray.cluster_utils.Cluster`
are N simulated devices of one fingerprint; a candidate's timing is a stand-in of known cost
(a sleep of `--timing-ms`, which takes no CPU), its build a stand-in that returns at once, so
the ideal is N timings in flight at all times. Each round runs 8 x N candidates through
`RayRunner.run` (the tuner's call) and takes trials per second over the wall time; the table
has the median over rounds, the speed-up over one device and its efficiency (speed-up / N;
goal >= 0.8).

`--serving`: the zoo MLP (dynamic batch) served by `bitsmith serve` (a process of its own) and
by a one-replica Ray Serve deployment of the same artifact (`serve --ray`), both on this
machine; one client sends single-row KServe requests one at a time, alternating between the
two in rounds of `--requests` each, every answer checked against the model's own output;
p50/p90 latency per server (medians over rounds) and Ray Serve's p50 overhead (goal < 1 ms).
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


def serving(requests: int, rounds: int) -> None:
    """Ray Serve's per-request overhead over `bitsmith serve` (see the module doc)."""
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import httpx
    import numpy as np
    import ray
    import torch

    import bitsmith
    from bitsmith import models
    from bitsmith.serving import ray_serve
    from bitsmith.serving.server import ServeOptions

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    tmp = Path(tempfile.mkdtemp(prefix="bitsmith-scale-"))
    spec = models.get("mlp")
    torch.manual_seed(0)
    path = tmp / "mlp.bsm"
    cm = bitsmith.compile(spec.build().eval(), spec.example_inputs(2), dynamic_batch=True,
                          name="mlp")
    cm.save(path)
    local_port, ray_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith", "serve", str(path), "--port",
                             str(local_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.start([("mlp", path)], ray_serve.LoadOptions(max_batch=8), ServeOptions(),
                        address=None, port=ray_port, replicas=1)
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        want = np.asarray(cm.executor.run(x)[0]).reshape(-1)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64],
                            "data": x.reshape(-1).tolist()}]}
        urls = {"bitsmith serve": f"http://127.0.0.1:{local_port}/v2/models/mlp",
                "Ray Serve (1 replica)": f"http://127.0.0.1:{ray_port}/v2/models/mlp"}
        with httpx.Client(timeout=30) as client:
            for url in urls.values():  # both up and warm
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        if client.get(url + "/ready").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.5)
            p50: dict[str, list[float]] = {n: [] for n in urls}
            p90: dict[str, list[float]] = {n: [] for n in urls}
            for r in range(rounds):
                for name, url in (list(urls.items()) if r % 2 == 0
                                  else list(reversed(urls.items()))):
                    times = []
                    for _ in range(requests):
                        t0 = time.perf_counter()
                        answer = client.post(url + "/infer", json=body)
                        times.append(time.perf_counter() - t0)
                        got = np.asarray(answer.json()["outputs"][0]["data"], np.float32)
                        if answer.status_code != 200 or np.abs(got - want).max() > 1e-5:
                            raise SystemExit(f"{name} answered wrongly: {answer.text[:200]}")
                    q = statistics.quantiles(times, n=10)
                    p50[name].append(statistics.median(times))
                    p90[name].append(q[8])
        print(f"{requests} single-row KServe requests a round, one at a time, {rounds} "
              f"alternating rounds\n")
        print("| server | p50 ms | p90 ms |")
        print("|---|---|---|")
        for name in urls:
            print(f"| {name} | {statistics.median(p50[name]) * 1e3:.3f} | "
                  f"{statistics.median(p90[name]) * 1e3:.3f} |")
        names = list(urls)
        extra = statistics.median(p50[names[1]]) - statistics.median(p50[names[0]])
        print(f"\nRay Serve's p50 overhead: {extra * 1e3:.3f} ms")
    finally:
        ray_serve.stop()
        ray.shutdown()
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--devices", nargs="*", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--timing-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serving", action="store_true",
                        help="Ray Serve's per-request overhead over bitsmith serve instead")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.serving:
        serving(args.requests, args.rounds)
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
