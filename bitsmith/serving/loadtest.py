"""`bitsmith loadtest`: a bounded load generator for a KServe v2 server on this machine.

Closed loop (`concurrency` clients, each sending its next request when the last is answered) or
open loop (`rate` requests per second, whatever the answers; at most `max_inflight` outstanding,
and a request that would exceed it is counted as not sent). Either runs for `duration` seconds.
The request body is built once from the model's metadata (or given), so the generator spends
its time on HTTP, not on JSON.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from ..errors import LoadTestError
from .kserve import NUMPY_OF_DATATYPE, encode_request

LOOPBACK_ONLY = ("loadtest is a loopback tool: it targets a server on this machine; "
                 "pass allow_remote (--allow-remote) to point it elsewhere")


def run(coro: Any) -> Any:
    """Run a coroutine of this module on uvloop where it is installed (a load generator on the
    server's machine must spend as little CPU as it can), else on asyncio's own loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional: not on Windows
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)




@dataclass(slots=True)
class LoadReport:
    """What a load test saw."""

    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, answered 200
    statuses: Counter = field(default_factory=Counter)  # HTTP status (or error name) -> count
    not_sent: int = 0  # open loop: over max_inflight

    @property
    def ok(self) -> int:
        """Requests answered 200."""
        return self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        """Requests answered 200 per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile (0..100) of the answered-200 requests, in seconds."""
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def errors(self) -> dict[str, int]:
        """Every answer that was not a 200, by status (or client-side error name)."""
        return {str(k): v for k, v in sorted(self.statuses.items(), key=str) if k != 200}

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-able dict (latencies in ms)."""
        return {"seconds": round(self.seconds, 3), "requests": sum(self.statuses.values()),
                "ok": self.ok, "throughput": round(self.throughput, 1),
                "p50_ms": _ms(self.percentile(50)), "p90_ms": _ms(self.percentile(90)),
                "p99_ms": _ms(self.percentile(99)),
                "mean_ms": _ms(statistics.fmean(self.latencies)) if self.latencies else None,
                "errors": self.errors(), "not_sent": self.not_sent}


def _ms(seconds: float) -> float | None:
    return None if seconds != seconds else round(seconds * 1e3, 3)


def check_loopback(url: str) -> None:
    """Raise LoadTestError unless `url`'s host resolves to a loopback address."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise LoadTestError(f"cannot resolve {host!r}: {exc}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise LoadTestError(f"{host} is not a loopback address; {LOOPBACK_ONLY}")


def normalize_url(target: str) -> str:
    """`localhost:8000` or `http://localhost:8000/` -> `http://localhost:8000`."""
    url = target if "://" in target else f"http://{target}"
    return url.rstrip("/")


def request_body(metadata: Mapping[str, Any], rows: int = 1,
                 dims: Mapping[str, int] | None = None, seed: int = 0) -> bytes:
    """A request for the model `metadata` describes: dim 0 = -1 becomes `rows`, any other -1
    comes from `dims` (name -> size); ints in [0, 100) (token ids, classes), floats N(0, 1),
    bools true."""
    rng = np.random.default_rng(seed)
    names, arrays = [], []
    for tensor in metadata["inputs"]:
        shape = []
        for axis, dim in enumerate(tensor["shape"]):
            if dim >= 0:
                shape.append(dim)
            elif axis == 0:
                shape.append(rows)
            elif dims and tensor["name"] in dims:
                shape.append(dims[tensor["name"]])
            else:
                raise LoadTestError(f"input '{tensor['name']}' has a variable dim {axis} "
                                    "besides the batch; give its size (--dim NAME=SIZE)")
        dtype = np.dtype(NUMPY_OF_DATATYPE.get(tensor["datatype"], "float32"))
        if dtype.kind == "b":
            array = np.ones(shape, bool)
        elif dtype.kind in "iu":
            array = rng.integers(0, 100, shape).astype(dtype)
        else:
            array = rng.standard_normal(shape).astype(dtype)
        names.append(tensor["name"])
        arrays.append(array)
    return encode_request(names, arrays)


async def fetch_metadata(url: str, model: str) -> dict[str, Any]:
    """GET /v2/models/{model}; LoadTestError when the server cannot be reached or lacks it."""
    try:
        async with (aiohttp.ClientSession() as session,
                    session.get(f"{url}/v2/models/{model}") as response):
            doc = await response.json(content_type=None)
            if response.status != 200:
                raise LoadTestError(f"{url}/v2/models/{model}: {response.status} "
                                    f"{doc.get('error', doc)}")
            return doc
    except aiohttp.ClientError as exc:
        raise LoadTestError(f"cannot reach {url}: {exc}") from None


async def run_load(url: str, model: str, body: bytes, *, duration: float,
                   concurrency: int = 32, rate: float | None = None,
                   max_inflight: int = 1024, timeout: float = 30.0,
                   on_tick: Any = None) -> LoadReport:
    """Send `body` to the model's infer endpoint for `duration` seconds; closed loop with
    `concurrency` clients, or open loop at `rate` per second when given."""
    if duration <= 0 or concurrency < 1 or (rate is not None and rate <= 0):
        raise LoadTestError(f"expected duration > 0, concurrency >= 1 and rate > 0, got "
                            f"{duration}, {concurrency}, {rate}")
    endpoint = f"{url}/v2/models/{model}/infer"
    report = LoadReport(duration)
    limit = max_inflight if rate is not None else concurrency
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout,
                                     headers=headers) as session:
        async def one() -> None:
            start = time.perf_counter()
            try:
                async with session.post(endpoint, data=body) as response:
                    await response.read()
                    status: int | str = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                status = type(exc).__name__
            report.statuses[status] += 1
            if status == 200:
                report.latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        end = start + duration
        ticker = asyncio.create_task(_tick(on_tick, report, start, end)) if on_tick else None
        if rate is None:
            async def client() -> None:
                while time.perf_counter() < end:
                    await one()
            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            await _open_loop(one, rate, end, max_inflight, report)
        report.seconds = time.perf_counter() - start
        if ticker:
            ticker.cancel()
    return report


async def _open_loop(one: Any, rate: float, end: float, max_inflight: int,
                     report: LoadReport) -> None:
    """Start a request every 1/rate seconds (catching up when late) until `end`."""
    inflight: set[asyncio.Task] = set()
    interval = 1.0 / rate
    due = time.perf_counter()
    while due < end:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        if len(inflight) >= max_inflight:
            report.not_sent += 1
        else:
            task = asyncio.create_task(one())
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        due += interval
    if inflight:
        await asyncio.gather(*inflight)


async def _tick(on_tick: Any, report: LoadReport, start: float, end: float) -> None:
    while True:
        await asyncio.sleep(0.5)
        on_tick(min(time.perf_counter(), end) - start, report)
