"""How distributed tuning scales with devices, on a local multi-node Ray cluster.

    python bench/scale_out.py [--devices 1 2 4 8] [--timing-ms 50] [--rounds 3]

One machine cannot show a real speed-up (its nodes share its cores), so this measures what it
can: the RayRunner's scheduling efficiency. N nodes of a local `ray.cluster_utils.Cluster`
are N simulated devices of one fingerprint; a candidate's timing is a stand-in of known cost
(a sleep of `--timing-ms`, which takes no CPU), its build a stand-in that returns at once, so
the ideal is N timings in flight at all times. Each round runs 8 x N candidates through
`RayRunner.run` (the tuner's call) and takes trials per second over the wall time; the table
has the median over rounds, the speed-up over one device and its efficiency (speed-up / N;
goal >= 0.8).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--devices", nargs="*", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--timing-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
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
