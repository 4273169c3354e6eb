"""How the server loads an artifact: an LLM artifact as an OpenAI-API service, any other as a
batched KServe model; shared by `bitsmith serve` and its Ray Serve replicas."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LoadOptions:
    """How each artifact is served (the `serve` command's per-model options)."""

    max_batch: int = 32
    batch_sizes: tuple[int, ...] | None = None
    key: bytes | None = None
    kv_memory: int | None = None
    token_budget: int | None = None
    queue_size: int = 256
    prefix_cache: bool = False
    policy: str = "chunked"
    itl_slo: float | None = None


def load_served(path: str | Path, name: str, opts: LoadOptions) -> tuple[str, Any]:
    """An artifact as the server runs it: ("llm", LlmService) for an LLM artifact, else
    ("model", ServedModel)."""
    from ..llm.artifact import from_artifact  # noqa: PLC0415
    from ..runtime.artifact import load_artifact  # noqa: PLC0415 - TVM's runtime
    from ..runtime.host import host_description  # noqa: PLC0415
    from ..runtime.model import CompiledModel  # noqa: PLC0415
    from .openai_api import LlmService  # noqa: PLC0415
    from .served import ServedModel  # noqa: PLC0415

    artifact = load_artifact(path, host=host_description(), key=opts.key)
    if "llm" in artifact.manifest.metadata:
        llm = from_artifact(artifact, path, kv_memory=opts.kv_memory)
        return "llm", LlmService(name, llm, token_budget=opts.token_budget,
                                 max_batch=opts.max_batch, max_waiting=opts.queue_size,
                                 prefix_cache=opts.prefix_cache, policy=opts.policy,
                                 itl_slo=opts.itl_slo)
    return "model", ServedModel.from_compiled(name, CompiledModel(artifact),
                                              max_batch=opts.max_batch,
                                              batch_sizes=opts.batch_sizes)
