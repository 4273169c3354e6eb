"""Cache-affinity routing of LLM requests over replicas (used by `serve --ray`; no Ray here).

A request's routing key is a chain of hashes of its prompt's leading text, a link per
`CHUNK` characters (key_i = blake2b(key_{i-1} || chunk i), the first seeded with the model's
name), so two prompts share their first n links exactly when they share their first n chunks.
The gateway computes it from the OpenAI request body; the replicas' own prefix caches work on
token pages, which a shared text prefix fills alike.

`AffinityTable` remembers which replica each link last went to and ranks the replicas for a new
request:
1. the replica that took the longest prefix of this one, unless its queue is longer than the
   shortest queue by more than `slack` (load balancing wins over affinity);
2. otherwise (a prefix nobody holds yet) the two replicas that the request's first link hashes
   highest with (rendezvous hashing: the same two whichever gateway routes it, the dual
   mapping of the DualMap line of work): the one holding fewer links first, so that prefixes
   spread evenly over the replicas' caches, unless their queues differ by more than `slack`
   (then the router takes the shorter queue of the two);
3. then the rest.
"""
from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import orjson

CHUNK = 128
"""Characters per link of a routing key (about a KV page or two of tokens)."""
MAX_LINKS = 64
"""Links a key keeps (the first 8 KiB characters of a prompt decide where it goes)."""
ROUTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def _link(previous: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(previous + data, digest_size=8).digest()


def key_chain(model: str, text: str) -> tuple[bytes, ...]:
    """The chain of links of `text` for `model` (empty text: one link, the model's)."""
    data = text.encode("utf-8", "surrogatepass")
    links = [_link(b"", model.encode("utf-8", "surrogatepass"))]
    step = CHUNK
    for start in range(0, min(len(data), step * (MAX_LINKS - 1)), step):
        links.append(_link(links[-1], data[start:start + step]))
    return tuple(links)


KEYED_CHARS = CHUNK * (MAX_LINKS - 1)
"""Characters of a prompt's text that decide its key; the rest is never built."""


class _Text:
    """A prompt's leading text, built up to KEYED_CHARS and no further (a hostile body of
    millions of token ids or messages costs no more than a short one)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0

    @property
    def full(self) -> bool:
        return self.size >= KEYED_CHARS

    def add(self, text: str) -> None:
        if not self.full:
            piece = text[:KEYED_CHARS - self.size]
            self.parts.append(piece)
            self.size += len(piece)

    def add_content(self, value: Any) -> None:
        """A prompt or a message's content: a string, token ids, or a list of them (OpenAI's
        content parts, nested at most a level); anything else adds nothing."""
        if isinstance(value, str):
            self.add(value)
            return
        if not isinstance(value, list):
            return
        for item in value:
            if self.full:
                return
            if isinstance(item, int) and not isinstance(item, bool):
                self.add(f"{item} ")
            elif isinstance(item, str):
                self.add(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                self.add(item["text"])

    def text(self) -> str:
        return "".join(self.parts)


def routing_key(path: str, body: bytes) -> tuple[bytes, ...] | None:
    """The key of an OpenAI completion or chat request, or None (any other route, or a body
    that is not a JSON object: its replica answers it, with the same errors as ever)."""
    return describe(path, body)[0]


def describe(path: str, body: bytes) -> tuple[tuple[bytes, ...] | None, bool]:
    """A request's routing key (`routing_key`) and whether its answer streams (an OpenAI
    request with `"stream": true`)."""
    if path not in ROUTED_PATHS:
        return None, False
    try:
        doc = orjson.loads(body)  # refuses nesting past 1024 levels (JSONDecodeError)
    except orjson.JSONDecodeError:
        return None, False
    if not isinstance(doc, dict):
        return None, False
    return _key(path, doc), doc.get("stream") is True


def _key(path: str, doc: dict[str, Any]) -> tuple[bytes, ...] | None:
    model = doc.get("model")
    text = _Text()
    if path.endswith("/chat/completions"):
        messages = doc.get("messages")
        if not isinstance(messages, list):
            return None
        for m in messages:
            if text.full:
                break
            if isinstance(m, dict):
                role = m.get("role")
                text.add(f"<{role if isinstance(role, str) else ''}>")
                text.add_content(m.get("content"))
                text.add("\x00")
    else:
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of prompts: served one at a time, routed by the first
        text.add_content(prompt)
    return key_chain(model if isinstance(model, str) else "", text.text())


def _score(link: bytes, replica: Hashable) -> bytes:
    return hashlib.blake2b(link + str(replica).encode(), digest_size=8).digest()


R = TypeVar("R", bound=Hashable)
"""A replica's identity."""


class AffinityTable(Generic[R]):
    """Which replica each key link last went to (least recently used forgotten past
    `capacity`), and the ranking of replicas that follows from it."""

    def __init__(self, capacity: int = 1 << 18, slack: int = 4) -> None:
        if capacity < 1 or slack < 0:
            raise ValueError(f"expected capacity >= 1 and slack >= 0, got {capacity}, {slack}")
        self.capacity, self.slack = capacity, slack
        self.owner: OrderedDict[bytes, R] = OrderedDict()
        self.held: Counter[R] = Counter()  # links each replica holds

    def rank(self, chain: Sequence[bytes], loads: Mapping[R, int | None]) -> list[list[R]]:
        """The replicas of `loads` (replica -> requests queued, None if not known) in ranks,
        most preferred first; the router takes the least loaded of the first rank that has
        room."""
        if not loads:
            return []
        known = [n for n in loads.values() if n is not None]
        least = min(known, default=0)
        for link in reversed(chain[1:]):  # chain[0] is the model's: every request has it
            holder = self.owner.get(link)
            if holder is None or holder not in loads:
                continue
            if (loads[holder] or 0) <= least + self.slack:
                return [[holder]] + self._pairs(chain, loads, skip=holder)
            return self._pairs(chain, loads)  # the holder is too busy: spread by load
        pair, *rest = self._pairs(chain, loads) or [[]]
        queued = [loads[r] or 0 for r in pair]
        if len(pair) == 2 and abs(queued[0] - queued[1]) <= self.slack:
            pair.sort(key=lambda r: self.held[r])  # stable: ties keep the hash order
            return [[pair[0]], [pair[1]], *rest]
        return [pair, *rest]

    def _pairs(self, chain: Sequence[bytes], loads: Mapping[R, int | None],
               skip: R | None = None) -> list[list[R]]:
        first = chain[1] if len(chain) > 1 else chain[0] if chain else b""  # the text's
        order = sorted((r for r in loads if r != skip), reverse=True,
                       key=lambda r: _score(first, r))
        return [rank for rank in (order[:2], order[2:]) if rank]

    def record(self, chain: Sequence[bytes], replica: R) -> None:
        """`replica` took a request of this key: it holds (or is about to) its prefix."""
        for link in chain[1:]:
            before = self.owner.get(link)
            if before != replica:
                if before is not None:
                    self.held[before] -= 1
                self.held[replica] += 1
            self.owner[link] = replica
            self.owner.move_to_end(link)
        while len(self.owner) > self.capacity:
            self.held[self.owner.popitem(last=False)[1]] -= 1

    def forget(self, replica: R) -> None:
        """A replica died: nothing routes to it by affinity any more."""
        for link in [k for k, r in self.owner.items() if r == replica]:
            del self.owner[link]
        self.held.pop(replica, None)
