"""How fast an LLM generates: prefill and decode timings on its engine (runtime side), what
`bitsmith bench --generate` and `bench/llm.py` report."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def prefill_seconds(llm: Any, ids: Sequence[int]) -> float:
    """Seconds from a fresh prompt to the logits of its last token (its first token's, with
    greedy sampling): the time to first token, less the sampling."""
    engine = llm.engine
    seq = next(llm._ids)
    engine.blocks.add(seq)
    try:
        start = time.perf_counter()
        chunk = llm.prefill_chunk
        for at in range(0, len(ids), chunk):
            engine.step([(seq, list(ids[at:at + chunk]))])
        return time.perf_counter() - start
    finally:
        engine.blocks.free(seq)


def decode_rate(llm: Any, batch: int, steps: int, context: int = 32) -> float:
    """Tokens/s of `batch` sequences decoding together, `steps` steps after a `context`-token
    prompt each (greedy: an argmax per sequence per step)."""
    engine = llm.engine
    seqs = [next(llm._ids) for _ in range(batch)]
    for s in seqs:
        engine.blocks.add(s)
    try:
        prompt = [(10 + i) % llm.vocab_size for i in range(context)]
        for s in seqs:  # one prompt at a time: any prefill step size takes it
            for at in range(0, context, llm.prefill_chunk):
                engine.step([(s, prompt[at:at + llm.prefill_chunk])])
        start = time.perf_counter()
        for _ in range(steps):
            engine.step([(s, [7]) for s in seqs]).argmax(axis=-1)
        return batch * steps / (time.perf_counter() - start)
    finally:
        for s in seqs:
            engine.blocks.free(s)
