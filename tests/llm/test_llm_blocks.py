"""The KV page manager: accounting, fork with copy on write, a full cache, the CSR page table,
and a state machine that checks every sequence reads back its own tokens."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bitsmith.errors import InputError
from bitsmith.llm.blocks import BlockManager, CacheFullError


def _snapshot(bm: BlockManager, seq_ids: list[int]) -> tuple:
    return (bm.free_pages, [bm.pages(s) for s in seq_ids], [bm.length(s) for s in seq_ids],
            [bm.ref_count(p) for p in range(bm.num_pages)])


def test_grow_allocates_ceil_length_over_page_size() -> None:
    bm = BlockManager(num_pages=8, page_size=4)
    bm.add(0)
    assert bm.pages(0) == [] and bm.length(0) == 0
    steps = [(5, 2), (3, 2), (1, 3), (0, 3), (8, 5)]  # (new tokens, pages held after)
    for new_tokens, pages in steps:
        needed = bm.pages_needed(0, new_tokens)
        free = bm.free_pages
        assert bm.grow(0, new_tokens) == []
        assert len(bm.pages(0)) == pages and free - bm.free_pages == needed
    assert bm.length(0) == 17 and bm.pages(0) == [0, 1, 2, 3, 4]
    assert bm.free_pages == 3


def test_free_returns_pages_and_reuses_them_last_in_first_out() -> None:
    bm = BlockManager(num_pages=6, page_size=2)
    for s in (0, 1):
        bm.add(s)
    bm.grow(0, 3)
    bm.grow(1, 4)
    assert bm.pages(0) == [0, 1] and bm.pages(1) == [2, 3]
    bm.free(0)
    assert bm.free_pages == 4 and 0 not in bm
    assert [bm.ref_count(p) for p in range(6)] == [0, 0, 1, 1, 0, 0]
    bm.add(2)
    bm.grow(2, 4)
    assert bm.pages(2) == [0, 1]  # the freed pages come back first, in their old order


def test_sequences_never_share_pages_without_fork() -> None:
    bm = BlockManager(num_pages=40, page_size=3)
    rng = np.random.default_rng(0)
    for s in range(5):
        bm.add(s)
    for _ in range(30):
        bm.grow(int(rng.integers(5)), int(rng.integers(0, 4)))
    owned = [p for s in range(5) for p in bm.pages(s)]
    assert len(owned) == len(set(owned))
    assert bm.free_pages + len(owned) == 40
    assert all(bm.ref_count(p) == 1 for p in owned)


def test_fork_of_full_pages_needs_no_copy() -> None:
    bm = BlockManager(num_pages=8, page_size=4)
    bm.add(0)
    bm.grow(0, 8)
    bm.fork(0, 1)
    assert bm.pages(1) == bm.pages(0) == [0, 1] and bm.length(1) == 8
    assert [bm.ref_count(p) for p in (0, 1)] == [2, 2]
    assert bm.pages_needed(1, 1) == 1
    assert bm.grow(1, 1) == [] and bm.pages(1) == [0, 1, 2]
    assert bm.grow(0, 1) == [] and bm.pages(0) == [0, 1, 3]


@pytest.mark.parametrize("first", [0, 1])
def test_copy_on_write_of_a_shared_partial_page(first: int) -> None:
    bm = BlockManager(num_pages=8, page_size=4)
    bm.add(0)
    bm.grow(0, 6)  # pages [0, 1], page 1 half full
    bm.fork(0, 1)
    other = 1 - first
    assert bm.pages_needed(first, 1) == 1  # the copy's page
    assert bm.grow(first, 1) == [(1, 2)]
    assert bm.pages(first) == [0, 2] and bm.pages(other) == [0, 1]
    assert [bm.ref_count(p) for p in (0, 1, 2)] == [2, 1, 1]
    assert bm.pages_needed(other, 1) == 0
    assert bm.grow(other, 1) == []  # now the only holder of page 1: writes in place
    assert bm.pages(other) == [0, 1]
    assert bm.grow(first, 3) == [] and bm.pages(first) == [0, 2, 3]


def test_grow_by_zero_never_copies() -> None:
    bm = BlockManager(num_pages=4, page_size=4)
    bm.add(0)
    bm.grow(0, 2)
    bm.fork(0, 1)
    assert bm.pages_needed(1, 0) == 0 and bm.grow(1, 0) == [] and bm.pages(1) == [0]


def test_freeing_a_forked_parent_keeps_the_shared_pages() -> None:
    bm = BlockManager(num_pages=6, page_size=2)
    bm.add(0)
    bm.grow(0, 3)
    bm.fork(0, 1)
    bm.free(0)
    assert bm.free_pages == 4 and bm.pages(1) == [0, 1]
    assert bm.grow(1, 1) == []  # sole holder again: no copy
    bm.free(1)
    assert bm.free_pages == 6 and all(bm.ref_count(p) == 0 for p in range(6))


def test_cache_full_changes_nothing() -> None:
    bm = BlockManager(num_pages=5, page_size=4)
    bm.add(0)
    bm.grow(0, 10)
    bm.fork(0, 1)
    bm.add(2)
    bm.grow(2, 8)  # 0 free pages left
    before = _snapshot(bm, [0, 1, 2])
    assert not bm.can_grow(2, 1) and bm.can_grow(2, 0)
    with pytest.raises(CacheFullError, match=r"needs 1 free page\(s\), got 0 free of 5.*kv_memory"):
        bm.grow(1, 1)  # the copy-on-write page is not there either
    with pytest.raises(CacheFullError, match=r"needs 3 free page\(s\)") as info:
        bm.grow(2, 9)
    assert (info.value.needed, info.value.free) == (3, 0)
    assert _snapshot(bm, [0, 1, 2]) == before


def test_page_table_is_csr_in_the_given_order() -> None:
    bm = BlockManager(num_pages=10, page_size=2)
    for s, n in ((7, 3), (3, 0), (5, 5)):
        bm.add(s)
        bm.grow(s, n)
    indptr, indices = bm.page_table([5, 3, 7])
    assert indptr.dtype == np.int32 and indices.dtype == np.int32
    assert indptr.tolist() == [0, 3, 3, 5]
    assert indices.tolist() == bm.pages(5) + bm.pages(7)
    for i, s in enumerate([5, 3, 7]):
        assert indices[indptr[i]:indptr[i + 1]].tolist() == bm.pages(s)


def test_page_table_pads_to_capacity() -> None:
    bm = BlockManager(num_pages=10, page_size=2)
    bm.add(0)
    bm.grow(0, 5)
    indptr, indices = bm.page_table([0], capacity=8)
    assert indptr.tolist() == [0, 3] and indices.tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
    indptr, indices = bm.page_table([], capacity=4)
    assert indptr.tolist() == [0] and indices.tolist() == [0, 0, 0, 0]
    with pytest.raises(InputError, match="at most capacity=2 page entries, got 3"):
        bm.page_table([0], capacity=2)


@pytest.mark.parametrize(("call", "match"), [
    (lambda bm: bm.add(0), "sequence 0 already exists"),
    (lambda bm: bm.grow(9, 1), "unknown sequence 9"),
    (lambda bm: bm.free(9), "unknown sequence 9"),
    (lambda bm: bm.pages(9), "unknown sequence 9"),
    (lambda bm: bm.grow(0, -1), "new_tokens: expected an int >= 0, got -1"),
    (lambda bm: bm.fork(0, 0), "expected a new child id, got 0"),
    (lambda bm: bm.fork(9, 1), "unknown sequence 9"),
    (lambda bm: bm.ref_count(4), r"expected an index in \[0, 4\), got 4"),
    (lambda bm: bm.page_table([0], capacity=-1), "capacity an int >= 0 or None, got -1"),
])
def test_misuse_is_refused(call, match: str) -> None:
    bm = BlockManager(num_pages=4, page_size=2)
    bm.add(0)
    before = _snapshot(bm, [0])
    with pytest.raises(InputError, match=match):
        call(bm)
    assert _snapshot(bm, [0]) == before


@pytest.mark.parametrize("args", [(0, 4), (4, 0), (4.0, 4), (True, 4)])
def test_bad_sizes_are_refused(args: tuple) -> None:
    with pytest.raises(InputError, match="expected (num_pages|page_size) an int >= 1"):
        BlockManager(*args)


class PagedCache(RuleBasedStateMachine):
    """Random add/grow/fork/free against a model: each sequence's tokens, written into a fake
    cache through its pages (copies done first), must read back intact."""

    @initialize(num_pages=st.integers(1, 12), page_size=st.integers(1, 4))
    def start(self, num_pages: int, page_size: int) -> None:
        self.bm = BlockManager(num_pages, page_size)
        self.cache = np.full((num_pages, page_size), -1, dtype=np.int64)
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0
        self.next_token = 0

    @rule()
    def add(self) -> None:
        self.bm.add(self.next_id)
        self.tokens[self.next_id] = []
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new_tokens=st.integers(0, 6))
    def grow(self, data: st.DataObject, new_tokens: int) -> None:
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        needed = self.bm.pages_needed(seq, new_tokens)
        if needed > self.bm.free_pages:
            before = _snapshot(self.bm, sorted(self.tokens))
            with pytest.raises(CacheFullError):
                self.bm.grow(seq, new_tokens)
            assert _snapshot(self.bm, sorted(self.tokens)) == before
            return
        free = self.bm.free_pages
        for src, dst in self.bm.grow(seq, new_tokens):
            self.cache[dst] = self.cache[src]
        assert free - self.bm.free_pages == needed
        pages, size = self.bm.pages(seq), self.bm.page_size
        for _ in range(new_tokens):
            p = len(self.tokens[seq])
            self.cache[pages[p // size], p % size] = self.next_token
            self.tokens[seq].append(self.next_token)
            self.next_token += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.fork(parent, self.next_id)
        self.tokens[self.next_id] = list(self.tokens[parent])
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq)
        del self.tokens[seq]

    @invariant()
    def every_sequence_reads_back_its_tokens(self) -> None:
        size = self.bm.page_size
        for seq, tokens in self.tokens.items():
            pages = self.bm.pages(seq)
            assert self.bm.length(seq) == len(tokens)
            assert len(pages) == -(-len(tokens) // size)
            read = [int(self.cache[pages[p // size], p % size]) for p in range(len(tokens))]
            assert read == tokens

    @invariant()
    def reference_counts_match_the_page_lists(self) -> None:
        held = [p for seq in self.tokens for p in self.bm.pages(seq)]
        refs = [self.bm.ref_count(p) for p in range(self.bm.num_pages)]
        assert sum(refs) == len(held)
        assert all(refs[p] == held.count(p) for p in range(self.bm.num_pages))
        assert self.bm.free_pages + len(set(held)) == self.bm.num_pages

    @invariant()
    def page_table_matches_the_page_lists(self) -> None:
        seqs = sorted(self.tokens)
        indptr, indices = self.bm.page_table(seqs)
        assert indices.tolist() == [p for s in seqs for p in self.bm.pages(s)]
        assert np.diff(indptr).tolist() == [len(self.bm.pages(s)) for s in seqs]


PagedCache.TestCase.settings = settings(max_examples=80, stateful_step_count=30,
                                        deadline=None)
TestPagedCache = PagedCache.TestCase
