"""Continuous batching over an `Engine`: one step at a time over every running sequence.

Requests wait in arrival order. Each step admits waiting requests while the batch has room
(at most the engine's `max_batch` sequences) and the KV pool can hold everything an admitted
request may need: its prompt plus `max_new_tokens`, up to `max_seq`. That reservation is what
admission checks, so a running request never meets a full cache and nothing is preempted
(a request that does not fit waits; one that could never fit is refused at submission).

A step spends a token budget (Sarathi-Serve's stall-free batching): every running sequence
past its prompt decodes one token first, then prompt chunks of the sequences still in prefill
fill what is left, oldest first. A long prompt therefore costs the decodes in flight one step
of at most `token_budget` rows, never its whole prefill. Finished and cancelled sequences
leave at once and free their pages; waiting ones join at the next step.

With an inter-token latency target (`itl_slo`, seconds) the budget is chosen step by step: the
scheduler predicts each candidate step from the step latency model measured on this host
(`latency.measure`, at `calibrate`) and adds prompt chunks only while decodes in flight would
still meet the target (when none is in flight, prompts take the whole budget; when even the
smallest prompt chunk misses it, that chunk runs so that prompts always advance).

The scheduler runs on one thread (`run` or `step`); `submit` and `cancel` may be called from
any thread. Each request reports through its `on_event` callback, on the scheduler's thread:
`("text", delta)` as text becomes final (stop strings are held back until they cannot match),
then `("done", Completion)` or `("error", message)`.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import BitsmithError, InputError
from .api import LLM, Completion, Request
from .latency import StepModel, measure
from .prefix import PrefixCache
from .sampling import SamplingParams

Event = tuple[str, Any]
"""("text", str) | ("done", Completion) | ("error", str)."""


class Observer(Protocol):
    """What a scheduler reports as it runs (the server's metrics), on its own thread."""

    def token(self, first: bool, seconds: float) -> None:
        """A token sampled: the time to first token (from submission) or since the last one."""

    def step(self, scheduler: Scheduler, prompt_tokens: int, new_tokens: int) -> None:
        """A step done: the prompt tokens it fed and the tokens it sampled."""


POLICIES = ("chunked", "prefill-first", "whole")
"""How steps are filled: `chunked` (the default: decodes first, then prompt chunks in what is
left of the token budget), `prefill-first` (while a prompt is being read its chunks run alone
and the decodes in flight wait: no chunked prefill, as vLLM's first scheduler), `whole`
(requests batched whole: a batch is admitted only when the last one has finished, as a
request-level batcher does). The last two exist to measure the first against."""


class SchedulerFull(BitsmithError):
    """More requests wait than the scheduler queues (`max_waiting`): try again later."""


@dataclass
class Handle:
    """A submitted request: its id, and what reports on it."""

    id: int
    request: Request
    on_event: Callable[[Event], None]
    reserved: int = 0  # KV pages it may take from the pool (set aside at admission)
    shared: int = 0  # pages of a cached prefix it started with
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full pages
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)


class Scheduler:
    """Continuous batching with chunked prefill over one LLM's engine."""

    def __init__(self, llm: LLM, *, token_budget: int | None = None,
                 max_batch: int | None = None, max_waiting: int = 1024,
                 observer: Observer | None = None, prefix_cache: bool = False,
                 policy: str = "chunked", itl_slo: float | None = None,
                 step_model: StepModel | None = None) -> None:
        if policy not in POLICIES:
            raise InputError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
        if itl_slo is not None and not (isinstance(itl_slo, int | float) and itl_slo > 0):
            raise InputError(f"itl_slo: expected seconds > 0, got {itl_slo!r}")
        if itl_slo is not None and policy != "chunked":
            raise InputError(f"an inter-token latency target needs the chunked policy, got "
                             f"{policy!r}")
        self.itl_slo = itl_slo
        self.step_model = step_model
        self.predicted: float | None = None  # the last step's predicted seconds (with itl_slo)
        self.policy = policy
        engine = llm.engine
        self.observer = observer
        self.llm = llm
        self.engine = engine
        most = engine.max_tokens(1)
        self.token_budget = min(token_budget or most, most)
        if self.token_budget < 1:
            raise InputError(f"token_budget must be >= 1, got {token_budget}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise InputError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.max_batch = min(max_batch or engine.max_batch, engine.max_batch)
        self.max_waiting = max_waiting
        self.waiting: deque[Handle] = deque()
        self.running: list[Handle] = []
        self.prefix_cache = PrefixCache(engine.blocks) if prefix_cache else None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self.steps = 0
        self.tokens_in = 0
        self.tokens_out = 0

    # ---- any thread ------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> Handle:
        """Queue a request; raises `InputError` for one that can never run and
        `SchedulerFull` when `max_waiting` requests wait already."""
        ids = [int(t) for t in prompt]
        engine = self.engine
        if not ids:
            raise InputError("the prompt is empty: give at least one token")
        if len(ids) >= engine.max_seq:
            raise InputError(f"the prompt has {len(ids)} tokens; this model's context is "
                             f"{engine.max_seq} tokens, prompt and reply together")
        with self._lock:
            if self._stopping:
                raise SchedulerFull("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise SchedulerFull(f"{len(self.waiting)} requests wait already (at most "
                                    f"{self.max_waiting}); retry later")
            request = Request(next(self.llm._ids), ids, params, self.llm)
            handle = Handle(request.id, request, on_event)
            self.waiting.append(handle)
            self._wake.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop a request (a client went away): its pages are freed at the next step."""
        with self._lock:
            handle.cancelled = True
            self._wake.notify()

    def stop(self) -> None:
        """Refuse new requests; `run` returns once every admitted and waiting one is done."""
        with self._lock:
            self._stopping = True
            self._wake.notify()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the scheduler's thread ------------------------------------------------------------
    def calibrate(self, progress: Callable[[str], None] | None = None) -> StepModel:
        """Measure the step latency model (`latency.measure`) unless given one; run it before
        any request is admitted (it borrows free pages)."""
        if self.step_model is None:
            self.step_model = measure(self.engine, progress=progress)
        return self.step_model

    def run(self) -> None:
        """Step until `stop` and nothing is left (calibrating first for an ITL target)."""
        if self.itl_slo is not None:
            self.calibrate()
        while True:
            with self._lock:
                while not self.busy and not self._stopping:
                    self._wake.wait()
                if not self.busy and self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                self.fail_all(f"the scheduler failed: {type(exc).__name__}: {exc}")

    def fail_all(self, message: str) -> None:
        """End every running and waiting request with an error (the pages come back)."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for h in waiting:
            _report(h, ("error", message))
        for h in list(self.running):
            self._finish(h, ("error", message))

    def step(self) -> bool:
        """One engine step over the running sequences (and newly admitted ones); returns
        whether there was anything to run."""
        self._drop_cancelled()
        self._admit()
        work = self._plan()
        if not work:
            if self.observer is not None:  # pages freed by cancels show at once
                self.observer.step(self, 0, 0)
            return False
        if self.prefix_cache is not None:  # the pages this step takes, from the LRU if need be
            blocks = self.engine.blocks
            short = sum(blocks.pages_needed(h.id, len(t)) for h, t in work) - blocks.free_pages
            if short > 0:
                self.prefix_cache.evict(short)
        try:
            logits = self.engine.step([(h.id, tokens) for h, tokens in work])
        except Exception as exc:  # noqa: BLE001 - a failed step ends its requests only
            for handle, _ in work:
                self._finish(handle, ("error", f"{type(exc).__name__}: {exc}"))
            return True
        self.steps += 1
        now = time.perf_counter()
        fed = sampled = 0
        for (handle, tokens), row in zip(work, logits, strict=True):
            r = handle.request
            if r.fed < len(r.prompt):  # a prompt chunk
                r.fed += len(tokens)
                fed += len(tokens)
            try:
                sampled += self._after_step(handle, row, now)
            except Exception as exc:  # noqa: BLE001 - e.g. NaN logits: this request ends
                self._finish(handle, ("error", f"{type(exc).__name__}: {exc}"))
        self.tokens_in += fed
        self.tokens_out += sampled
        if self.observer is not None:
            self.observer.step(self, fed, sampled)
        return True

    def _after_step(self, handle: Handle, row: Any, now: float) -> int:
        """Cache the pages the step filled, sample if the prompt is done; tokens sampled."""
        r = handle.request
        held = self.engine.blocks.length(handle.id)
        if self.prefix_cache is not None and \
                held // self.engine.blocks.page_size > len(handle.keys):
            # a page filled by this step: cached for later prompts (the token list is built
            # only then, not at every decode step)
            self.prefix_cache.insert((r.prompt + r.out.token_ids)[:held],
                                     self.engine.blocks.pages(handle.id), handle.keys)
        if r.fed < len(r.prompt):
            return 0  # more of the prompt next step
        text = r.accept(row, self.engine.max_seq)
        if self.observer is not None:
            since = handle.submitted if handle.last_token is None else handle.last_token
            self.observer.token(handle.last_token is None, now - since)
        handle.last_token = now
        if text:
            _report(handle, ("text", text))
        if r.out.finish_reason is not None:
            self._finish(handle, ("done", r.out))
        return 1

    def _pages(self, prompt: int, params: SamplingParams) -> int:
        most = min(prompt + params.max_new_tokens, self.engine.max_seq)
        return math.ceil(most / self.engine.blocks.page_size)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [h for h in self.waiting if h.cancelled]
            for h in gone:
                self.waiting.remove(h)
        for h in gone:
            _report(h, ("error", "cancelled"))
        for h in [h for h in self.running if h.cancelled]:
            self._finish(h, ("error", "cancelled"))

    def _outstanding(self) -> int:
        """Pages the running requests may still take from the pool: what each reserved less
        what it took already (its pages past the prefix it shares)."""
        blocks = self.engine.blocks
        return sum(h.reserved - (len(blocks.pages(h.id)) - h.shared) for h in self.running)

    def _admit(self) -> None:
        blocks = self.engine.blocks
        cache = self.prefix_cache
        with self._lock:
            if self.policy == "whole" and self.running:
                return  # the batch runs to its end before the next one starts
            while self.waiting and len(self.running) < self.max_batch:
                head = self.waiting[0]
                r = head.request
                prefix, keys = cache.match(r.prompt, count=False) if cache is not None \
                    else ([], [])
                need = self._pages(head.prompt_tokens, r.params) - len(prefix)
                # a cached page the request now shares stops being evictable
                taken = sum(1 for p in prefix if blocks.ref_count(p) == 1)
                available = blocks.free_pages - self._outstanding() + (
                    cache.evictable() if cache is not None else 0)
                if need + taken > available:
                    break  # first come, first served: it waits for pages to come back
                self.waiting.popleft()
                if cache is not None:
                    cache.count(len(r.prompt), len(prefix))
                head.reserved, head.shared, head.keys = need, len(prefix), keys
                blocks.add(head.id, prefix)
                r.fed = r.out.cached_tokens = len(prefix) * blocks.page_size
                self.running.append(head)

    def _plan(self) -> list[tuple[Handle, list[int]]]:
        budget = self.token_budget
        work: list[tuple[Handle, list[int]]] = []
        prefilling = [h for h in self.running if h.request.fed < len(h.request.prompt)]
        for h in self.running:  # decodes first: one token each
            if self.policy == "prefill-first" and prefilling:
                break
            r = h.request
            if r.fed >= len(r.prompt) and budget > 0:
                work.append((h, r.out.token_ids[-1:]))
                budget -= 1
        if self.itl_slo is not None and work and prefilling:
            budget = self._slo_budget(work, prefilling, budget)
        return work + _chunks(prefilling, budget)

    def _slo_budget(self, decodes: list[tuple[Handle, list[int]]], prefilling: list[Handle],
                    budget: int) -> int:
        """The most prompt tokens (a compiled step size less the decodes) whose step the
        model predicts within the target; the smallest such size when none is."""
        model, target = self.step_model, self.itl_slo
        if model is None or target is None:
            raise InputError("an ITL target needs the step latency model: call calibrate()")
        length = self.engine.blocks.length
        steps = sorted({e.tokens - len(decodes) for e in self.engine.entries
                        if not e.scores_all and 0 < e.tokens - len(decodes) <= budget},
                       reverse=True) or [budget]
        seen = [(length(h.id), 1) for h, _ in decodes]
        for take in steps:
            chunks = [(length(h.id), len(t)) for h, t in _chunks(prefilling, take)]
            self.predicted = model.predict(seen + chunks)
            if self.predicted <= target:
                return take
        return steps[-1]

    def _finish(self, handle: Handle, event: Event) -> None:
        if handle in self.running:
            self.running.remove(handle)
            self.engine.blocks.free(handle.id)
        _report(handle, event)


def _chunks(prefilling: list[Handle], budget: int) -> list[tuple[Handle, list[int]]]:
    """Prompt chunks, oldest first, within `budget` tokens."""
    work = []
    for h in prefilling:
        r = h.request
        if budget <= 0:
            break
        take = r.prompt[r.fed:r.fed + budget]
        work.append((h, take))
        budget -= len(take)
    return work


def _report(handle: Handle, event: Event) -> None:
    """Hand an event to its request's callback; a callback that fails (its client gone)
    cancels that request only."""
    try:
        handle.on_event(event)
    except Exception:  # noqa: BLE001 - whatever the callback raises, the others go on
        handle.cancelled = True


def run_all(scheduler: Scheduler, prompts: Sequence[Sequence[int]],
            params: SamplingParams) -> list[Completion | str]:
    """Submit every prompt, step until all are done; each one's Completion (or its error)."""
    results: list[Completion | str | None] = [None] * len(prompts)

    def record(i: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            if event[0] != "text":
                results[i] = event[1]
        return on_event

    for i, prompt in enumerate(prompts):
        scheduler.submit(prompt, params, record(i))
    while scheduler.step():
        pass
    return [r if r is not None else "lost" for r in results]
