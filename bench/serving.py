"""Serving throughput: the server with dynamic batching vs the same server with --max-batch 1,
under 32 concurrent clients, then an open-loop overload at twice the batching server's
saturated throughput (the only errors there must be 503s), in one run.

    python bench/serving.py [--models bert minilm] [--duration 10] [--repeats 3]
                            [--concurrency 32] [--json serving.json]

Each model is compiled with a dynamic batch, served by `bitsmith serve` in a process of its
own, and loaded by the load generator of `bitsmith loadtest` (in this process). Both share
this machine's cores, as a sidecar load test would; the server's share of the CPU is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import bitsmith
from bitsmith.frontend import load_model
from bitsmith.serving import loadtest


def compile_model(name: str, directory: Path) -> Path:
    """A dynamic-batch artifact of zoo model `name` (or minilm)."""
    loaded = load_model(name)
    args, kwargs = loaded.call_args(2)
    cm = bitsmith.compile(loaded.module, args, example_kwargs=kwargs, name=loaded.name,
                          dynamic_batch=True)
    path = directory / f"{name}.bsm"
    cm.save(path)
    return path


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`bitsmith serve` in a child process, waited on until ready; SIGTERM on exit."""

    def __init__(self, artifact: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "bitsmith", "serve", str(artifact),
                                      "--port", str(self.port), "--log-level", "warning",
                                      *flags], stderr=subprocess.DEVNULL)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server on {self.url} never became ready")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def measure(server: Server, model: str, duration: float, **load: Any) -> dict[str, Any]:
    """One load test against `server`; the report plus the server's CPU share."""
    metadata = loadtest.run(loadtest.fetch_metadata(server.url, model))
    body = loadtest.request_body(metadata)
    cpu = server.cpu_seconds()
    report = loadtest.run(loadtest.run_load(server.url, model, body, duration=duration, **load))
    doc = report.to_json()
    doc["server_cpu"] = round((server.cpu_seconds() - cpu) / report.seconds, 2)
    return doc


def bench_model(name: str, artifact: Path, duration: float, concurrency: int,
                repeats: int) -> dict[str, Any]:
    """Batching vs no batching under closed-loop load (alternating, `repeats` runs each; the
    run of median throughput is reported), then the overload."""
    runs: dict[str, list[dict[str, Any]]] = {"batched": [], "max_batch_1": []}
    for _ in range(repeats):
        for key, batch in (("batched", "32"), ("max_batch_1", "1")):
            with Server(artifact, "--max-batch", batch) as server:
                runs[key].append(measure(server, name, duration, concurrency=concurrency))
    result: dict[str, Any] = {"model": name}
    for key, docs in runs.items():
        docs.sort(key=lambda d: d["throughput"])
        result[key] = {**docs[len(docs) // 2], "runs": [d["throughput"] for d in docs]}
    rate = 2 * result["batched"]["throughput"]
    with Server(artifact, "--max-batch", "32") as server:
        overload = measure(server, name, duration, rate=rate, max_inflight=1024)
    overload["offered_rate"] = round(rate, 1)
    result["overload"] = overload
    result["speedup"] = round(result["batched"]["throughput"]
                              / max(result["max_batch_1"]["throughput"], 1e-9), 2)
    return result


def main() -> None:
    """Print markdown tables (and write JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["bert", "minilm"])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load test")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="closed-loop runs per server setting (the median is reported)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            artifact = compile_model(name, Path(tmp))
            results.append(bench_model(name, artifact, args.duration, args.concurrency,
                                       args.repeats))
            print(f"{name} done", file=sys.stderr, flush=True)
    print(f"{os.cpu_count()} cores shared by server and load generator; "
          f"{args.concurrency} clients, {args.duration:g} s per run, median of {args.repeats} "
          "alternating runs\n")
    print("| model | server | req/s (median) | req/s (all runs) | p50 ms | p90 ms | p99 ms | "
          "errors | server CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for label, key in (("--max-batch 32", "batched"), ("--max-batch 1", "max_batch_1")):
            d = r[key]
            print(f"| {r['model']} | {label} | {d['throughput']:.0f} | "
                  f"{', '.join(f'{t:.0f}' for t in d['runs'])} | {d['p50_ms']:.2f} | "
                  f"{d['p90_ms']:.2f} | {d['p99_ms']:.2f} | {_errors(d)} | "
                  f"{d['server_cpu']:.2f} |")
    print("\n| model | batching speedup | overload offered req/s | answered 200/s | "
          "answers by status | not sent (client bound) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        o = r["overload"]
        statuses = {"200": o["ok"], **o["errors"]}
        print(f"| {r['model']} | {r['speedup']:.2f}x | {o['offered_rate']:.0f} | "
              f"{o['throughput']:.0f} | {', '.join(f'{k}: {v}' for k, v in statuses.items())} "
              f"| {o['not_sent']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _errors(doc: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in doc["errors"].items()) or "none"


if __name__ == "__main__":
    main()
