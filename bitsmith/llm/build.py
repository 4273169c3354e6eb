"""`bitsmith.llm.compile`: a decoder (zoo name, GGUF file, Hugging Face directory) built into
compiled steps at a few sizes, over one paged KV cache, with its tokenizer (compile side)."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rich.progress import Progress

from ..autotune.policy import tuned_configs
from ..compiler import build_artifact
from ..errors import CodegenError, InputError
from ..ir import Module, OpResult, graph
from ..ir.dialects import quant as qdialect
from ..ir.dialects.kv import int4_group
from ..ir.dtypes import f32, parse_dtype
from ..ir.packing import unpack_rows
from ..passes import default_pipeline, run
from ..passes.quant_spec import quant_pipeline_entry
from ..runtime.executor import Executor
from .api import LLM
from .archs import canonical_weights
from .engine import CacheLayout, Engine, Entry, cache_pages, entry_sizes
from .model import STATE_INPUTS, LlmSpec, QuantizedWeight, StepShape, step_module
from .sources import gguf_quantized, resolve
from .text import Tokenizer

KV_DTYPES = ("f32", "f16", "bf16", "int8", "int4")
"""Cache element types (int8: per token and head scales; int4: per token, head and group of
32 lanes, a scale and a minimum; KIVI/QServe-style)."""

DEFAULT_KV_MEMORY = 1 << 30
"""The KV cache budget when none is given: at most 1 GiB, less when max_batch sequences of
max_seq tokens need less."""


def compile(model: str | os.PathLike[str], *, quant: str | None = None, kv: str = "f16",
            max_batch: int = 8, max_seq: int = 2048, page_size: int = 16,
            prefill: Sequence[int] = (64, 256), score_chunk: int = 128,
            kv_memory: int | None = None, tune: int | str | None = None,
            calib: str | Sequence[int] | None = None, act: str = "f32",
            progress: bool = False) -> LLM:
    """Compile a decoder for this CPU: decode steps at batch 1, 2, 4, ... max_batch, prefill
    steps of `prefill` tokens, a scoring step of `score_chunk` tokens (perplexity; 0: none),
    all over one KV cache of `kv` elements sized by `kv_memory` bytes.

    `quant` quantizes the linear layers (a spec such as "w4g128", "w4g128:gptq",
    "w3g128:gptq:rot"; see `passes.quant_spec`) once, for every step; the output head stays
    f32 unless the spec says `keep=`. GPTQ (and RTN's clipping search) calibrate on `calib`
    (text or token ids; by default 2048 tokens of Python's own documentation,
    `pydoc_data.topics`, from past its first 16384 tokens, which perplexity tests read).
    A GGUF file's Q4_0/Q4_1/Q8_0 layers run as they are stored (llama.cpp's very weights)
    unless `quant` is given: "f32" dequantizes them, any other spec re-quantizes.
    `act="int8"` runs the quantized layers on int8 activation blocks (W4A8/W8A8 on AVX-512
    VNNI, as llama.cpp's dot products do; about 0.5% error on a layer's output, see
    `ir.dialects.quant`); f32 layers (the head, by default, when re-quantizing) stay f32.
    `tune` tunes every kernel at the compiled sizes (trials or a time such as "5m")."""
    if act not in ACT_CHOICES:
        raise InputError(f"act={act!r}: expected one of {', '.join(ACT_CHOICES)}")
    if kv not in KV_DTYPES:
        raise InputError(f"kv={kv!r}: expected one of {', '.join(KV_DTYPES)}")
    kv = {"int8": "i8", "int4": "u8"}.get(kv, kv)
    for name, value, low in (("max_batch", max_batch, 1), ("max_seq", max_seq, 2),
                             ("page_size", page_size, 1), ("score_chunk", score_chunk, 0)):
        if not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an int >= {low}, got {value!r}")
    source = resolve(model)
    spec = LlmSpec.from_config(source.config)
    weights = canonical_weights(spec.arch, source.weights, spec.layers)
    max_seq = min(max_seq, spec.max_positions)
    layout = CacheLayout(spec.layers, spec.kv_heads, page_size, spec.head_dim, kv,
                         spec.head_dim // int4_group(spec.head_dim) if kv == "u8" else 1)
    chunks = sorted({min(t, max_seq) for t in prefill})  # a chunk longer than max_seq: clipped
    sizes = entry_sizes(max_batch, max_seq, page_size, chunks)
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
    pool: dict[tuple, np.ndarray] = {}  # one host copy of each (packed) weight
    pipeline = default_pipeline("cpu")
    native = gguf_quantized(source.gguf) if source.gguf is not None and quant is None else {}
    report = None
    tokenizer = Tokenizer(source.tokenizer_json, bos_id=source.bos_id,
                          eos_ids=source.eos_ids or spec.eos_ids, add_bos=source.add_bos)
    if quant is not None and quant != "f32":
        ids = calibration_ids(tokenizer, calib)
        native, report = quantize_once(spec, weights, quant, ids, page_size, memo)
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
                                 quantized=native, memo=memo, act=ACT_CHOICES[act])
            run(module, pipeline, verify=False)
            configs, _ = tuned_configs(module, tune, shape.batch, progress)
            artifact = build_artifact(module, configs=configs)
            _share_weights(artifact.weights, pool)
            plan = artifact.manifest.plan
            plan["state"] = [plan["inputs"][i] for i, n in enumerate(module.input_names)
                             if n in STATE_INPUTS]
            entries.append(Entry(shape.tokens, shape.batch, shape.out_rows, shape.page_slots,
                                 Executor(artifact, shared)))
            bar.advance(task)
    engine = Engine(entries, layout, kv_memory=budget, max_seq=max_seq)
    return LLM(engine, tokenizer, chat_template=source.chat_template, name=source.name,
               prefill_chunk=max(chunks, default=None),
               info={"vocab": spec.vocab, "arch": spec.arch, "kv": kv, "act": act,
                     "quantization": report,
                     "quant": quant or ("gguf" if native else "f32"),
                     "layers": spec.layers})


ACT_CHOICES = {"f32": "f32", "int8": "i8"}
"""What the quantized layers multiply their codes by (`compile`'s act), as the IR names it."""
CALIB_TOKENS = 2048
CALIB_CHUNK = 512
CALIB_SKIP = 16384


def calibration_ids(tokenizer: Tokenizer, calib: str | Sequence[int] | None) -> list[int]:
    """Token ids to calibrate on: `calib` (text or ids), or Python's documentation past the
    tokens that perplexity is measured on."""
    if calib is None:
        import pydoc_data.topics  # noqa: PLC0415 - in every Python

        text = "\n\n".join(pydoc_data.topics.topics.values())
        ids = tokenizer.encode(text)
        return ids[CALIB_SKIP:CALIB_SKIP + CALIB_TOKENS] or ids[:CALIB_TOKENS]
    ids = tokenizer.encode(calib) if isinstance(calib, str) else [int(t) for t in calib]
    if len(ids) < 16:
        raise InputError(f"calib holds {len(ids)} token(s); give at least 16 (a few thousand "
                         "calibrate GPTQ well)")
    return ids


def quantize_once(spec: LlmSpec, weights: Mapping[str, np.ndarray], quant: str,
                  ids: Sequence[int], page_size: int, memo: dict[str, Any]
                  ) -> tuple[dict[str, QuantizedWeight], dict[str, Any] | None]:
    """Quantize the linear layers of `spec` by `quant`, calibrated on `ids` (chunks of
    CALIB_CHUNK tokens through the interpreter, each its own sequence): the quantized weights,
    by name (a stacked q/k/v or gate/up under its stacked name), and the quantize pass's
    report. Every compiled step then reads these same codes."""
    if "keep=" not in quant:  # the output head stays f32 (as llama.cpp keeps it wide)
        quant = f"{quant}:keep=lm_head.weight|model.embed_tokens.weight"
    chunk = min(CALIB_CHUNK, len(ids))
    pages = -(-chunk // page_size)
    shape = StepShape(tokens=chunk, batch=1, page_slots=pages, page_size=page_size,
                      max_positions=chunk)
    module = step_module(spec, weights, shape, cache_dtype=f32, name="calibration", memo=memo)
    module.calibration = [
        (np.asarray(ids[at:at + chunk], np.int32), np.arange(chunk, dtype=np.int32),
         np.array([0, chunk], np.int32), np.array([chunk], np.int32),
         np.array([0, pages], np.int32), np.arange(pages, dtype=np.int32),
         np.array([chunk - 1], np.int32),
         np.zeros((spec.layers, pages, 2, spec.kv_heads, page_size, spec.head_dim),
                  np.float32))
        for at in range(0, len(ids) - chunk + 1, chunk)]
    run(module, f"canonicalize,cse,{quant_pipeline_entry(quant)}", verify=False)
    out: dict[str, QuantizedWeight] = {}
    for op in module.walk():
        if not isinstance(op, qdialect.LinearOp):
            continue
        codes, scale, zero = (_constant(module, v) for v in (op.weight, op.scale, op.zero))
        assert codes is not None and scale is not None
        name = codes[0][:-len(".q")]
        qtype = op.weight.type.dtype
        n, k = (int(d) for d in op.weight.type.shape)
        x = _producer(op.x)
        rotation = None
        inner = _producer(x.x) if isinstance(x, graph.ReshapeOp) else None
        if isinstance(inner, graph.MatmulOp):  # x R from the quantize pass (`rot` specs)
            rot = _constant(module, inner.rhs)
            rotation = rot[1] if rot is not None else None
        out[name] = QuantizedWeight(qtype, unpack_rows(codes[1], qtype.bits, k).reshape(n, k),
                                    scale[1], None if zero is None else zero[1], rotation)
    report = module.metadata.get("quantization")
    rotated = {r["layer"] for r in (report or {}).get("layers", []) if r.get("rotation")}
    missed = sorted(n for n in rotated if out.get(n) is None or out[n].rotation is None)
    if missed:
        raise CodegenError(f"the quantize pass rotated {missed[0]} (and {len(missed) - 1} "
                           "more), but its x R is not where the LLM build looks for it; "
                           "the steps would run the wrong weights")
    return out, report


def _share_weights(weights: dict[str, np.ndarray], pool: dict[tuple, np.ndarray]) -> None:
    """Point `weights` at the pool's copy of every array an earlier step already holds (each
    step size packs its weights anew), so that one copy of each stays in memory."""
    for name, array in weights.items():
        key = (name, array.shape, array.dtype.str)
        held = pool.setdefault(key, array)
        if held is not array:
            if held.nbytes != array.nbytes or held.tobytes() != array.tobytes():
                raise CodegenError(f"two step sizes hold different weights named {name!r}")
            weights[name] = held


def _producer(value: Any) -> Any:
    return value.op if isinstance(value, OpResult) else None


def _constant(module: Module, value: Any) -> tuple[str, np.ndarray] | None:
    """(weight name, array) of a value a `graph.constant` of a module weight defines."""
    op = _producer(value)
    if not isinstance(op, graph.ConstantOp) or op.weight is None:
        return None
    return op.weight, module.weights[op.weight]


def _symbol(name: str) -> str:
    """A module name made of identifier characters."""
    out = "".join(c if c.isalnum() else "_" for c in name)
    return out if out[:1].isalpha() else f"m_{out}"
