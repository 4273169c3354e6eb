"""An LLM as one `.bsm` artifact: every compiled step, the weights once, the tokenizer, the
chat template and the generation defaults (runtime side: no compiler, no torch).

It is an ordinary artifact (`runtime.artifact`: digest, optional signature, checked members)
whose manifest's `metadata["llm"]` lists the steps: each with its sizes, signature, execution
plan and kernel library. The weights are stored once for all steps (they share names), and
`load` hands each step a view of the artifact with its own plan, which `check_plan` checks
before any library is loaded.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import ArtifactError, InputError
from ..runtime.artifact import Artifact, Manifest, TensorSpec, load_artifact, save_artifact
from ..runtime.executor import Executor
from ..runtime.host import host_description
from ..runtime.plan_check import check_plan
from .api import LLM
from .engine import CacheLayout, Engine, Entry
from .text import TextError, Tokenizer

LLM_FORMAT = 1
MAX_ENTRIES = 64
_INT_FIELDS = ("tokens", "batch", "rows", "page_slots")


def save(llm: LLM, path: str | os.PathLike, *, key: bytes | str | None = None) -> None:
    """Write `llm` as one `.bsm` file (signed with `key` if given)."""
    weights: dict[str, np.ndarray] = {}
    libraries: dict[str, bytes] = {}
    entries: list[dict[str, Any]] = []
    first: Manifest | None = None
    for i, entry in enumerate(llm.engine.entries):
        artifact: Artifact = entry.executor.artifact
        manifest = artifact.manifest
        first = first or manifest
        renamed = {name: f"e{i}_{name}" for name in artifact.libraries}
        libraries.update({renamed[n]: data for n, data in artifact.libraries.items()})
        for name, array in artifact.weights.items():
            held = weights.setdefault(name, array)
            if held.shape != array.shape or held.dtype != array.dtype:
                raise ArtifactError(f"steps disagree on weight {name!r}: {held.shape} "
                                    f"{held.dtype} vs {array.shape} {array.dtype}")
        plan = dict(manifest.plan)
        plan["steps"] = [{**s, "library": renamed[s["library"]]} for s in plan["steps"]]
        entries.append({**{k: getattr(entry, k) for k in _INT_FIELDS},
                        "inputs": [s.to_json() for s in manifest.inputs],
                        "outputs": [s.to_json() for s in manifest.outputs], "plan": plan})
    assert first is not None  # an Engine has at least one entry
    layout = llm.engine.layout
    meta = {"format": LLM_FORMAT, "name": llm.name, "entries": entries,
            "cache": {"layers": layout.layers, "kv_heads": layout.kv_heads,
                      "page_size": layout.page_size, "head_dim": layout.head_dim,
                      "dtype": layout.dtype, "groups": layout.groups},
            "max_seq": llm.engine.max_seq, "kv_memory": llm.engine.kv_memory,
            "prefill_chunk": llm.prefill_chunk,
            "tokenizer": {"json": llm.tokenizer.to_json_text(), "bos_id": llm.tokenizer.bos_id,
                          "eos_ids": sorted(llm.tokenizer.eos_ids),
                          "add_bos": llm.tokenizer.add_bos},
            "chat_template": llm.template_source, "defaults": llm.defaults, "info": llm.info}
    manifest = replace(first, name=llm.name, plan=entries[0]["plan"],
                       metadata={**first.metadata, "llm": meta})
    save_artifact(path, manifest, weights=weights, libraries=libraries, key=key)


def load(path: str | os.PathLike, *, key: bytes | str | None = None,
         kv_memory: int | None = None) -> LLM:
    """Load an LLM artifact (checked as any artifact: digest, checksums, each step's plan, the
    host's instruction sets); `kv_memory` (bytes) overrides the KV cache budget it was saved
    with. With `key`, an artifact not signed with it is refused."""
    if kv_memory is not None and (not isinstance(kv_memory, int) or kv_memory < 1):
        raise InputError(f"kv_memory must be a positive number of bytes, got {kv_memory!r}")
    return from_artifact(load_artifact(path, host=host_description(), key=key), path,
                         kv_memory=kv_memory)


def from_artifact(artifact: Artifact, path: str | os.PathLike, *,
                  kv_memory: int | None = None) -> LLM:
    """The LLM of an artifact loaded (and checked) already; `path` names it in errors."""
    if kv_memory is not None and (not isinstance(kv_memory, int) or kv_memory < 1):
        raise InputError(f"kv_memory must be a positive number of bytes, got {kv_memory!r}")
    meta = artifact.manifest.metadata.get("llm")
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is a model artifact, not an LLM one: load it with "
                            "bitsmith.load")
    try:
        llm = _build(artifact, meta)
    except (KeyError, TypeError, ValueError, InputError, TextError, MemoryError) as exc:
        raise ArtifactError(f"{path}: the LLM description is malformed ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); recompile the model") from None
    if kv_memory is not None:  # the caller's budget: its errors are the caller's
        llm.engine = Engine(llm.engine.entries, llm.engine.layout, kv_memory=kv_memory,
                            max_seq=llm.engine.max_seq)
    return llm


def _build(artifact: Artifact, meta: Mapping[str, Any]) -> LLM:
    if meta.get("format") != LLM_FORMAT:
        raise ArtifactError(f"LLM format {meta.get('format')!r}, this runtime reads "
                            f"{LLM_FORMAT}; recompile the model")
    raw = meta["entries"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ENTRIES:
        raise ArtifactError(f"an LLM artifact holds 1..{MAX_ENTRIES} steps")
    shared: dict[tuple, Any] = {}
    entries = []
    cache = meta["cache"]
    layout = CacheLayout(*(_int(cache, k, 1, 1 << 20) for k in ("layers", "kv_heads",
                                                                "page_size", "head_dim")),
                         dtype=str(cache["dtype"]), groups=_int(cache, "groups", 1, 1 << 20))
    for item in raw:
        sizes = {k: _int(item, k, 1, 1 << 24) for k in _INT_FIELDS}
        inputs = tuple(TensorSpec.from_json(s) for s in item["inputs"])
        _check_sizes(sizes, inputs, layout)
        plan = item["plan"]
        if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list):
            raise ArtifactError("an LLM step's plan must be an object with steps")
        names = {s.get("library") for s in plan["steps"] if isinstance(s, dict)}
        view = Artifact(replace(artifact.manifest, plan=plan, inputs=inputs,
                                outputs=tuple(TensorSpec.from_json(s) for s in item["outputs"])),
                        artifact.weights,
                        {n: b for n, b in artifact.libraries.items() if n in names},
                        artifact.signed)
        check_plan(view)
        entries.append(Entry(**sizes, executor=Executor(view, shared)))
    max_seq = _int(meta, "max_seq", 2, 1 << 24)
    positions = [artifact.weights[n].shape[0] for n in ("rope.cos",
                                                        "model.embed_positions.weight")
                 if n in artifact.weights]
    if positions and max_seq > min(positions):
        raise ArtifactError(f"max_seq {max_seq} is past the {min(positions)} positions the "
                            "steps were compiled for")
    engine = Engine(entries, layout, kv_memory=_int(meta, "kv_memory", 1, 1 << 40),
                    max_seq=max_seq)
    tok = meta["tokenizer"]
    tokenizer = Tokenizer(str(tok["json"]), bos_id=tok["bos_id"], eos_ids=tok["eos_ids"],
                          add_bos=bool(tok["add_bos"]))
    template = meta.get("chat_template")
    llm = LLM(engine, tokenizer, chat_template=template if isinstance(template, str) else None,
               defaults=dict(meta.get("defaults") or {}), name=str(meta["name"]),
               prefill_chunk=_int(meta, "prefill_chunk", 1, 1 << 24),
               info=dict(meta.get("info") or {}))
    llm.params()  # the saved defaults must make valid sampling parameters
    return llm


def _check_sizes(sizes: Mapping[str, int], inputs: tuple[TensorSpec, ...],
                 layout: CacheLayout) -> None:
    """The step's sizes and the cache layout, against its own input signature."""
    if len(inputs) < 8:
        raise ArtifactError(f"an LLM step takes at least 8 inputs, got {len(inputs)}")
    got = {"tokens": inputs[0].shape[0], "batch": inputs[3].shape[0],
           "page_slots": inputs[5].shape[0], "rows": inputs[6].shape[0]}
    cache = inputs[7].shape
    want_cache = [layout.layers, cache[1] if len(cache) > 1 else None, 2, layout.kv_heads,
                  layout.page_size, layout.lanes]
    scales = list(inputs[8].shape) if len(inputs) > 8 else None
    want_scales = [*want_cache[:5], *layout.scale_shape] if layout.scaled else None
    if any(sizes[k] != v for k, v in got.items()) or list(cache) != want_cache \
            or inputs[7].dtype != layout.dtype or scales != want_scales:
        raise ArtifactError(f"an LLM step's sizes {dict(sizes)} and cache {layout} do not "
                            f"match its inputs ({', '.join(map(str, inputs))})")


def _int(data: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ArtifactError(f"LLM field {key!r}: expected an int in [{low}, {high}], got "
                            f"{str(value)[:40]}")
    return value
