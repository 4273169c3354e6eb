"""`bitsmith loadtest --openai`: a load generator for an OpenAI-compatible LLM server.

Every request streams a `/v1/completions` of a prompt drawn from `prompt_len` (words of a fixed
vocabulary, optionally after a shared system prompt of `shared_prefix` words, as chat
deployments send) with `max_tokens` drawn from `gen_len` and `ignore_eos`, so that each request
generates what was drawn. Closed loop (`concurrency` clients) or Poisson arrivals at `rate`
requests per second (at most `max_inflight` outstanding; more are counted not sent). It
measures, per request, the time to the first streamed text (TTFT), the gaps between streamed
chunks (inter-token latency: one token a chunk, except where a stop string holds text back)
and the usage the server reports in the last chunk (or, where a server sends none, as
llama.cpp's does not, a token per streamed chunk).
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from ..errors import LoadTestError

WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point government company number group problem fact river mountain city "
         "light music water paper story answer question system program market family").split()


def parse_lengths(text: str, what: str) -> tuple[int, int]:
    """'64:512' (uniform between) or '128' -> (low, high)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise LoadTestError(f"{what}: expected N or LOW:HIGH with 1 <= LOW <= HIGH, got "
                            f"{text!r}")
    return parts[0], parts[1]


@dataclass(slots=True)
class LlmLoadReport:
    """What an LLM load test saw."""

    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    statuses: Counter = field(default_factory=Counter)
    not_sent: int = 0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def to_json(self) -> dict[str, Any]:
        seconds = max(self.seconds, 1e-9)
        doc: dict[str, Any] = {
            "seconds": self.seconds, "requests": sum(self.statuses.values()), "ok": self.ok,
            "requests_per_s": self.ok / seconds,
            "output_tokens_per_s": self.output_tokens / seconds,
            "prompt_tokens_per_s": self.prompt_tokens / seconds,
            "errors": {str(k): v for k, v in self.statuses.items() if k != 200},
            "not_sent": self.not_sent}
        for name, values in (("ttft", self.ttft), ("itl", self.itl),
                             ("latency", self.latencies)):
            for q in (50, 90, 99):
                doc[f"{name}_p{q}_ms"] = percentile(values, q) * 1e3 if values else None
        return doc


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear between the closest ranks)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class _Workload:
    def __init__(self, prompt_len: tuple[int, int], gen_len: tuple[int, int],
                 shared_prefix: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.prompt_len, self.gen_len = prompt_len, gen_len
        self.prefix = " ".join(self.rng.choice(WORDS) for _ in range(shared_prefix))

    def next(self) -> tuple[str, int]:
        words = self.rng.randint(*self.prompt_len)
        text = " ".join(self.rng.choice(WORDS) for _ in range(words))
        prompt = f"{self.prefix}\n{text}" if self.prefix else text
        return prompt, self.rng.randint(*self.gen_len)


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: str, gen: int,
               report: LlmLoadReport, extra: dict[str, Any]) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
            **extra}
    start = time.perf_counter()
    last: float | None = None
    finished = False
    chunks = 0  # text chunks: the token count where the server sends no usage
    try:
        async with session.post(url + "/v1/completions", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as response:
            if response.status != 200:
                await response.read()
                report.statuses[response.status] += 1
                return
            async for raw in response.content:
                line = raw.strip()
                if line == b"data: [DONE]":
                    finished = True
                if not line.startswith(b"data: ") or finished:
                    continue
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    report.statuses["stream_error"] += 1
                    return
                usage = chunk.get("usage")
                if usage:
                    report.prompt_tokens += int(usage["prompt_tokens"])
                    report.output_tokens += int(usage["completion_tokens"])
                    chunks = -1
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    if chunks >= 0:
                        chunks += 1
                    now = time.perf_counter()
                    if last is None:
                        report.ttft.append(now - start)
                    else:
                        report.itl.append(now - last)
                    last = now
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
        report.statuses[type(exc).__name__] += 1
        return
    if not finished:  # the stream ended without [DONE]: cut off
        report.statuses["truncated"] += 1
        return
    if chunks > 0:  # no usage chunk (llama.cpp's server): a token a streamed chunk
        report.output_tokens += chunks
    report.latencies.append(time.perf_counter() - start)
    report.statuses[200] += 1


async def run_openai_load(url: str, model: str, *, duration: float, concurrency: int = 32,
                          rate: float | None = None, max_inflight: int = 1024,
                          prompt_len: tuple[int, int] = (64, 512),
                          gen_len: tuple[int, int] = (16, 256), shared_prefix: int = 0,
                          seed: int = 0, extra: dict[str, Any] | None = None,
                          on_tick: Callable[[float, LlmLoadReport], None] | None = None
                          ) -> LlmLoadReport:
    """Load `url` for `duration` seconds; requests still running at the end are waited for.
    `extra` fields join every request body (e.g. a logit bias against EOS for a server that
    ignores `ignore_eos`)."""
    extra = dict(extra or {})
    workload = _Workload(prompt_len, gen_len, shared_prefix, seed)
    report = LlmLoadReport(0.0)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    start = time.perf_counter()
    end = start + duration
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if rate is None:
            async def client() -> None:
                while time.perf_counter() < end:
                    await _one(session, url, model, *workload.next(), report, extra)
                    if on_tick is not None:
                        on_tick(time.perf_counter() - start, report)
            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            pending: set[asyncio.Task] = set()
            arrivals = random.Random(seed + 1)
            while (now := time.perf_counter()) < end:
                if len(pending) >= max_inflight:
                    report.not_sent += 1
                else:
                    task = asyncio.ensure_future(_one(session, url, model, *workload.next(),
                                                      report, extra))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if on_tick is not None:
                    on_tick(now - start, report)
                await asyncio.sleep(arrivals.expovariate(rate))
            await asyncio.gather(*pending)
    report.seconds = time.perf_counter() - start
    return report
