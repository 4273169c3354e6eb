"""Joining a Ray cluster (the `cluster` extra), for the Ray runner and Ray Serve deployments:
Ray is imported here, only when one of them is made."""
from __future__ import annotations

import socket
from typing import Any

from ..errors import BitsmithError


def ray_module(error: type[BitsmithError], needs: str) -> Any:
    """`ray`, or `error` saying that `needs` wants the `cluster` extra."""
    try:
        import ray  # noqa: PLC0415 - the optional `cluster` extra, loaded on use only
    except ImportError as exc:
        raise error(f"{needs} needs Ray: pip install 'bitsmith[cluster]'") from exc
    return ray


def join(address: str | None, error: type[BitsmithError], needs: str) -> Any:
    """`ray`, connected to the cluster at `address` ("auto", "ray://host:10001") unless this
    process already is; None joins only a Ray this process initialised (else `error`)."""
    ray = ray_module(error, needs)
    if ray.is_initialized():
        return ray
    if address is None:
        raise error(f"{needs} with address None joins the Ray of this process, and ray.init() "
                    "has not run: give an address ('auto')")
    _check_reachable(address, error, needs)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise error(f"no Ray cluster at {address!r}: start one with 'ray start --head' or give "
                    f"its address ({exc})") from exc
    return ray


def _check_reachable(address: str, error: type[BitsmithError], needs: str,
                     timeout_s: float = 5.0) -> None:
    """A HOST:PORT address ("ray://" or a head's GCS) must accept a connection within
    `timeout_s`: Ray itself retries an absent cluster for minutes before it says so."""
    if address in ("auto", "local"):
        return  # Ray finds (or not) the cluster this machine started, at once
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise error(f"{needs}: expected a Ray address 'auto', 'HOST:PORT' or "
                    f"'ray://HOST:PORT', got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise error(f"no Ray cluster at {address!r}: nothing accepts connections at "
                    f"{host}:{port} ({exc}); start one with 'ray start --head' there or give "
                    "its address") from None
