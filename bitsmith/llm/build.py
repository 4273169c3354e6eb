"""`bitsmith.llm.compile`: a decoder (zoo name, GGUF file, Hugging Face directory) built into
compiled steps at a few sizes, over one paged KV cache, with its tokenizer (compile side)."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from rich.progress import Progress

from ..autotune.policy import tuned_configs
from ..compiler import build_artifact
from ..errors import InputError
from ..ir.dtypes import parse_dtype
from ..passes import default_pipeline, run
from ..passes.quant_spec import quant_pipeline_entry
from ..runtime.executor import Executor
from .api import LLM
from .archs import canonical_weights
from .engine import CacheLayout, Engine, Entry, cache_pages, entry_sizes
from .model import STATE_INPUTS, LlmSpec, StepShape, step_module
from .sources import gguf_quantized, resolve
from .text import Tokenizer

KV_DTYPES = ("f32", "f16", "bf16", "int8")
"""Cache element types (int8: per token and head scales)."""

DEFAULT_KV_MEMORY = 1 << 30
"""The KV cache budget when none is given: at most 1 GiB, less when max_batch sequences of
max_seq tokens need less."""


def compile(model: str | os.PathLike[str], *, quant: str | None = None, kv: str = "f16",
            max_batch: int = 8, max_seq: int = 2048, page_size: int = 16,
            prefill: Sequence[int] = (64, 256), score_chunk: int = 128,
            kv_memory: int | None = None, tune: int | str | None = None,
            progress: bool = False) -> LLM:
    """Compile a decoder for this CPU: decode steps at batch 1, 2, 4, ... max_batch, prefill
    steps of `prefill` tokens, a scoring step of `score_chunk` tokens (perplexity; 0: none), all
    over
    one KV cache of `kv` elements sized by `kv_memory` bytes.

    `quant` quantizes the linear layers (a spec such as "w4g128"; see `passes.quant_spec`).
    A GGUF file's Q4_0/Q4_1/Q8_0 layers run as they are stored (llama.cpp's very weights)
    unless `quant` is given: "f32" dequantizes them, any other spec re-quantizes;
    `tune` tunes every kernel at the compiled sizes (trials or a time such as "5m")."""
    if kv not in KV_DTYPES:
        raise InputError(f"kv={kv!r}: expected one of {', '.join(KV_DTYPES)}")
    kv = "i8" if kv == "int8" else kv
    for name, value, low in (("max_batch", max_batch, 1), ("max_seq", max_seq, 2),
                             ("page_size", page_size, 1), ("score_chunk", score_chunk, 0)):
        if not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an int >= {low}, got {value!r}")
    source = resolve(model)
    spec = LlmSpec.from_config(source.config)
    weights = canonical_weights(spec.arch, source.weights, spec.layers)
    max_seq = min(max_seq, spec.max_positions)
    layout = CacheLayout(spec.layers, spec.kv_heads, page_size, spec.head_dim, kv)
    sizes = entry_sizes(max_batch, max_seq, page_size, [t for t in prefill if t <= max_seq])
    pages = math.ceil(max_seq / page_size)
    if score_chunk:  # a step with logits after every token (perplexity); 0: none
        score = max(2, min(score_chunk, max_seq))
        sizes.append({"tokens": score, "batch": 1, "rows": score, "page_slots": pages})
    budget = kv_memory if kv_memory is not None else min(
        DEFAULT_KV_MEMORY, layout.page_bytes() * pages * max_batch)
    cache_pages(layout, budget, max_seq)  # a budget too small is refused before compiling
    entries: list[Entry] = []
    shared: dict[tuple, Any] = {}
    memo: dict[str, Any] = {}  # stacked weights, built once for every step size
    pipeline = default_pipeline("cpu")
    native = gguf_quantized(source.gguf) if source.gguf is not None and quant is None else {}
    if quant == "f32":
        quant = None
    elif quant is not None:
        pipeline = f"canonicalize,cse,{quant_pipeline_entry(quant)},{pipeline}"
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"compiling {source.name}", total=len(sizes))
        for size in sizes:
            bar.update(task, description=f"compiling {source.name}: {size['tokens']} tokens "
                                         f"x {size['batch']} sequences")
            shape = StepShape(tokens=size["tokens"], batch=size["batch"],
                              page_slots=size["page_slots"], page_size=page_size,
                              max_positions=max_seq, rows=size["rows"])
            module = step_module(spec, weights, shape, cache_dtype=parse_dtype(kv),
                                 name=f"{_symbol(source.name)}_t{shape.tokens}_b{shape.batch}",
                                 quantized=native, memo=memo)
            run(module, pipeline, verify=False)
            configs, _ = tuned_configs(module, tune, shape.batch, progress)
            artifact = build_artifact(module, configs=configs)
            plan = artifact.manifest.plan
            plan["state"] = [plan["inputs"][i] for i, n in enumerate(module.input_names)
                             if n in STATE_INPUTS]
            entries.append(Entry(shape.tokens, shape.batch, shape.out_rows, shape.page_slots,
                                 Executor(artifact, shared)))
            bar.advance(task)
    engine = Engine(entries, layout, kv_memory=budget, max_seq=max_seq)
    eos = source.eos_ids or spec.eos_ids
    tokenizer = Tokenizer(source.tokenizer_json, bos_id=source.bos_id, eos_ids=eos,
                          add_bos=source.add_bos)
    return LLM(engine, tokenizer, chat_template=source.chat_template, name=source.name,
               prefill_chunk=max((t for t in prefill if t <= max_seq), default=None),
               info={"vocab": spec.vocab, "arch": spec.arch, "kv": kv,
                     "quant": quant or ("gguf" if native else "f32"),
                     "layers": spec.layers})


def _symbol(name: str) -> str:
    """A module name made of identifier characters."""
    out = "".join(c if c.isalnum() else "_" for c in name)
    return out if out[:1].isalpha() else f"m_{out}"
