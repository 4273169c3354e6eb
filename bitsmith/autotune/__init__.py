"""The autotuner: tasks, search, cost model, database and cache, and the runners that measure
candidates (`measure.LocalRunner` on this machine, `RayRunner` on a Ray cluster)."""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "RayRunner":  # its module imports Ray only when a runner is made
        from .ray_runner import RayRunner  # noqa: PLC0415

        return RayRunner
    raise AttributeError(f"module 'bitsmith.autotune' has no attribute {name!r}")
