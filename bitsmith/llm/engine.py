"""Runs compiled LLM steps over the paged KV cache: the host side of generation.

The engine owns the cache tensor (sized from a memory budget, never from the model's maximum
context) and the page manager; `step` lays a batch of (sequence, new tokens) out as the
compiled step's inputs, picks the smallest compiled size that holds it, and returns one row of
logits per sequence (or per token, for scoring). Everything here is runtime side: numpy and
`bitsmith.runtime`, no compiler, no torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ArtifactError, InputError
from ..runtime.artifact import NUMPY_DTYPES
from ..runtime.executor import state_array
from .blocks import BlockManager, CacheFullError


@dataclass(frozen=True)
class Entry:
    """One compiled step: its static sizes and the executor that runs it."""

    tokens: int
    batch: int
    rows: int
    page_slots: int
    executor: Any

    @property
    def scores_all(self) -> bool:
        """Whether it returns a row of logits per token rather than per sequence."""
        return self.rows == self.tokens and self.rows != self.batch


@dataclass(frozen=True)
class CacheLayout:
    """The cache tensor's shape parameters: `[layers, pages, 2, kv_heads, page_size, dim]`."""

    layers: int
    kv_heads: int
    page_size: int
    head_dim: int
    dtype: str  # IR name: f32, f16, bf16, i8, u8 (4-bit codes, two a byte)
    groups: int = 1  # u8: (scale, min) groups per row (`ir.dialects.kv.int4_group`)

    @property
    def scaled(self) -> bool:
        """Whether the rows are quantized with scales (int8, or 4-bit)."""
        return self.dtype in ("i8", "u8")

    @property
    def lanes(self) -> int:
        """Elements of one cached row: head_dim, or head_dim / 2 bytes of 4-bit codes."""
        return self.head_dim // 2 if self.dtype == "u8" else self.head_dim

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Per row: nothing, one scale (int8), or (scale, min) per group (4-bit)."""
        return (self.groups, 2) if self.dtype == "u8" else ()

    def page_bytes(self) -> int:
        """Bytes of one page across all layers (K and V, and their scales)."""
        rows = self.layers * 2 * self.kv_heads * self.page_size
        scales = 4 * math.prod(self.scale_shape) if self.scaled else 0
        return rows * (self.lanes * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize + scales)


class Engine:
    """Compiled steps plus the cache they share; `step` runs one batch."""

    def __init__(self, entries: Sequence[Entry], layout: CacheLayout, *,
                 kv_memory: int, max_seq: int) -> None:
        if not entries:
            raise ArtifactError("an LLM needs at least one compiled step")
        self.entries = sorted(entries, key=lambda e: (e.tokens, e.batch))
        self.layout = layout
        self.max_seq = max_seq
        self.kv_memory = kv_memory
        pages = cache_pages(layout, kv_memory, max_seq)
        self.cache = state_array((layout.layers, pages, 2, layout.kv_heads, layout.page_size,
                                  layout.lanes), NUMPY_DTYPES[layout.dtype])
        self.state = [self.cache]
        if layout.scaled:
            self.state.append(state_array((*self.cache.shape[:5], *layout.scale_shape),
                                          np.float32))
        self.blocks = BlockManager(pages, layout.page_size)

    @property
    def max_batch(self) -> int:
        """The most sequences one step takes."""
        return max(e.batch for e in self.entries)

    def max_tokens(self, batch: int = 1) -> int:
        """The most rows one step of at least `batch` sequences takes."""
        return max((e.tokens for e in self.entries if e.batch >= batch and not e.scores_all),
                   default=0)

    def entry_for(self, tokens: int, batch: int, scores_all: bool = False) -> Entry:
        """The smallest compiled step that takes `tokens` rows of `batch` sequences."""
        fits = [e for e in self.entries if e.tokens >= tokens and e.batch >= batch
                and e.scores_all == scores_all]
        if not fits:
            sizes = ", ".join(f"{e.tokens}x{e.batch}" for e in self.entries
                              if e.scores_all == scores_all)
            raise InputError(f"no compiled step takes {tokens} token(s) of {batch} "
                             f"sequence(s); compiled (tokens x sequences): {sizes}")
        return min(fits, key=lambda e: (e.tokens * e.batch, e.tokens))

    def step(self, work: Sequence[tuple[int, Sequence[int]]], *,
             scores_all: bool = False) -> np.ndarray:
        """Append each (sequence id, new tokens) to its sequence and run one step; returns
        logits `[len(work), vocab]` (each sequence's last new token), or with `scores_all`
        `[total new tokens, vocab]`. Sequences must have been added to `blocks`."""
        count = sum(len(t) for _, t in work)
        entry = self.entry_for(count, len(work), scores_all)
        for seq, new in work:
            if self.blocks.length(seq) + len(new) > self.max_seq:
                raise InputError(f"sequence {seq} would hold {self.blocks.length(seq) + len(new)}"
                                 f" tokens, over max_seq={self.max_seq}")
        # all or nothing: every sequence's pages are found before any grows
        needed = sum(self.blocks.pages_needed(seq, len(new)) for seq, new in work)
        if needed > self.blocks.free_pages:
            raise CacheFullError(work[0][0], count, needed, self.blocks.free_pages,
                                 self.blocks.num_pages)
        for seq, new in work:
            for src, dst in self.blocks.grow(seq, len(new)):  # copy-on-write, then write
                for tensor in self.state:
                    tensor[:, dst] = tensor[:, src]
        inputs = self._inputs(entry, work, count)
        return entry.executor.run(*inputs, *self.state)[0][:count if scores_all else len(work)]

    def _inputs(self, entry: Entry, work: Sequence[tuple[int, Sequence[int]]],
                count: int) -> list[np.ndarray]:
        tokens = np.zeros(entry.tokens, np.int32)
        positions = np.zeros(entry.tokens, np.int32)
        seq_indptr = np.full(entry.batch + 1, count, np.int32)
        kv_len = np.zeros(entry.batch, np.int32)
        last = np.zeros(entry.rows, np.int32)
        at = 0
        for b, (seq, new) in enumerate(work):
            length = self.blocks.length(seq)  # already grown by the new tokens
            seq_indptr[b] = at
            tokens[at:at + len(new)] = new
            positions[at:at + len(new)] = np.arange(length - len(new), length)
            kv_len[b] = length
            if not entry.scores_all:
                last[b] = at + len(new) - 1
            at += len(new)
        if entry.scores_all:
            last[:count] = np.arange(count)
        ids = [seq for seq, _ in work]
        page_indptr, page_indices = self.blocks.page_table(ids, capacity=entry.page_slots)
        page_indptr = np.concatenate([page_indptr, np.full(entry.batch - len(work),
                                                           page_indptr[-1], np.int32)])
        return [tokens, positions, seq_indptr, kv_len, page_indptr.astype(np.int32),
                page_indices.astype(np.int32), last]


MAX_PAGES = 1 << 22
"""More pages than any host's memory holds at any page size (bounds a crafted budget)."""


def cache_pages(layout: CacheLayout, kv_memory: int, max_seq: int) -> int:
    """The pages `kv_memory` bytes hold; at least one sequence of max_seq tokens must fit."""
    pages = kv_memory // layout.page_bytes()
    need = math.ceil(max_seq / layout.page_size)
    if pages > MAX_PAGES:
        raise InputError(f"kv_memory of {kv_memory / 2**30:.1f} GiB makes {pages} pages; at "
                         f"most {MAX_PAGES} are allowed: lower kv_memory")
    if pages < need:
        raise InputError(f"kv_memory of {kv_memory / 2**20:.1f} MiB holds {pages} page(s) of "
                         f"{layout.page_size} tokens ({layout.page_bytes()} bytes each); one "
                         f"sequence of max_seq={max_seq} needs {need}: raise kv_memory or "
                         "lower max_seq")
    return pages


def entry_sizes(max_batch: int, max_seq: int, page_size: int,
                prefill: Sequence[int]) -> list[dict[str, int]]:
    """The step sizes an LLM compiles: decode at batch 1, 2, 4, ... up to max_batch (one row
    per sequence) and prefill chunks of `prefill` rows shared by up to max_batch sequences."""
    pages = math.ceil(max_seq / page_size)
    decode = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
    sizes = [{"tokens": b, "batch": b, "rows": b, "page_slots": b * pages} for b in decode]
    for t in sorted(set(prefill)):
        if t > max(decode):
            sizes.append({"tokens": t, "batch": max_batch, "rows": max_batch,
                          "page_slots": max_batch * pages})
    return sizes
