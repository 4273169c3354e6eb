"""`bitsmith serve --ray`: the server's app (KServe v2 and OpenAI routes, the same validation,
batching and metrics) as the replicas of a Ray Serve deployment (`pip install
'bitsmith[cluster]'`).

The artifacts travel to the replicas through Ray's object store by content: the driver puts
each file's bytes there with its SHA-256, and a replica checks the digest of what it got
before it writes and loads it (a mismatch is a `ServingError`, and that replica never
starts). Every replica serves every artifact, so the routes are the single-machine server's
own. `replicas` fixes their number; `autoscale=(low, high)` lets Ray Serve keep between low and
high of them, adding one when the requests in flight per replica pass `target_ongoing`.

With LLMs among the artifacts (`route="auto"`, or a `route` named), a gateway deployment is
the application's ingress: it reads each request's body, computes an LLM request's routing key
(`prefix_route`: hashes of its prompt's leading text) and hands the request to a replica
through a handle whose router (`ray_router`) sends requests sharing a prompt prefix to the
replica holding it (`prefix`), or each to the next replica (`round-robin`). The replica runs the
same app on the forwarded request and streams its response messages back. Without LLMs
(`direct`) the replicas are the ingress themselves: one hop less.

Nothing here imports Ray until a deployment is made.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import tempfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..errors import InvalidRequest, ServingError
from ..runtime.ray_cluster import join, ray_module
from .loading import LoadOptions, load_served
from .prefix_route import ROUTED_PATHS, describe
from .server import ServeOptions

APP_NAME = "bitsmith"
log = logging.getLogger("ray.serve")
ROUTES = ("auto", "direct", "prefix", "round-robin")
REPLICA_HEADER = b"x-bitsmith-replica"


def _ray() -> Any:
    return ray_module(ServingError, "serving on Ray")


@dataclass(frozen=True)
class Shipped:
    """An artifact in Ray's object store: its name, content digest, size and object ref."""

    name: str
    digest: str
    size: int
    ref: Any = field(compare=False)


def ship(artifacts: Sequence[tuple[str, str | Path]]) -> list[Shipped]:
    """Put each (name, path) artifact's bytes in the object store, with its digest."""
    ray = _ray()
    out = []
    for name, path in artifacts:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ServingError(f"cannot read artifact {path}: {exc}") from exc
        out.append(Shipped(name, hashlib.sha256(data).hexdigest(), len(data), ray.put(data)))
    return out


def fetch(shipped: Shipped, folder: Path) -> Path:
    """The artifact's bytes from the object store, checked against its digest, as a file in
    `folder`."""
    data = _ray().get(shipped.ref)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != shipped.size or digest != shipped.digest:
        raise ServingError(f"artifact '{shipped.name}' arrived with digest {digest[:16]} "
                           f"({len(data)} bytes), expected {shipped.digest[:16]} "
                           f"({shipped.size} bytes): not loading it")
    path = folder / f"{shipped.digest}.bsm"
    path.write_bytes(data)
    return path


def replica_app(shipped: Sequence[Shipped], load: LoadOptions, options: ServeOptions) -> Any:
    """The server's ASGI app over the shipped artifacts (what each replica runs)."""
    from .server import create_app  # noqa: PLC0415

    folder = Path(tempfile.mkdtemp(prefix="bitsmith-replica-"))
    models, llms = [], []
    for item in shipped:
        kind, served = load_served(fetch(item, folder), item.name, load)
        (llms if kind == "llm" else models).append(served)
    return create_app(models, options, llms)


@dataclass(frozen=True)
class Forwarded:
    """A request as the gateway hands it to a replica: its routing key (None: route by load
    alone), and what the replica's app needs of it."""

    key: tuple[bytes, ...] | None
    method: str
    path: str
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None


async def run_forwarded(app: Any, request: Forwarded) -> AsyncGenerator[Any, None]:
    """Run the ASGI `app` on a forwarded request: yields ("start", status, headers) and then
    the body's chunks as the app sends them. Closing the generator early (the client left)
    tells the app its client disconnected."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.path,
             "raw_path": request.path.encode(), "root_path": "", "query_string": request.query,
             "headers": [tuple(h) for h in request.headers], "client": request.client,
             "server": None}
    messages: asyncio.Queue[Any] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    ended = False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ("start", message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    ended = True
                    break
        if not ended:
            task.result()  # the app's own error, if it raised one
            raise ServingError(f"the app ended {request.method} {request.path} without a "
                               "complete response")
    finally:
        gone.set()  # the app sees the client leave (it cancels what the request holds)
        if ended:
            try:
                await task
            except Exception:  # after a whole response (a 500 from Starlette): log it only
                log.exception("%s %s raised after its response", request.method, request.path)
        elif not task.done():  # the client left: what does not listen for it is cancelled
            task.get_loop().call_later(ABANDON_GRACE_S, task.cancel)
            task.add_done_callback(_retrieved)


ABANDON_GRACE_S = 1.0
"""How long an app keeps a request whose client left (to hear it and clean up) before it is
cancelled."""


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Collect an abandoned app task's end (never "exception was never retrieved")."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a request whose client left ended with: %r", task.exception())


class _Forwarding:
    """Mixed into a replica behind the gateway (Serve's ASGI wrapper gives `app`)."""

    app: Any

    async def forward(self, request: Forwarded) -> AsyncIterator[Any]:
        """The response as it comes: its start, then its body's chunks."""
        from ray import serve  # noqa: PLC0415 - this runs in a replica

        tag = serve.get_replica_context().replica_id.unique_id.encode()
        async with contextlib.aclosing(run_forwarded(self.app, request)) as items:
            async for item in items:
                if isinstance(item, tuple):  # the response's start: say who answered
                    item = (*item[:2], [*item[2], (REPLICA_HEADER, tag)])
                yield item

    async def forward_whole(self, request: Forwarded) -> tuple[int, list[Any], bytes]:
        """The whole response at once (status, headers, body): one reply, not a stream."""
        items = [item async for item in self.forward(request)]
        _, status, headers = items[0]
        return status, headers, b"".join(items[1:])


class Gateway:
    """The ingress in front of routed replicas: reads the body within the server's limits
    (`BodyGate`, as `bitsmith serve` does), keys it, and relays the chosen replica's
    response."""

    def __init__(self, replicas: Any, options: ServeOptions) -> None:
        from .server import BodyGate  # noqa: PLC0415

        self.replicas, self.options = replicas, options
        self.bodies = BodyGate(options)
        self._sweep: asyncio.Task[None] | None = None

    async def __call__(self, request: Any) -> Any:
        from starlette.requests import ClientDisconnect  # noqa: PLC0415
        from starlette.responses import Response  # noqa: PLC0415

        if self._sweep is None:  # the body deadlines' sweep, on the loop requests run on
            self._sweep = asyncio.ensure_future(self.bodies.sweep())
        path = request.url.path
        try:
            body = await self.bodies.read(request)
        except InvalidRequest as exc:
            return _error(path, str(exc), exc.status)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is there to answer
        client = (request.client.host, request.client.port) if request.client else None
        key, streams = describe(path, body) if len(body) <= _INLINE_BYTES else \
            await asyncio.to_thread(describe, path, body)  # a large body: off the loop
        forwarded = Forwarded(key, request.method, path,
                              request.scope.get("query_string", b""),
                              tuple(request.scope.get("headers", ())), body, client)
        if not streams:  # one reply
            try:
                status, headers, content = await self.replicas.forward_whole.remote(forwarded)
            except Exception as exc:  # noqa: BLE001 - said in the answer's status
                return _failed(path, exc)
            response = Response(content, status)
            response.raw_headers = [(bytes(k), bytes(v)) for k, v in headers]
            return response
        return await self._stream(path, forwarded)

    async def _stream(self, path: str, forwarded: Forwarded) -> Any:
        from starlette.responses import StreamingResponse  # noqa: PLC0415

        stream = self.replicas.options(stream=True).forward.remote(forwarded)
        try:
            _, status, headers = await stream.__anext__()
        except Exception as exc:  # noqa: BLE001 - said in the answer's status
            stream.cancel()
            return _failed(path, exc)

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                stream.cancel()  # the client left: the replica's app hears it

        response = StreamingResponse(rest(), status_code=status)
        response.raw_headers = [(bytes(k), bytes(v)) for k, v in headers]
        return response


_INLINE_BYTES = 1 << 20
"""Bodies up to this size are keyed on the gateway's event loop; larger ones in a thread."""


def _failed(path: str, exc: BaseException) -> Any:
    """The answer when the replica did not give one: 503 (retry) when no replica could take
    the request, else 500; the details go to the log, not to the client."""
    from ray.exceptions import RayActorError  # noqa: PLC0415 - this runs in a replica
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError  # noqa: PLC0415

    if isinstance(exc, RayActorError | BackPressureError | DeploymentUnavailableError):
        log.warning("%s: no replica took the request: %s", path, exc)
        return _error(path, f"no replica could take the request ({type(exc).__name__}); "
                            "retry shortly", 503)
    log.error("%s: the replica failed on the request: %s", path, exc)
    return _error(path, "the replica failed on this request (see the replica's log)", 500)


def _error(path: str, message: str, status: int) -> Any:
    from starlette.responses import Response  # noqa: PLC0415

    if path in ROUTED_PATHS:
        from .openai_api import OpenAIError  # noqa: PLC0415

        return OpenAIError(message, status, kind="server_error" if status >= 500 else
                           "invalid_request_error").response()
    return Response(orjson.dumps({"error": message}), status,
                    headers={"Retry-After": "1"} if status == 503 else None,
                    media_type="application/json")


def resolve_route(route: str, artifacts: Sequence[tuple[str, str | Path]]) -> str:
    """`auto`: `prefix` when an artifact is an LLM, else `direct`."""
    if route not in ROUTES:
        raise ServingError(f"route: expected one of {', '.join(ROUTES)}, got {route!r}")
    if route != "auto":
        return route
    from ..runtime.artifact import read_manifest  # noqa: PLC0415

    llm = any("llm" in read_manifest(path).metadata for _, path in artifacts)
    return "prefix" if llm else "direct"


def application(shipped: Sequence[Shipped], load: LoadOptions, options: ServeOptions, *,
                replicas: int = 1, autoscale: tuple[int, int] | None = None,
                target_ongoing: int = 8, cpus: float = 1.0, route: str = "direct",
                slack: int = 4) -> Any:
    """The Ray Serve application: a deployment whose replicas each run `replica_app`, the
    ingress itself (`direct`) or behind a `Gateway` whose handle routes by `route` (`prefix`:
    to the replica holding the prompt's prefix while its queue is within `slack` requests of
    the shortest)."""
    _ray()
    from ray import serve  # noqa: PLC0415

    if replicas < 1:
        raise ServingError(f"replicas must be >= 1, got {replicas}")
    if autoscale is not None and not 1 <= autoscale[0] <= autoscale[1]:
        raise ServingError(f"autoscale expected 1 <= low <= high, got {autoscale}")
    if route not in ROUTES[1:]:
        raise ServingError(f"route: expected one of {', '.join(ROUTES[1:])}, got {route!r}")
    items, load_opts, serve_opts = list(shipped), load, options

    def build() -> Any:  # runs on each replica
        return replica_app(items, load_opts, serve_opts)

    scaling: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                "target_ongoing_requests": target_ongoing}}
        if autoscale is not None else {"num_replicas": replicas})
    if not cpus > 0:
        raise ServingError(f"cpus per replica must be > 0, got {cpus}")
    # a replica computes on the CPUs it reserves (as Ray sets OMP_NUM_THREADS for its actors)
    actor = {"num_cpus": cpus,
             "runtime_env": {"env_vars": {"TVM_NUM_THREADS": str(max(1, int(cpus)))}}}
    most = max(4 * target_ongoing, options.queue_size)
    common = {"max_ongoing_requests": most,
              "graceful_shutdown_timeout_s": options.drain_grace_ms / 1e3 + 5}
    if route == "direct":
        deployment = serve.deployment(name="Replica", ray_actor_options=actor,
                                      **common, **scaling)
        return deployment(serve.ingress(build)(type("Replica", (), {}))).bind()
    from ray.serve.config import RequestRouterConfig  # noqa: PLC0415

    from .ray_router import ROUTERS  # noqa: PLC0415 - imports Ray Serve

    if slack < 0:
        raise ServingError(f"slack must be >= 0 requests, got {slack}")
    router = RequestRouterConfig(request_router_class=ROUTERS[route],
                                 request_router_kwargs={"slack": slack} if route == "prefix"
                                 else {})
    replica = serve.deployment(name="Replica", ray_actor_options=actor,
                               request_router_config=router, **common, **scaling)
    most_replicas = autoscale[1] if autoscale is not None else replicas
    gateway = serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=most * most_replicas,
                               graceful_shutdown_timeout_s=common["graceful_shutdown_timeout_s"])
    return gateway(Gateway).bind(
        replica(serve.ingress(build)(type("Replica", (_Forwarding,), {}))).bind(), options)


def start(artifacts: Sequence[tuple[str, str | Path]], load: LoadOptions,
          options: ServeOptions, *, address: str | None = "auto", host: str = "127.0.0.1",
          port: int = 8000, route: str = "auto", **scaling: Any) -> None:
    """Deploy on the cluster at `address` (None: the Ray of this process) and return once the
    replicas are up."""
    route = resolve_route(route, artifacts)
    join(address, ServingError, "serving on Ray")
    from ray import serve  # noqa: PLC0415

    serve.start(http_options={"host": host, "port": port})
    serve.run(application(ship(artifacts), load, options, route=route, **scaling),
              name=APP_NAME, route_prefix="/")


def stop() -> None:
    """Delete the application (Serve lets each replica finish what it holds, up to its
    graceful-shutdown timeout); the cluster's Serve, and its other applications, stay."""
    _ray()
    from ray import serve  # noqa: PLC0415

    serve.delete(APP_NAME)


def serve_until_signalled(artifacts: Sequence[tuple[str, str | Path]], load: LoadOptions,
                          options: ServeOptions, **kwargs: Any) -> None:
    """`bitsmith serve --ray`: deploy, then wait for SIGTERM or Ctrl-C, then `stop` (also
    when the deployment failed or was interrupted)."""
    ray = _ray()
    try:
        start(artifacts, load, options, **kwargs)  # Ctrl-C here interrupts the deployment
    except BaseException:
        if ray.is_initialized():  # a deployment may be half made: take it down, keep the error
            with contextlib.suppress(Exception):
                stop()
        raise
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        done.wait()
    finally:
        try:
            stop()  # a second signal meanwhile (a supervisor repeating it) changes nothing
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
