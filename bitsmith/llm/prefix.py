"""Prefix caching: full KV pages found again by the tokens that fill them and every page
before them, so that requests sharing a prompt prefix (a system prompt, a conversation so far)
skip its prefill.

A page's key is a chained hash: key_i = blake2b(key_{i-1} || tokens of page i), so equal keys
mean equal token prefixes (128-bit digests: a collision, which would hand a request another
prefix's cache, is not a practical concern). Only full pages are cached: they are never
written again (`blocks`), so a cached page's contents stay what its key says. The cache holds
each of its pages once itself; a page only the cache holds is evictable, least recently used
first, when the pool runs short.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .blocks import BlockManager

ROOT = b""
"""The key before a sequence's first page."""


def page_key(previous: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a page holding `tokens` after the pages whose last key is `previous`."""
    data = previous + np.asarray(tokens, "<i8").tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


class PrefixCache:
    """Full pages by chained key, in LRU order, each held once by the cache."""

    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self.pages: OrderedDict[bytes, int] = OrderedDict()
        self.looked_up = 0  # prompt tokens a lookup could have found
        self.found = 0  # of which found
        self.evicted = 0

    def match(self, prompt: Sequence[int], count: bool = True) -> tuple[list[int], list[bytes]]:
        """The cached pages that start `prompt` and their keys, leaving at least its last
        token to be fed (its logits give the first generated token); with `count`, counted in
        the hit rate (else call `count` once the match is used)."""
        size = self.blocks.page_size
        full = (len(prompt) - 1) // size
        pages: list[int] = []
        keys: list[bytes] = []
        key = ROOT
        for i in range(full):
            key = page_key(key, prompt[i * size:(i + 1) * size])
            page = self.pages.get(key)
            if page is None:
                break
            self.pages.move_to_end(key)
            pages.append(page)
            keys.append(key)
        if count:
            self.count(len(prompt), len(pages))
        return pages, keys

    def count(self, prompt_tokens: int, pages: int) -> None:
        """Count one lookup in the hit rate: a prompt and the pages found for it."""
        size = self.blocks.page_size
        self.looked_up += (prompt_tokens - 1) // size * size
        self.found += pages * size

    def insert(self, tokens: Sequence[int], pages: Sequence[int], keys: list[bytes]) -> None:
        """Cache a sequence's full pages past those in `keys` (its keys so far, extended in
        place): `tokens` are the tokens its cache holds, `pages` its pages."""
        size = self.blocks.page_size
        for i in range(len(keys), len(tokens) // size):
            key = page_key(keys[-1] if keys else ROOT, tokens[i * size:(i + 1) * size])
            keys.append(key)
            if key in self.pages:
                self.pages.move_to_end(key)
                continue
            self.blocks.hold(pages[i])
            self.pages[key] = pages[i]

    def evictable(self) -> int:
        """Pages only the cache holds."""
        return sum(1 for page in self.pages.values() if self.blocks.ref_count(page) == 1)

    def evict(self, count: int) -> int:
        """Free up to `count` pages only the cache holds, least recently used first; returns
        how many were freed."""
        freed = 0
        for key in list(self.pages):
            if freed >= count:
                break
            page = self.pages[key]
            if self.blocks.ref_count(page) == 1:
                del self.pages[key]
                self.blocks.release(page)
                freed += 1
        self.evicted += freed
        return freed

    def clear(self) -> None:
        """Drop every page the cache holds (those sequences hold stay theirs)."""
        for page in self.pages.values():
            self.blocks.release(page)
        self.pages.clear()
