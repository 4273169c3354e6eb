"""LLM serving under load, one run: bitsmith's OpenAI server with continuous batching and
chunked prefill against its own alternatives (one request at a time, requests batched whole,
no chunked prefill), the prefix cache on and off, and llama.cpp's server on the same GGUF.

    python bench/llm_serving.py [--artifact smol.bsm] [--clients 8 32] [--duration 60]
                                [--prompt-len 48:400] [--gen-len 16:256] [--no-llama-cpp]
                                [--itl-slo-ms 100] [--prefix-rate 1.0]

Every server runs as its own process on 2 threads (bitsmith: TVM's pool; llama.cpp:
n_threads=2) and is loaded by `bitsmith loadtest --openai`'s generator from this process:
closed loop, `--clients` streaming clients, prompts of `--prompt-len` words (about 1.3
SmolLM2 tokens a word), `max_tokens` from `--gen-len` with `ignore_eos`. Without --artifact,
SmolLM2's Q4_1 GGUF is compiled with int8 activation blocks (W4A8), max_batch 16, prefill
chunks of 32, 64, 128 and 256 tokens.
Rows: output tokens/s, requests/s, TTFT and inter-token latency percentiles.

The prefix cache is measured on a chat workload: a shared system prompt of 256 words (about
330 tokens) before a user turn of 8-32 words, outputs of 16-64 tokens, with Poisson arrivals
at `--prefix-rate` requests/s (below what the server sustains, so that TTFT is the prefill's
time rather than the queue's), then with `--clients` in a closed loop.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bitsmith.llm.sources import smollm2_path
from bitsmith.serving.loadtest_openai import parse_lengths, run_openai_load

THREADS = 2
NO_EOS = {"logit_bias": {"2": -100}}
"""llama.cpp's server ignores `ignore_eos`: SmolLM2's end token (id 2) banned instead, so that
every request generates its max_tokens there too. (Its server also cuts a running stream short
when the next request arrives unless started with `--interrupt_requests False`, as here.)"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _ready(url: str, path: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + path) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not come up")


class Server:
    """A server process on a free port, stopped (SIGTERM) on exit."""

    def __init__(self, command: list[str], ready_path: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [c.replace("{port}", str(self.port)) for c in command]
        self.ready_path = ready_path

    def __enter__(self) -> Server:
        env = {**os.environ, "TVM_NUM_THREADS": str(THREADS)}
        self.proc = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        asyncio.run(_ready(self.url, self.ready_path))
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bitsmith_server(artifact: Path, *flags: str) -> Server:
    return Server([sys.executable, "-m", "bitsmith", "serve", str(artifact), "--name", "smol",
                   "--port", "{port}", "--log-level", "warning", *flags], "/health")


def llama_cpp_server(gguf: Path, n_ctx: int) -> Server:
    return Server([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                   "--model_alias", "smol", "--port", "{port}", "--n_threads", str(THREADS),
                   "--n_threads_batch", str(THREADS), "--n_ctx", str(n_ctx),
                   "--interrupt_requests", "False"], "/v1/models")


def measure(server: Server, args: argparse.Namespace, clients: int,
            shared_prefix: int = 0, extra: dict[str, Any] | None = None,
            rate: float | None = None, prompt_len: tuple[int, int] | None = None,
            gen_len: tuple[int, int] | None = None) -> dict[str, Any]:
    report = asyncio.run(run_openai_load(
        server.url, "smol", duration=args.duration, concurrency=clients, rate=rate,
        prompt_len=prompt_len or args.prompt_len, gen_len=gen_len or args.gen_len,
        shared_prefix=shared_prefix, seed=clients, extra=extra))
    return report.to_json()


def row(name: str, doc: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        value = doc.get(key)
        return "-" if value is None else f"{value:.0f}"
    errors = ", ".join(f"{k}: {v}" for k, v in doc["errors"].items()) or "none"
    return (f"| {name} | {doc['output_tokens_per_s']:.1f} | {doc['requests_per_s']:.2f} | "
            f"{ms('ttft_p50_ms')} / {ms('ttft_p99_ms')} | {ms('itl_p50_ms')} / "
            f"{ms('itl_p99_ms')} | {errors} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--prompt-len", default="48:400")
    parser.add_argument("--gen-len", default="16:256")
    parser.add_argument("--max-seq", type=int, default=1024)
    parser.add_argument("--itl-slo-ms", type=float, default=100.0,
                        help="the ITL target of the row that sets one")
    parser.add_argument("--prefix-rate", type=float, default=1.0,
                        help="Poisson arrivals (requests/s) of the prefix-cache scenario")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--only-llama-cpp", action="store_true",
                        help="llama.cpp's server alone (no compile, no bitsmith rows)")
    args = parser.parse_args()
    args.prompt_len = parse_lengths(args.prompt_len, "--prompt-len")
    args.gen_len = parse_lengths(args.gen_len, "--gen-len")
    tmp = Path(tempfile.mkdtemp(prefix="bitsmith-serving-"))
    artifact = args.artifact
    if args.only_llama_cpp:
        header = ("| server | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
                  "errors |\n|---|---|---|---|---|---|")
        for clients in args.clients:
            print(f"\n{clients} clients\n{header}", flush=True)
            with llama_cpp_server(smollm2_path(), args.max_seq) as server:
                print(row("llama.cpp server (same GGUF)", measure(
                    server, args, clients, extra=NO_EOS)), flush=True)
        return
    if artifact is None:
        import bitsmith.llm as bllm
        artifact = tmp / "smol.bsm"
        start = time.perf_counter()
        bllm.compile("smollm2", act="int8", max_batch=16, max_seq=args.max_seq,
                     prefill=(32, 64, 128, 256), score_chunk=0).save(artifact)
        print(f"compiled SmolLM2 (W4A8, max_batch 16) in {time.perf_counter() - start:.0f} s",
              flush=True)
    slo = f"{args.itl_slo_ms:g}"
    configs = [("bitsmith: continuous + chunked prefill", ()),
               (f"bitsmith: continuous + chunked, ITL target {slo} ms",
                ("--itl-slo-ms", slo)),
               ("bitsmith: one request at a time", ("--max-batch", "1")),
               ("bitsmith: requests batched whole", ("--policy", "whole")),
               ("bitsmith: continuous, no chunked prefill", ("--policy", "prefill-first"))]
    header = ("| server | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
              "errors |\n|---|---|---|---|---|---|")
    for clients in args.clients:
        print(f"\n{clients} clients, prompts {args.prompt_len} words, outputs {args.gen_len} "
              f"tokens, {args.duration:g} s each\n{header}", flush=True)
        for name, flags in configs:
            with bitsmith_server(artifact, *flags) as server:
                print(row(name, measure(server, args, clients)), flush=True)
        if not args.no_llama_cpp:
            with llama_cpp_server(smollm2_path(), args.max_seq) as server:
                print(row("llama.cpp server (same GGUF)", measure(
                    server, args, clients, extra=NO_EOS)), flush=True)
    chat = {"prompt_len": (8, 32), "gen_len": (16, 64), "shared_prefix": 256}
    for label, clients, rate in ((f"Poisson arrivals at {args.prefix_rate:g} requests/s", 64,
                                  args.prefix_rate),
                                 (f"{max(args.clients)} clients, closed loop",
                                  max(args.clients), None)):
        print(f"\nshared system prompt of 256 words, user turns of 8-32 words, outputs of "
              f"16-64 tokens; {label}\n{header}", flush=True)
        for name, flags in (("bitsmith, prefix cache off", ()),
                            ("bitsmith, prefix cache on", ("--prefix-cache",))):
            with bitsmith_server(artifact, *flags) as server:
                print(row(name, measure(server, args, clients, rate=rate, **chat)),
                      flush=True)


if __name__ == "__main__":
    main()
