"""The dynamic batcher: one queue and one worker per model, on the server's event loop.

The worker takes the oldest request and every queued request that can share its batch (same
dims past the batch dim), up to the model's largest batch size, and runs them on a thread of
its own so the event loop keeps accepting while kernels run (TVM releases the GIL).

- Low load: a request that finds the executor idle runs at once; nothing waits for company.
- Under load: requests queue while a batch runs. When it ends, the next batch waits for more
  requests only until its oldest request has waited `max_delay`, or until it is full.

A request carries a deadline. If it passes while the request is queued, the request is dropped
unrun; once running, its result is discarded. Every request's future is resolved exactly once.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .metrics import ServerMetrics
from .served import BatchOutcome, ServedModel


class QueueFull(Exception):
    """The queue holds `queue_size` requests; `retry_after` estimates seconds until it drains."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """A request's deadline passed; `unrun` when it was dropped from the queue unrun."""

    def __init__(self, unrun: bool) -> None:
        super().__init__("deadline exceeded " + ("in the queue" if unrun else "while running"))
        self.unrun = unrun


@dataclass(eq=False)
class Pending:
    """One queued request."""

    arrays: Sequence[np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued -> running -> done, or queued -> dropped


class Batcher:
    """Queues a model's requests and runs them in batches."""

    def __init__(self, model: ServedModel, metrics: ServerMetrics, *, max_delay: float = 0.002,
                 queue_size: int = 256) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.model = model
        name = model.name  # the metrics' children for this model, looked up once
        self._depth_gauge = metrics.queue_depth.labels(name)
        self._queue_seconds = metrics.queue_seconds.labels(name)
        self._compute_seconds = metrics.compute_seconds.labels(name)
        self._batch_rows = metrics.batch_rows.labels(name)
        self._padded_rows = metrics.padded_rows.labels(name)
        self._retried = metrics.retried_batches.labels(name)
        self.max_delay, self.queue_size = max_delay, queue_size
        self.capacity = model.max_rows if model.batchable else 1
        self._queue: deque[Pending] = deque()
        self._queued = 0  # live (not dropped) requests in _queue
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"bitsmith-{model.name}")
        self._last_done = 0.0
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self._closing = False
        self.ready = False

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return self._queued

    def submit(self, arrays: Sequence[np.ndarray], rows: int, timeout: float) -> Pending:
        """Queue a checked request; raises QueueFull. Its future resolves to the outputs, the
        exception the model raised on it, or DeadlineExceeded after `timeout` seconds."""
        if self._queued >= self.queue_size:
            batches = math.ceil(self._queued / max(self.capacity, 1))
            retry = max(1, math.ceil(batches * max(self._batch_seconds, 0.001)))
            raise QueueFull(f"the queue of model {self.model.name} is full ({self.queue_size} "
                            f"requests); retry after {retry} s or add replicas", retry)
        pending = Pending(arrays, rows, ServedModel.key_of(arrays),
                          asyncio.get_running_loop().create_future())
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, self._expire, pending)
        pending.future.add_done_callback(lambda _f: timer.cancel())
        self._queue.append(pending)
        self._queued += 1
        self._depth_gauge.set(self._queued)
        self._wake.set()
        return pending

    def _expire(self, pending: Pending) -> None:
        """The deadline passed: drop the request if it has not started, and answer it."""
        if pending.future.done():
            return
        unrun = pending.state == "queued"
        if unrun:
            pending.state = "dropped"
            self._queued -= 1
            self._depth_gauge.set(self._queued)
        pending.future.set_exception(DeadlineExceeded(unrun))

    async def warm_up(self) -> None:
        """Run every batch size once (off the event loop), then mark the model ready."""
        loop = asyncio.get_running_loop()
        for arrays in self.model.warmup_inputs():
            await loop.run_in_executor(self._pool, lambda a=arrays: self.model.run(*a))
        self.ready = True

    def close(self) -> None:
        """Stop the worker once the queue is empty; its thread is then released."""
        self._closing = True
        self._wake.set()

    async def run_forever(self) -> None:
        """The worker: take a batch, run it, resolve its requests' futures; until closed."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queued:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._fill_under_load()
                batch = self._take()
                if not batch:
                    continue
                start = time.monotonic()
                for p in batch:
                    self._queue_seconds.observe(start - p.enqueued)
                outcome = await loop.run_in_executor(
                    self._pool, self.model.run_batch, [p.arrays for p in batch])
                self._last_done = time.monotonic()
                self._record(outcome, self._last_done - start)
                for p, result in zip(batch, outcome.results):
                    p.state = "done"
                    if p.future.done():  # its deadline passed while it ran
                        continue
                    if isinstance(result, BaseException):
                        p.future.set_exception(result)
                    else:
                        p.future.set_result(result)
        finally:
            self._pool.shutdown(wait=False)

    async def _fill_under_load(self) -> None:
        """When the head request queued while a batch ran, let the batch fill until the head
        has waited max_delay (or the batch is full)."""
        head = self._head()
        if head is None or head.enqueued >= self._last_done:
            return  # the executor was idle when it came: run at once
        deadline = head.enqueued + self.max_delay
        while self._rows_for(head) < self.capacity and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _head(self) -> Pending | None:
        while self._queue and self._queue[0].state != "queued":
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    def _rows_for(self, head: Pending) -> int:
        return sum(p.rows for p in self._queue if p.state == "queued" and p.key == head.key)

    def _take(self) -> list[Pending]:
        """The head request and the queued requests that fit in its batch, in arrival order."""
        head = self._head()
        if head is None:
            return []
        batch: list[Pending] = []
        rows = 0
        rest: deque[Pending] = deque()
        for p in self._queue:
            if p.state != "queued":
                continue
            if p.key == head.key and rows + p.rows <= self.capacity:
                p.state = "running"
                batch.append(p)
                rows += p.rows
            else:
                rest.append(p)
        self._queue = rest
        self._queued -= len(batch)
        self._depth_gauge.set(self._queued)
        return batch

    def _record(self, outcome: BatchOutcome, seconds: float) -> None:
        self._compute_seconds.observe(seconds)
        self._batch_rows.observe(outcome.rows)
        if outcome.padded:
            self._padded_rows.inc(outcome.padded)
        if outcome.retried:
            self._retried.inc()
        self._batch_seconds = seconds if not self._batch_seconds else (
            0.8 * self._batch_seconds + 0.2 * seconds)
