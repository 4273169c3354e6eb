"""Joining a Ray cluster (the `cluster` extra), for the Ray runner and Ray Serve deployments:
Ray is imported here, only when one of them is made."""
from __future__ import annotations

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
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise error(f"no Ray cluster at {address!r}: start one with 'ray start --head' or give "
                    f"its address ({exc})") from exc
    return ray
