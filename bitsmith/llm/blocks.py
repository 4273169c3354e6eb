"""The KV page manager: which cache pages hold which sequence's tokens. Paging decisions are
made here, in Python; kernels only read the page table this module builds.

The KV cache holds `num_pages` pages of `page_size` token positions each. A sequence lists its
pages in order: token position p lives in page `pages[p // page_size]` at offset
`p % page_size`. A sequence holding n tokens owns exactly ceil(n / page_size) pages.

Pages are reference counted. `fork` lets a child share all its parent's pages. Full pages are
never written again, so sharing them is free; a shared, partly filled last page is copied on
write: the first `grow` of either sequence that writes into it takes a fresh page for itself,
and returns the copy `(src_page, dst_page)` the caller must perform on the cache tensor (all
`page_size` slots of page src into page dst) before writing the new tokens. The other sequence
keeps the original page, and once it is the only holder it writes there without copying.

Free pages form a LIFO stack: the page freed last is handed out first, while it may still be in
the GPU's L2. A fresh manager hands out pages 0, 1, 2, ... in order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bitsmith.errors import BitsmithError, InputError


class CacheFullError(BitsmithError):
    """Not enough free KV pages to grow a sequence; `needed` and `free` are page counts."""

    def __init__(self, seq_id: int, new_tokens: int, needed: int, free: int, total: int) -> None:
        self.needed, self.free = needed, free
        super().__init__(
            f"KV cache full: growing sequence {seq_id} by {new_tokens} token(s) needs "
            f"{needed} free page(s), got {free} free of {total}; raise kv_memory or lower "
            f"max_batch (or finish or preempt a sequence first)")


@dataclass(slots=True)
class _Sequence:
    """One sequence's pages, in order, and how many token positions it holds."""

    pages: list[int] = field(default_factory=list)
    length: int = 0


class BlockManager:
    """Allocates KV cache pages to sequences: grow, fork (shared pages, copy on write), free."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"BlockManager: expected {name} an int >= 1, got {value!r}")
        self._num_pages = num_pages
        self._page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives page 0 first
        self._refs = [0] * num_pages
        self._seqs: dict[int, _Sequence] = {}

    @property
    def num_pages(self) -> int:
        """Pages in the cache."""
        return self._num_pages

    @property
    def page_size(self) -> int:
        """Token positions per page."""
        return self._page_size

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds."""
        return len(self._free)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def add(self, seq_id: int, prefix: Sequence[int] = ()) -> None:
        """Start a sequence: empty, or holding the full pages `prefix` (shared with whoever
        holds them already, e.g. a prefix cache) as its first positions."""
        if seq_id in self._seqs:
            raise InputError(f"sequence {seq_id} already exists: expected a new id; free it "
                             f"first or pick another id")
        for page in prefix:
            if self.ref_count(page) < 1:
                raise InputError(f"prefix page {page} is free: expected pages someone holds")
        for page in prefix:
            self._refs[page] += 1
        self._seqs[seq_id] = _Sequence(list(prefix), len(prefix) * self._page_size)

    def hold(self, page: int) -> None:
        """Hold a page once more (a prefix cache keeping a full page past its sequence)."""
        if self.ref_count(page) < 1:
            raise InputError(f"hold: page {page} is free: expected a page someone holds")
        self._refs[page] += 1

    def release(self, page: int) -> None:
        """Drop one hold of a page; it returns to the free list when nobody holds it."""
        if self.ref_count(page) < 1:
            raise InputError(f"release: page {page} is free already")
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    def length(self, seq_id: int) -> int:
        """Token positions the sequence holds."""
        return self._get(seq_id).length

    def pages(self, seq_id: int) -> list[int]:
        """The sequence's pages in order (a copy)."""
        return list(self._get(seq_id).pages)

    def ref_count(self, page: int) -> int:
        """How many sequences hold `page`."""
        if not 0 <= page < self._num_pages:
            raise InputError(f"page: expected an index in [0, {self._num_pages}), got {page}")
        return self._refs[page]

    def pages_needed(self, seq_id: int, new_tokens: int) -> int:
        """Free pages that growing by `new_tokens` takes, a copy-on-write page included."""
        seq = self._get(seq_id)
        _check_tokens(new_tokens)
        total = -(-(seq.length + new_tokens) // self._page_size)
        return total - len(seq.pages) + int(self._must_copy(seq, new_tokens))

    def can_grow(self, seq_id: int, new_tokens: int) -> bool:
        """Whether there are free pages enough to grow by `new_tokens`."""
        return self.pages_needed(seq_id, new_tokens) <= len(self._free)

    def grow(self, seq_id: int, new_tokens: int) -> list[tuple[int, int]]:
        """Make room for `new_tokens` more positions; returns the page copies to do first.

        Raises CacheFullError, changing nothing, when the free pages do not suffice."""
        seq = self._get(seq_id)
        needed = self.pages_needed(seq_id, new_tokens)
        if needed > len(self._free):
            raise CacheFullError(seq_id, new_tokens, needed, len(self._free), self._num_pages)
        copies = []
        if self._must_copy(seq, new_tokens):
            src, dst = seq.pages[-1], self._take()
            self._refs[src] -= 1
            seq.pages[-1] = dst
            copies.append((src, dst))
        seq.length += new_tokens
        while len(seq.pages) * self._page_size < seq.length:
            seq.pages.append(self._take())
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """Start `child_id` as a copy of `parent_id` sharing all its pages."""
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise InputError(f"fork: expected a new child id, got {child_id}, which exists; "
                             f"free it first or pick another id")
        for page in parent.pages:
            self._refs[page] += 1
        self._seqs[child_id] = _Sequence(list(parent.pages), parent.length)

    def free(self, seq_id: int) -> None:
        """Drop the sequence; pages nobody else holds return to the free list."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        for page in reversed(seq.pages):  # reversed: the sequence's first page is reused first
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def page_table(self, seq_ids: Sequence[int],
                   capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CSR page table of `seq_ids` in order: (page_indptr int32 [n+1], page_indices int32).

        With `capacity`, page_indices is zero-padded to exactly `capacity` entries."""
        if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
            raise InputError(f"page_table: expected capacity an int >= 0 or None, "
                             f"got {capacity!r}")
        lists = [self._get(s).pages for s in seq_ids]
        indptr = np.zeros(len(lists) + 1, dtype=np.int32)
        np.cumsum([len(p) for p in lists], out=indptr[1:])
        used = int(indptr[-1])
        size = used if capacity is None else capacity
        if used > size:
            raise InputError(f"page_table: expected at most capacity={capacity} page entries, "
                             f"got {used} for {len(lists)} sequence(s); raise the capacity "
                             f"(max_batch x pages per sequence)")
        indices = np.zeros(size, dtype=np.int32)
        if used:
            indices[:used] = np.concatenate([np.asarray(p, dtype=np.int32) for p in lists])
        return indptr, indices

    def _get(self, seq_id: int) -> _Sequence:
        """The sequence, or InputError naming the unknown id."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise InputError(f"unknown sequence {seq_id}: expected one of the {len(self._seqs)} "
                             f"added and not freed; call add(seq_id) first")
        return seq

    def _must_copy(self, seq: _Sequence, new_tokens: int) -> bool:
        """Whether growing writes into a shared, partly filled last page."""
        return (new_tokens > 0 and seq.length % self._page_size != 0
                and self._refs[seq.pages[-1]] > 1)

    def _take(self) -> int:
        """Pop one free page, held once."""
        page = self._free.pop()
        self._refs[page] = 1
        return page


def _check_tokens(new_tokens: int) -> None:
    """Raise InputError unless `new_tokens` is an int >= 0."""
    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 0:
        raise InputError(f"new_tokens: expected an int >= 0, got {new_tokens!r}")
