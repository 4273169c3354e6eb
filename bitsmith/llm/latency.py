"""The step latency model of an LLM's compiled kernels, measured on this host.

A step runs one compiled entry (its static token and sequence counts, padded), so its time is
that entry's fixed cost plus the attention over what the step's rows see in the cache, which
grows with the context. `measure` times every entry twice on this device, with a short and a
long context, and fits `base + per_attended * attended` per entry (`attended`: the cached
positions each new row attends to, summed over rows). The scheduler predicts a planned step
from it and, given an inter-token latency target, fills a step with prompt chunks only while
the prediction meets the target (the measured, device-specific latency predictor of the HELP
line of work, applied to our own kernels rather than learned across devices).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InputError
from .engine import Engine, Entry


@dataclass(frozen=True)
class StepCost:
    """One entry's measured cost: `base` seconds, plus `per_attended` a cached position seen."""

    tokens: int
    batch: int
    base: float
    per_attended: float

    def predict(self, attended: int) -> float:
        return self.base + self.per_attended * attended


class StepModel:
    """Predicted seconds for a step, from the per-entry costs measured by `measure`."""

    def __init__(self, engine: Engine, costs: Sequence[StepCost]) -> None:
        self.engine = engine
        self.costs = {(c.tokens, c.batch): c for c in costs}
        missing = [e for e in engine.entries if not e.scores_all
                   and (e.tokens, e.batch) not in self.costs]
        if missing:
            raise InputError(f"the step model has no cost for entries "
                             f"{[(e.tokens, e.batch) for e in missing]}")

    def predict(self, work: Sequence[tuple[int, int]]) -> float:
        """Seconds for a step of (cached length before it, new tokens) per sequence."""
        entry = self.engine.entry_for(sum(n for _, n in work), len(work))
        return self.costs[entry.tokens, entry.batch].predict(attended(work))

    def table(self) -> list[StepCost]:
        return sorted(self.costs.values(), key=lambda c: (c.tokens, c.batch))


def attended(work: Sequence[tuple[int, int]]) -> int:
    """Cached positions the new rows attend to: a row at position p sees p + 1."""
    return sum(n * cached + n * (n + 1) // 2 for cached, n in work)


def _layout(entry: Entry) -> list[int]:
    """New tokens per sequence when timing an entry: a decode entry's sequences one each; a
    prefill entry one chunk (its rows are computed, padded or not)."""
    return [1] * entry.batch if entry.tokens == entry.batch else [entry.tokens]


def _time(engine: Engine, news: list[int], context: int, rounds: int) -> float:
    """Median seconds of a step appending `news` to sequences of `context` cached tokens."""
    blocks = engine.blocks
    ids = [-1 - i for i in range(len(news))]  # never a request's id
    times = []
    for _ in range(rounds):
        try:
            for seq in ids:
                blocks.add(seq)
                if context:
                    blocks.grow(seq, context)  # pages only: contents do not change the time
            start = time.perf_counter()
            engine.step([(seq, [1] * n) for seq, n in zip(ids, news, strict=True)])
            times.append(time.perf_counter() - start)
        finally:
            for seq in ids:
                if seq in blocks:
                    blocks.free(seq)
    return statistics.median(times)


def measure(engine: Engine, *, rounds: int = 3,
            progress: Callable[[str], None] | None = None) -> StepModel:
    """Time every (non-scoring) entry with an empty and a long context on this host. Must run
    while the engine is otherwise idle: it borrows free pages for the timing sequences."""
    costs = []
    page = engine.blocks.page_size
    for entry in engine.entries:
        if entry.scores_all:
            continue
        news = _layout(entry)
        # as long a context as the pool and max_seq allow, up to half the context
        per_seq = engine.blocks.free_pages // len(news) * page
        context = max(0, min(engine.max_seq // 2, engine.max_seq - max(news),
                             per_seq - max(news)))
        context -= context % page
        _time(engine, news, 0, 1)  # first run: caches warm
        short = _time(engine, news, 0, rounds)
        slope = 0.0
        if context:
            long = _time(engine, news, context, rounds)
            extra = attended([(context, n) for n in news]) - attended([(0, n) for n in news])
            slope = max(0.0, (long - short) / extra)
        costs.append(StepCost(entry.tokens, entry.batch, short, slope))
        if progress is not None:
            progress(f"step {entry.tokens} tokens x {entry.batch} sequences: "
                     f"{short * 1e3:.1f} ms + {slope * 1e9:.2f} ns per attended position")
    return StepModel(engine, costs)
