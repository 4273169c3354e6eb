"""`bitsmith serve --ray`: the server's app (KServe v2 and OpenAI routes, the same validation,
batching and metrics) as the replicas of a Ray Serve deployment (`pip install
'bitsmith[cluster]'`).

The artifacts travel to the replicas through Ray's object store by content: the driver puts
each file's bytes there with its SHA-256, and a replica checks the digest of what it got
before it writes and loads it (a mismatch is a `ServingError`, and that replica never
starts). Every replica serves every artifact, so the routes are the single-machine server's
own. `replicas` fixes their number; `autoscale=(low, high)` lets Ray Serve keep between low and
high of them, adding one when the requests in flight per replica pass `target_ongoing`.

Nothing here imports Ray until a deployment is made.
"""
from __future__ import annotations

import contextlib
import hashlib
import signal
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ServingError
from ..runtime.ray_cluster import join, ray_module
from .loading import LoadOptions, load_served
from .server import ServeOptions

APP_NAME = "bitsmith"


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


def application(shipped: Sequence[Shipped], load: LoadOptions, options: ServeOptions, *,
                replicas: int = 1, autoscale: tuple[int, int] | None = None,
                target_ongoing: int = 8, cpus: float = 1.0) -> Any:
    """The Ray Serve application: one deployment whose replicas each run `replica_app`."""
    _ray()
    from ray import serve  # noqa: PLC0415

    if replicas < 1:
        raise ServingError(f"replicas must be >= 1, got {replicas}")
    if autoscale is not None and not 1 <= autoscale[0] <= autoscale[1]:
        raise ServingError(f"autoscale expected 1 <= low <= high, got {autoscale}")
    items, load_opts, serve_opts = list(shipped), load, options

    def build() -> Any:  # runs on each replica
        return replica_app(items, load_opts, serve_opts)

    scaling: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                "target_ongoing_requests": target_ongoing}}
        if autoscale is not None else {"num_replicas": replicas})
    deployment = serve.deployment(name="Replica", ray_actor_options={"num_cpus": cpus},
                                  max_ongoing_requests=max(4 * target_ongoing,
                                                           options.queue_size),
                                  graceful_shutdown_timeout_s=options.drain_grace_ms / 1e3 + 5,
                                  **scaling)
    return deployment(serve.ingress(build)(type("Replica", (), {}))).bind()


def start(artifacts: Sequence[tuple[str, str | Path]], load: LoadOptions,
          options: ServeOptions, *, address: str | None = "auto", host: str = "127.0.0.1",
          port: int = 8000, **scaling: Any) -> None:
    """Deploy on the cluster at `address` (None: the Ray of this process) and return once the
    replicas are up."""
    join(address, ServingError, "serving on Ray")
    from ray import serve  # noqa: PLC0415

    serve.start(http_options={"host": host, "port": port})
    serve.run(application(ship(artifacts), load, options, **scaling), name=APP_NAME,
              route_prefix="/")


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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop()
