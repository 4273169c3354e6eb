"""A real server on loopback for the tests (uvicorn in a thread, on a port the OS picks) and a
small HTTP client that sends many requests at once."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bitsmith.serving.served import ServedModel
from bitsmith.serving.server import ServeOptions, make_server


@dataclass(frozen=True)
class Answer:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return orjson.loads(self.body)


class LiveServer:
    """`with LiveServer(models, options) as server:` serves on 127.0.0.1:<free port>;
    `wait_ready` makes the context wait for readiness (else only for liveness)."""

    def __init__(self, models: Sequence[ServedModel], options: ServeOptions | None = None,
                 wait_ready: bool = True, llms: Sequence[Any] = ()) -> None:
        self.server = make_server(models, options, log_level="warning", llms=llms)
        self.state = self.server.state
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.wait_ready = wait_ready
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        path = "/v2/health/ready" if self.wait_ready else "/v2/health/live"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if get(self.url + path).status == 200:
                    return self
            except aiohttp.ClientError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the server at {self.url} did not come up")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def infer_url(self, model: str) -> str:
        """The model's infer endpoint."""
        return f"{self.url}/v2/models/{model}/infer"


def get(url: str) -> Answer:
    """GET url."""
    return asyncio.run(_requests([("GET", url, None)]))[0]


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> Answer:
    """POST body to url."""
    return asyncio.run(_requests([("POST", url, body)], headers))[0]


def post_many(url: str, bodies: Sequence[bytes]) -> list[Answer]:
    """POST every body at once (one connection each); the answers in order."""
    return asyncio.run(_requests([("POST", url, b) for b in bodies]))


async def _requests(calls: Sequence[tuple[str, str, bytes | None]],
                    headers: dict[str, str] | None = None) -> list[Answer]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(method: str, url: str, body: bytes | None) -> Answer:
            async with session.request(method, url, data=body, headers=headers) as r:
                return Answer(r.status, dict(r.headers), await r.read())
        return await asyncio.gather(*(one(*c) for c in calls))


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """The value of one sample in the server's registry (0 when it has none yet)."""
    value = server.state.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def answered(server: LiveServer, model: str) -> float:
    """Infer requests the server answered for `model`, whatever the status."""
    return sum(sample.value for family in server.state.metrics.registry.collect()
               for sample in family.samples
               if sample.name == "bitsmith_requests_total" and sample.labels["model"] == model)


def arrived(server: LiveServer, model: str) -> float:
    """Requests that reached `model`'s queue: waiting, started or refused as overload."""
    return (metric(server, "bitsmith_queue_depth", model=model)
            + metric(server, "bitsmith_queue_seconds_count", model=model)
            + metric(server, "bitsmith_requests_total", model=model, code="503",
                     reason="queue_full")
            + metric(server, "bitsmith_requests_total", model=model, code="503",
                     reason="standing_queue"))


def wait_for(condition: Callable[[], object], what: str, seconds: float = 60.0) -> None:
    """Poll until `condition()` holds; fail saying `what` never happened. The bound is only
    there so that a broken server fails the test instead of hanging it."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {seconds:g} s"
        time.sleep(0.01)


CLEAN_REFUSALS = {503: ("is full", "is overloaded", "is warming up", "shutting down"),
                  504: ("timed out after",)}
"""What the README documents a request may get instead of its outputs when the server is busy:
503 with Retry-After (queue full, overloaded, warming up, draining) or 504 (deadline passed)."""


def assert_refused_cleanly(answer: Answer) -> None:
    """A documented 503 (with Retry-After) or 504, whose error says which."""
    assert answer.status in CLEAN_REFUSALS, (answer.status, answer.body)
    if answer.status == 503:
        assert int(answer.headers["Retry-After"]) >= 1, answer.headers
    error = answer.json()["error"]
    assert any(why in error for why in CLEAN_REFUSALS[answer.status]), error
