"""The HTTP server: KServe v2 (Open Inference Protocol) over Starlette and uvicorn.

Starlette rather than FastAPI on top of it: the routes take raw bodies (the KServe codec checks
them itself, to say expected vs got), and FastAPI's per-request middleware (body limits,
telemetry, dependency resolution) cost a fifth of the server's time under load.

Endpoints: `/v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}`,
`/v2/models/{name}/ready`, `POST /v2/models/{name}/infer` (JSON tensors) and `/metrics`
(Prometheus). Errors are `{"error": message}` with the status that says what went wrong:
- 400: the request cannot be served as sent (bad JSON, names, shapes, datatypes, values,
  an index out of range of the table it indexes);
- 404: no such model; 413: the body is over the size limit;
- 503 with Retry-After: the queue is full, the model is warming up, or the server is draining;
- 504: the request's deadline passed (unrun if it was still queued);
- 500: the model failed on this request (its batch-mates were re-run without it).

SIGTERM (or Ctrl-C): readiness turns false, the listening socket closes, every request already
accepted (queued or running) is answered, then the process exits.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import IndexOutOfRangeError, ServingError
from .batcher import Batcher, DeadlineExceeded, QueueFull
from .kserve import InvalidRequest, decode_request, encode_response
from .metrics import ServerMetrics
from .served import ServedModel

log = logging.getLogger("uvicorn.error")  # printed with, and like, uvicorn's own lines
VERSION = "0.1.0"
GIL_SWITCH_SECONDS = 1e-4


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How the server batches and protects itself."""

    max_delay_ms: float = 2.0
    queue_size: int = 256
    timeout_ms: float = 1000.0
    max_body_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_delay_ms", "timeout_ms"):
            if getattr(self, name) < 0:
                raise ServingError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("queue_size", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ServingError(f"{name} must be >= 1, got {getattr(self, name)}")


class ServerState:
    """The models' batchers, the metrics and whether the server drains."""

    def __init__(self, models: Sequence[ServedModel], options: ServeOptions) -> None:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ServingError(f"two models are named {', '.join(dup)}; give each its own name "
                             "(--name)")
        self.models = {m.name: m for m in models}
        self.options = options
        self.metrics = ServerMetrics()
        self.batchers: dict[str, Batcher] = {}
        self.draining = False

    @property
    def ready(self) -> bool:
        """Every model warmed up and the server not draining."""
        return (not self.draining and len(self.batchers) == len(self.models)
                and all(b.ready for b in self.batchers.values()))

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
        warmups = [asyncio.create_task(self._warm_up(name, b))
                   for name, b in self.batchers.items()]
        try:
            yield
        finally:
            for task in warmups:
                task.cancel()
            await asyncio.gather(*warmups, return_exceptions=True)
            await asyncio.gather(*(b.close() for b in self.batchers.values()))
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


def _json(doc: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers=dict(headers or {}),
                    media_type="application/json")


def create_app(models: Sequence[ServedModel], options: ServeOptions | None = None) -> Starlette:
    """The ASGI app serving `models` (run it with uvicorn, or `serve`)."""
    state = ServerState(models, options or ServeOptions())

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

    routes = [Route("/v2", server_metadata), Route("/v2/health/live", live),
              Route("/v2/health/ready", ready), Route("/v2/models/{name}", model_metadata),
              Route("/v2/models/{name}/ready", model_ready),
              Route("/v2/models/{name}/infer", infer, methods=["POST"]),
              Route("/metrics", metrics)]
    app = Starlette(routes=routes, lifespan=state.lifespan)
    app.state.bitsmith = state
    return app


def _unknown(state: ServerState, name: str) -> Response:
    served = ", ".join(sorted(state.models)) or "none"
    return _json({"error": f"model '{name}' is not served here; served: {served}"}, 404)


async def _infer(state: ServerState, name: str, request: Request) -> Response:
    model = state.models.get(name)
    metrics = state.metrics
    if model is None:  # not labelled by the name asked for: clients could grow the series
        metrics.answered("", 404, "unknown_model")
        return _unknown(state, name)
    batcher = state.batchers[name]
    if state.draining or not batcher.ready:
        reason = "draining" if state.draining else "not_ready"
        metrics.answered(name, 503, reason)
        message = ("the server is shutting down" if state.draining
                   else f"model '{name}' is warming up; wait for /v2/models/{name}/ready")
        return _json({"error": message}, 503, {"Retry-After": "1"})
    refused = batcher.refusal()
    if refused is not None:  # refuse before paying for the JSON
        return _queue_full(state, name, refused)
    try:
        body = await _read_body(request, state.options.max_body_bytes)
        decoded = decode_request(body, model.signature)
        rows = model.rows_of(decoded.arrays)
    except InvalidRequest as exc:
        metrics.answered(name, exc.status, "too_large" if exc.status == 413 else "invalid")
        return _json({"error": str(exc)}, exc.status)
    start = time.monotonic()
    try:
        pending = batcher.submit(decoded.arrays, rows)
    except QueueFull as exc:
        return _queue_full(state, name, exc)
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
    specs = [model.outputs[i] for i in decoded.outputs]
    body = encode_response(name, decoded.id, specs, [outs[i] for i in decoded.outputs])
    metrics.answered(name, 200, "ok")
    return Response(body, 200, media_type="application/json")


def _queue_full(state: ServerState, name: str, exc: QueueFull) -> Response:
    state.metrics.answered(name, 503, "queue_full")
    return _json({"error": str(exc)}, 503, {"Retry-After": str(exc.retry_after)})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(f"body of {int(declared)} bytes is over the limit of {limit} bytes "
                             "(--max-body-mb)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidRequest(f"body is over the limit of {limit} bytes (--max-body-mb)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT first marks the app as draining (readiness
    false, new infer requests on open connections refused) and then shuts down gracefully:
    uvicorn closes the listening socket and waits for every request in progress."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:  # noqa: D102 - uvicorn's hook
        if sig in (signal.SIGTERM, signal.SIGINT) and not self.state.draining:
            self.state.draining = True
            queued = sum(b.depth for b in self.state.batchers.values())
            log.info("draining: %d queued request(s) to finish", queued)
        super().handle_exit(sig, frame)


def make_server(models: Sequence[ServedModel], options: ServeOptions | None = None, *,
                host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                access_log: bool = False) -> DrainingServer:
    """A uvicorn server for `models`, not yet started (`.run()` blocks until it has drained)."""
    app = create_app(models, options)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, timeout_keep_alive=30)
    return DrainingServer(config, app.state.bitsmith)
