"""The HTTP server: KServe v2 (Open Inference Protocol) over Starlette and uvicorn.

Starlette rather than FastAPI on top of it: the routes take raw bodies (the KServe codec checks
them itself, to say expected vs got), and FastAPI's per-request middleware (body limits,
telemetry, dependency resolution) cost a fifth of the server's time under load.

Endpoints: `/v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}`,
`/v2/models/{name}/ready`, `POST /v2/models/{name}/infer` (JSON tensors) and `/metrics`
(Prometheus). Errors are `{"error": message}` with the status that says what went wrong (the
metrics' `reason` label in brackets):
- 400: the request cannot be served as sent (bad JSON, names, shapes, datatypes, values, an
  output asked for twice, an index out of range of the table it indexes) [invalid];
- 404: no such model [unknown_model];
- 408 (and the connection closed): the body did not arrive within --body-timeout-s plus one
  second per --min-body-rate-kb KiB of it [body_timeout]; request headers that do not arrive
  within --header-timeout-s get a 408 too, from the protocol (no model to count it for);
- 413: the body is over --max-body-mb [too_large], or the response could be over
  --max-response-mb (its size bound is checked before encoding) [response_too_large];
- 503 with Retry-After: the queue is full [queue_full], a request queued now would likely
  time out [standing_queue], the model is warming up [warming], the server is draining
  [draining], or the bodies being read would hold over --max-pending-body-mb with this one
  (counted from the Content-Length, before reading it, or as a chunked body arrives)
  [body_budget];
- 504: the request's deadline passed (unrun if it was still queued) [timeout];
- 500: the model failed on this request (its batch-mates were re-run without it) [failed].
A client that leaves before its body arrived is counted as 499 [disconnected].

Hostile clients: bodies over 1 MiB (and responses) are decoded (encoded) in a worker process,
as orjson and numpy hold the GIL for a whole parse (the workers die with the server, and never
re-run the script that started it). uvicorn times out only idle keep-alive connections: the
protocol here also times out request headers that do not arrive. There is no cap on
connections (uvicorn's `limit_concurrency` counts idle keep-alive connections, and would refuse
every client while stalled ones hold it); the timeouts free stalled sockets instead.

SIGTERM (or Ctrl-C): the server drains at once (readiness false, new infer requests answered
503, every response says `Connection: close`); for --drain-grace-ms the listener and
connections stay open, so that a request already written to a keep-alive connection is answered
rather than reset; then the listening socket closes (the accept queue answered 503), every
request already accepted (queued or running) is answered, and the process exits. A second
signal ends the grace at once. The HTTP layer (header timeouts and size, the drain) is in
`connections`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import IndexOutOfRangeError, ServingError
from ..runtime.processes import without_main, worker_pool
from . import openai_api
from .batcher import Batcher, DeadlineExceeded, QueueFull, StandingQueue
from .connections import DrainingServer, HeaderTimeoutHttp
from .kserve import (
    InferRequest,
    InvalidRequest,
    decode_request,
    encode_response,
    response_bytes_bound,
)
from .metrics import LlmObserver, ServerMetrics
from .openai_api import LlmService
from .served import ServedModel

log = logging.getLogger("uvicorn.error")  # printed with, and like, uvicorn's own lines
VERSION = "0.1.0"
GIL_SWITCH_SECONDS = 1e-4
OFFLOAD_BYTES = 2**20
"""Bodies and responses over this size are decoded and encoded in a worker process."""
OFFLOAD_WORKERS = 2
BODY_SWEEP_SECONDS = 0.1
ORJSON_SAFE = (3, 9, 15)
"""Older orjson overflows its stack on deeply nested JSON and kills the process
(CVE-2024-27454); from 3.9.15 it refuses nesting deeper than 1024 with a JSONDecodeError."""
_STATUS_REASONS = {408: "body_timeout", 413: "too_large", 503: "body_budget"}
_STATUS_HEADERS = {503: {"Retry-After": "1"}}
"""Refused while reading the body (408, 413, 503): no `Connection: close`, on which uvicorn
would close at once and, with the body's bytes unread, reset the answer away; the protocol
ends a connection answered before its body was read (`connections.HeaderTimeoutHttp`)."""
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How the server batches and protects itself."""

    max_delay_ms: float = 2.0
    queue_size: int = 256
    timeout_ms: float = 1000.0
    max_body_bytes: int = 64 * 2**20
    max_response_bytes: int = 64 * 2**20  # bounds the JSON every number at its widest could take
    body_timeout_s: float = 10.0  # the body's deadline: this, plus a second per min_body_rate
    min_body_rate: int = 64 * 2**10  # bytes per second: a client this fast never times out
    header_timeout_s: float = 10.0  # from connecting, or a request's first byte, to its headers
    max_pending_body_bytes: int = 1024 * 2**20  # all the bodies being read at once, together
    drain_grace_ms: float = 500.0  # on SIGTERM, draining but still listening

    def __post_init__(self) -> None:
        for name in ("max_delay_ms", "timeout_ms", "drain_grace_ms"):
            if getattr(self, name) < 0:
                raise ServingError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("body_timeout_s", "header_timeout_s"):
            if getattr(self, name) <= 0:
                raise ServingError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("queue_size", "max_body_bytes", "max_response_bytes", "min_body_rate",
                     "max_pending_body_bytes"):
            if getattr(self, name) < 1:
                raise ServingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_pending_body_bytes < self.max_body_bytes:  # that body would never be read
            raise ServingError(f"max_pending_body_bytes must be >= max_body_bytes "
                               f"({self.max_body_bytes}), got {self.max_pending_body_bytes}; "
                               "raise --max-pending-body-mb or lower --max-body-mb")


class ServerState:
    """The models' batchers, the metrics and whether the server drains."""

    def __init__(self, models: Sequence[ServedModel], options: ServeOptions,
                 llms: Sequence[LlmService] = ()) -> None:
        names = [m.name for m in models] + [s.name for s in llms]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ServingError(f"two models are named {', '.join(dup)}; give each its own name "
                             "(--name)")
        self.models = {m.name: m for m in models}
        self.llms = {s.name: s for s in llms}
        self.options = options
        self.metrics = ServerMetrics()
        for service in llms:
            service.scheduler.observer = LlmObserver(self.metrics, service.name)
        self.batchers: dict[str, Batcher] = {}
        self.offload = Offload(OFFLOAD_WORKERS)
        self.bodies = BodyGate(options)
        self.draining = False

    @property
    def pending_body(self) -> int:
        """Bytes of the bodies being read (declared or arrived)."""
        return self.bodies.pending

    @property
    def ready(self) -> bool:
        """Every model warmed up and the server not draining."""
        return (not self.draining and len(self.batchers) == len(self.models)
                and all(b.ready for b in self.batchers.values())
                and all(s.ready for s in self.llms.values()))

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Start a batcher per model and warm them up in the background (the server answers
        liveness meanwhile); on shutdown, stop the batchers once their queues are empty."""
        opts = self.options
        self.batchers = {name: Batcher(m, self.metrics, max_delay=opts.max_delay_ms / 1e3,
                                       queue_size=opts.queue_size, timeout=opts.timeout_ms / 1e3)
                         for name, m in self.models.items()}
        # Kernels release the GIL, and each must take it back to return; with Python's default
        # 5 ms switch interval a worker waits up to that long per kernel while the loop parses
        # requests (measured: batched throughput 2.7k -> 4.6k req/s on bert at 1e-4)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        for b in self.batchers.values():
            b.start()
        for service in self.llms.values():
            service.start()
        tasks = [asyncio.create_task(self._warm_up(name, b)) for name, b in self.batchers.items()]
        tasks += [asyncio.create_task(self._warm_up_llm(s)) for s in self.llms.values()]
        tasks.append(asyncio.create_task(self.bodies.sweep()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(b.close() for b in self.batchers.values()),
                                 *(s.close() for s in self.llms.values()))
            await self.offload.close()
            sys.setswitchinterval(switch)

    async def _warm_up(self, name: str, batcher: Batcher) -> None:
        start = time.perf_counter()
        try:
            await batcher.warm_up()
        except Exception:
            log.exception("warming up model %s failed; it stays not ready", name)
            return
        sizes = ", ".join(map(str, self.models[name].sizes)) or "its own shapes"
        log.info("model %s ready (batch sizes %s warmed up in %.1f s)", name, sizes,
                 time.perf_counter() - start)


    async def _warm_up_llm(self, service: LlmService) -> None:
        start = time.perf_counter()
        try:
            await service.warm_up()
        except Exception:
            log.exception("warming up LLM %s failed; it stays not ready", service.name)
            return
        log.info("LLM %s ready (%.1f s)", service.name, time.perf_counter() - start)


class Offload:
    """Worker processes (started on first use) for decoding and encoding too long for the
    event loop. Not threads: orjson and numpy hold the GIL for the whole of a parse (1.1 s for
    57 MiB of JSON, measured), so a thread would block the loop as much. The body goes to the
    worker and the arrays come back pickled: memory copies, during which the loop runs."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args) in a worker process; what fn raises is raised here (InvalidRequest with its
        status), ServingError if the worker died."""
        if self._pool is None:  # spawn: the server's threads make fork unsafe
            self._pool = worker_pool(self.workers)  # workers die with the server, even kill -9
        pool = self._pool
        try:
            with without_main():  # workers start at a submit: never re-run the main script
                future = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
            return await future
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None  # the next request gets fresh workers
            pool.shutdown(wait=False)
            raise ServingError("the worker process that decodes and encodes large bodies "
                               "died; retry: the next request starts a new one") from None

    async def close(self) -> None:
        """Stop the workers, if any started."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


class CloseWhenDraining:
    """ASGI middleware: once the server drains, every response says `Connection: close`, so
    that clients send their next request elsewhere and no keep-alive connection is idle (where
    a request could cross the server's close) when the grace ends. Requests that arrived before
    the drain began pass untouched (nothing per request while serving): `DrainingServer` tells
    their connections not to keep alive, and uvicorn then says `Connection: close` itself."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.state.draining:
            await self.app(scope, receive, send)
            return
        state = self.state

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and state.draining:
                headers = list(message.get("headers", ()))
                if (b"connection", b"close") not in headers:
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


def _check_orjson() -> None:
    version = tuple(int(part) for part in re.findall(r"\d+", orjson.__version__)[:3])
    if version < ORJSON_SAFE:
        raise ServingError(f"orjson {orjson.__version__} crashes the server on deeply nested "
                           "JSON (CVE-2024-27454); expected orjson >= 3.9.15: pip install "
                           "'orjson>=3.9.15'")


def _json(doc: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers=dict(headers or {}),
                    media_type="application/json")


def create_app(models: Sequence[ServedModel], options: ServeOptions | None = None,
               llms: Sequence[LlmService] = ()) -> Starlette:
    """The ASGI app serving `models` (KServe v2) and `llms` (OpenAI's API); run it with
    uvicorn, or `serve`."""
    _check_orjson()
    state = ServerState(models, options or ServeOptions(), llms)

    async def server_metadata(_request: Request) -> Response:
        return _json({"name": "bitsmith", "version": VERSION, "extensions": []})

    async def live(_request: Request) -> Response:
        return _json({"live": True})

    async def ready(_request: Request) -> Response:
        return _json({"ready": state.ready}, 200 if state.ready else 503)

    async def model_metadata(request: Request) -> Response:
        name = request.path_params["name"]
        model = state.models.get(name)
        if model is None:
            return _unknown(state, name)
        return _json(model.signature.metadata(name))

    async def model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in state.models:
            return _unknown(state, name)
        batcher = state.batchers.get(name)
        ok = batcher is not None and batcher.ready and not state.draining
        return _json({"name": name, "ready": ok}, 200 if ok else 503)

    async def infer(request: Request) -> Response:
        return await _infer(state, request.path_params["name"], request)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def read_body(request: Request) -> bytes:
        return await state.bodies.read(request)

    async def openai_models(_request: Request) -> Response:
        return openai_api.models_response(state.llms)

    async def completions(request: Request) -> Response:
        return await openai_api.handle(request, state.llms, chat=False,
                                       draining=state.draining, metrics=state.metrics,
                                       read_body=read_body)

    async def chat_completions(request: Request) -> Response:
        return await openai_api.handle(request, state.llms, chat=True,
                                       draining=state.draining, metrics=state.metrics,
                                       read_body=read_body)

    async def health(_request: Request) -> Response:
        return _json({"ready": state.ready}, 200 if state.ready else 503)

    routes = [Route("/v1/models", openai_models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/health", health),
              Route("/v2", server_metadata), Route("/v2/health/live", live),
              Route("/v2/health/ready", ready), Route("/v2/models/{name}", model_metadata),
              Route("/v2/models/{name}/ready", model_ready),
              Route("/v2/models/{name}/infer", infer, methods=["POST"]),
              Route("/metrics", metrics)]
    app = Starlette(routes=routes, lifespan=state.lifespan,
                    middleware=[Middleware(CloseWhenDraining, state=state)])
    app.state.bitsmith = state
    return app


def _unknown(state: ServerState, name: str) -> Response:
    served = ", ".join(sorted(state.models)) or "none"
    shown = name if len(name) <= 64 else name[:61] + "..."
    return _json({"error": f"model '{shown}' is not served here; served: {served}"}, 404)


async def _infer(state: ServerState, name: str, request: Request) -> Response:
    model = state.models.get(name)
    metrics = state.metrics
    if model is None:  # not labelled by the name asked for: clients could grow the series
        metrics.answered("", 404, "unknown_model")
        return _unknown(state, name)
    batcher = state.batchers[name]
    if state.draining or not batcher.ready:
        reason = "draining" if state.draining else "warming"
        metrics.answered(name, 503, reason)
        message = ("the server is shutting down; send to another replica" if state.draining
                   else f"model '{name}' is warming up; wait for /v2/models/{name}/ready")
        return _json({"error": message}, 503, {"Retry-After": "1"})
    refused = batcher.refusal()
    if refused is not None:  # refuse before paying for the JSON
        return _refuse(state, name, refused)
    try:
        body = await state.bodies.read(request)
        if len(body) > OFFLOAD_BYTES:
            decoded = await state.offload.run(decode_request, body, model.signature)
        else:
            decoded = decode_request(body, model.signature)
        rows = model.rows_of(decoded.arrays)
    except InvalidRequest as exc:
        metrics.answered(name, exc.status, _STATUS_REASONS.get(exc.status, "invalid"))
        return _json({"error": str(exc)}, exc.status, _STATUS_HEADERS.get(exc.status))
    except ClientDisconnect:  # nobody is there to answer, and it is no server error
        metrics.answered(name, 499, "disconnected")
        return Response(status_code=499)
    except ServingError as exc:  # the offload worker died
        metrics.answered(name, 500, "failed")
        return _json({"error": str(exc)}, 500)
    start = time.monotonic()
    try:
        pending = batcher.submit(decoded.arrays, rows)
    except QueueFull as exc:
        return _refuse(state, name, exc)
    try:
        outs = await pending.future
    except DeadlineExceeded as exc:
        metrics.answered(name, 504, "timeout")
        what = "waiting in the queue; it was not run" if exc.unrun else "running; result discarded"
        return _json({"error": f"timed out after {state.options.timeout_ms:g} ms {what} "
                               "(raise --timeout-ms, lower the load or add replicas)"}, 504)
    except IndexOutOfRangeError as exc:  # the request's indices, not the model, are wrong
        metrics.answered(name, 400, "invalid")
        return _json({"error": f"model '{name}' cannot take this request: {exc}"}, 400)
    except Exception as exc:  # noqa: BLE001 - this request failed alone; say how
        metrics.answered(name, 500, "failed")
        return _json({"error": f"model '{name}' failed on this request: "
                               f"{type(exc).__name__}: {exc}"}, 500)
    metrics.latency.labels(name).observe(time.monotonic() - start)
    return await _answer(state, model, decoded, outs)


async def _answer(state: ServerState, model: ServedModel, decoded: InferRequest,
                  outs: Sequence[np.ndarray]) -> Response:
    """The outputs asked for, unless their JSON could be over the response limit (413)."""
    specs = [model.outputs[i] for i in decoded.outputs]
    arrays = [outs[i] for i in decoded.outputs]
    limit = state.options.max_response_bytes
    bound = response_bytes_bound(model.name, decoded.id, specs, arrays)
    if bound > limit:
        state.metrics.answered(model.name, 413, "response_too_large")
        return _json({"error": f"the response could take up to {bound} bytes of JSON, over the "
                               f"limit of {limit} bytes (--max-response-mb); send fewer rows, "
                               "ask for fewer outputs ('outputs') or raise --max-response-mb"},
                     413)
    try:
        if bound > OFFLOAD_BYTES:
            body = await state.offload.run(encode_response, model.name, decoded.id, specs,
                                           arrays)
        else:
            body = encode_response(model.name, decoded.id, specs, arrays)
    except ServingError as exc:  # the offload worker died
        state.metrics.answered(model.name, 500, "failed")
        return _json({"error": str(exc)}, 500)
    state.metrics.answered(model.name, 200, "ok")
    return Response(body, 200, media_type="application/json")


def _refuse(state: ServerState, name: str, exc: QueueFull) -> Response:
    reason = "standing_queue" if isinstance(exc, StandingQueue) else "queue_full"
    state.metrics.answered(name, 503, reason)
    return _json({"error": str(exc)}, 503, {"Retry-After": str(exc.retry_after)})


class BodyGate:
    """The request bodies being read: each read within its deadline (`read`), the bytes they
    hold together within `max_pending_body_bytes`; `sweep` (a task) expires the deadlines.
    The server and the Ray gateway read every body through one."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.reading: dict[asyncio.Timeout, float] = {}  # bodies being read: their deadlines
        self.pending = 0  # bytes of the bodies being read (declared or arrived)

    async def sweep(self) -> None:
        """Time out the body reads past their deadline, every BODY_SWEEP_SECONDS: one sweep
        rather than a timer per request, which costs every request ~5 us in the loop's heap."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(BODY_SWEEP_SECONDS)
            now = loop.time()
            for timer in [t for t, deadline in self.reading.items() if deadline <= now]:
                del self.reading[timer]
                timer.reschedule(now)  # the read raises TimeoutError on the loop's next turn

    async def read(self, request: Request) -> bytes:
        """The body, refusing (413) one over the size limit before reading it all, and (408)
        one that does not arrive within `body_timeout_s` plus a second per `min_body_rate`
        bytes of it received (a client sending that fast never times out; a stalled one, or
        a Content-Length longer than the body, is answered at that deadline). The bodies being
        read together hold at most `max_pending_body_bytes` (503 over it): each is counted
        from its Content-Length, before any byte is read, or as its chunks arrive. A client
        that leaves raises Starlette's `ClientDisconnect`."""
        options, reading = self.options, self.reading
        limit, timeout, rate = options.max_body_bytes, options.body_timeout_s, options.min_body_rate
        declared = request.headers.get("content-length")
        whole = int(declared) if declared is not None and declared.isdigit() else -1
        if whole > limit:
            raise InvalidRequest(f"body of {whole} bytes is over the limit of {limit} bytes "
                                 "(--max-body-mb)", 413)
        charged = whole if whole > 0 else 0  # before any byte is read: refused at once if over
        if self.pending + charged > options.max_pending_body_bytes:
            raise self._over_budget(charged, charged)
        self.pending += charged
        chunks, size = [], 0
        start = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(None) as timer:  # expired by `sweep`
                reading[timer] = start + timeout
                try:
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > limit:
                            raise InvalidRequest(f"body is over the limit of {limit} bytes "
                                                 "(--max-body-mb)", 413)
                        if size > charged:  # no Content-Length: counted as it arrives
                            if self.pending + size - charged > options.max_pending_body_bytes:
                                raise self._over_budget(size - charged, size)
                            self.pending += size - charged
                            charged = size
                        chunks.append(chunk)
                        if size != whole and timer in reading:  # more to come, not yet expired
                            reading[timer] = start + timeout + size / rate
                finally:
                    reading.pop(timer, None)
        except TimeoutError:
            expected = f"{declared} bytes" if declared is not None else "the whole body"
            raise InvalidRequest(f"timed out reading the body: expected {expected} within "
                                 f"{timeout:g} s plus 1 s per {rate / 1024:g} KiB, got {size} "
                                 "bytes (--body-timeout-s, --min-body-rate-kb); send the body "
                                 "as fast as the headers, and a Content-Length equal to its "
                                 "size", 408) from None
        finally:
            self.pending -= charged
        return b"".join(chunks)

    def _over_budget(self, more: int, body: int) -> InvalidRequest:
        """The 503 for a body (`body` bytes, `more` not yet counted) that would take the bodies
        being read over --max-pending-body-mb."""
        return InvalidRequest(f"the request bodies being read would hold {self.pending + more}"
                              f" bytes with this one ({body} bytes): expected at most "
                              f"{self.options.max_pending_body_bytes} (--max-pending-body-mb); "
                              "retry later or send to another replica", 503)


def make_server(models: Sequence[ServedModel], options: ServeOptions | None = None, *,
                host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                access_log: bool = False, llms: Sequence[LlmService] = ()) -> DrainingServer:
    """A uvicorn server for `models` and `llms`, not yet started (`.run()` blocks until it has
    drained)."""
    app = create_app(models, options, llms)
    state: ServerState = app.state.bitsmith
    protocol = type("HeaderTimeoutHttp", (HeaderTimeoutHttp,),
                    {"header_timeout": state.options.header_timeout_s})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, timeout_keep_alive=30, http=protocol)
    return DrainingServer(config, state)
