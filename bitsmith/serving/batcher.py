"""The dynamic batcher: one queue and one worker thread per model.

The worker takes the oldest request and every queued request that can share its batch (same
dims past the batch dim), up to the model's largest batch size, and runs them. It runs on a
thread of its own, not on the event loop: kernels run while the loop keeps accepting (TVM
releases the GIL), and the next batch starts the moment the last one ends, however busy the
loop is with requests (under overload an event-loop worker ran one batch per few loop turns,
and a turn can take tens of milliseconds). Answers go back to the loop with
`call_soon_threadsafe`.

- Low load: a request that finds the worker idle runs at once; nothing waits for company.
- Under load: requests queue while a batch runs. When it ends, the next batch waits for more
  requests only until its oldest request has waited `max_delay`, or until it is full.

A request carries a deadline. If it passes while the request is queued, the request is dropped
unrun; once running, its result is discarded. Every request's future is resolved exactly once.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DeadlineExceeded, QueueFull, ServingError
from .metrics import ServerMetrics
from .served import BatchOutcome, ServedModel


class StandingQueue(QueueFull):
    """The queue has room, but a request queued now would likely time out (see
    `Batcher.refusal`): refused as overload, told apart from a full queue in the metrics."""


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
    """Queues a model's requests (from the event loop) and runs them in batches (on its
    worker thread)."""

    def __init__(self, model: ServedModel, metrics: ServerMetrics, *, max_delay: float = 0.002,
                 queue_size: int = 256, timeout: float = 1.0) -> None:
        if queue_size < 1:
            raise ServingError(f"queue_size must be >= 1, got {queue_size}")
        self.model = model
        name = model.name  # the metrics' children for this model, looked up once
        self._depth_gauge = metrics.queue_depth.labels(name)
        self._queue_seconds = metrics.queue_seconds.labels(name)
        self._compute_seconds = metrics.compute_seconds.labels(name)
        self._batch_rows = metrics.batch_rows.labels(name)
        self._padded_rows = metrics.padded_rows.labels(name)
        self._retried = metrics.retried_batches.labels(name)
        self.max_delay, self.queue_size, self.timeout = max_delay, queue_size, timeout
        self.overload_after = timeout / 2
        self._sojourn = 0.0  # moving average of enqueue-to-answer seconds (event loop only)
        self.capacity = model.max_rows if model.batchable else 1
        self._cond = threading.Condition()  # guards everything below
        self._queue: deque[Pending] = deque()
        self._queued = 0  # live (not dropped) requests in _queue
        self._rows_queued = 0  # their rows
        self._worker_waits = "busy"  # "work" (idle), "fill" (batch filling) or "busy"
        self._last_done = 0.0
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name=f"bitsmith-{name}", daemon=True)
        self.ready = False

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return self._queued

    def refusal(self, rows: int = 1) -> QueueFull | None:
        """The QueueFull that a request of `rows` submitted now would raise, or None.

        Besides a full queue, a standing one is refused (with StandingQueue): when the batch
        running and those queued ahead of the request (at the recent time per batch), or the
        recent answers' time from arrival, exceed half the deadline. Such a request would likely
        time out; a 503 now is cheaper for both sides and tells the client when to come back."""
        ahead = math.ceil((self._rows_queued + rows) / max(self.capacity, 1))
        retry = max(1, math.ceil(ahead * max(self._batch_seconds, 0.001)))
        if self._queued >= self.queue_size:
            return QueueFull(f"the queue of model {self.model.name} is full ({self.queue_size} "
                             f"requests); retry after {retry} s or add replicas", retry)
        if not self._queued:
            return None  # nothing waits: nothing stands in the way
        wait = max((ahead + 1) * self._batch_seconds, self._sojourn)  # +1: the running batch
        if wait > self.overload_after:
            return StandingQueue(f"model {self.model.name} is overloaded: a new request would "
                                 f"wait about {wait * 1e3:.0f} ms, over half its "
                                 f"{self.timeout * 1e3:g} ms deadline; retry after {retry} s "
                                 "or add replicas", retry)
        return None

    def start(self) -> None:
        """Start the worker; call from the event loop that will await the requests."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def submit(self, arrays: Sequence[np.ndarray], rows: int) -> Pending:
        """Queue a checked request; raises QueueFull. Its future resolves to the outputs, the
        exception the model raised on it, or DeadlineExceeded after the timeout."""
        loop = asyncio.get_running_loop()
        pending = Pending(arrays, rows, ServedModel.key_of(arrays), loop.create_future())
        with self._cond:
            refused = self.refusal(rows)
            if refused is not None:
                raise refused
            self._queue.append(pending)
            self._queued += 1
            self._rows_queued += rows
            self._depth_gauge.set(self._queued)
            # wake the worker only when it has something to do: every wake-up costs a GIL
            # hand-off between the loop and the worker thread
            if self._worker_waits == "work" or (self._worker_waits == "fill"
                                               and self._rows_queued >= self.capacity):
                self._cond.notify()
        timer = loop.call_later(self.timeout, self._expire, pending)
        pending.future.add_done_callback(lambda _f: timer.cancel())
        return pending

    def _expire(self, pending: Pending) -> None:
        """The deadline passed: drop the request if it has not started, and answer it."""
        if pending.future.done():
            return
        with self._cond:
            unrun = pending.state == "queued"
            if unrun:
                pending.state = "dropped"
                self._queued -= 1
                self._rows_queued -= pending.rows
                self._depth_gauge.set(self._queued)
        pending.future.set_exception(DeadlineExceeded(unrun))

    async def warm_up(self) -> None:
        """Run every batch size once (off the event loop), then mark the model ready."""
        for arrays in self.model.warmup_inputs():
            await asyncio.to_thread(self.model.run, *arrays)
        self.ready = True

    async def close(self) -> None:
        """Stop the worker once the queue is empty and wait for it."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def _work(self) -> None:
        """The worker thread: take a batch, run it, hand the answers to the loop; until closed."""
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            start = time.monotonic()
            for p in batch:
                self._queue_seconds.observe(start - p.enqueued)
            outcome = self.model.run_batch([p.arrays for p in batch])
            done = time.monotonic()
            self._record(outcome, done - start)
            with self._cond:
                self._last_done = done
            self._loop.call_soon_threadsafe(self._resolve, batch, outcome)  # type: ignore[union-attr]

    def _next_batch(self) -> list[Pending] | None:
        """Block until there is work; the batch (None once closing with an empty queue)."""
        with self._cond:
            while True:
                head = self._head()
                if head is None:
                    if self._closing:
                        return None
                    self._worker_waits = "work"
                    self._cond.wait()
                    self._worker_waits = "busy"
                    continue
                if head.enqueued < self._last_done and not self._closing:
                    self._fill(head)  # under load: let the batch fill for up to max_delay
                    if self._head() is not head:
                        continue  # the head timed out meanwhile
                return self._take(head)

    def _fill(self, head: Pending) -> None:
        deadline = head.enqueued + self.max_delay
        while self._rows_for(head) < self.capacity and head.state == "queued":
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                return
            self._worker_waits = "fill"
            self._cond.wait(left)
            self._worker_waits = "busy"

    def _head(self) -> Pending | None:
        while self._queue and self._queue[0].state != "queued":
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    def _rows_for(self, head: Pending) -> int:
        return sum(p.rows for p in self._queue if p.state == "queued" and p.key == head.key)

    def _take(self, head: Pending) -> list[Pending]:
        """The head request and the queued requests that fit in its batch, in arrival order."""
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
        self._rows_queued -= rows
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

    def _resolve(self, batch: Sequence[Pending], outcome: BatchOutcome) -> None:
        """On the event loop: answer each request of a batch that ran (unless it timed out)."""
        now = time.monotonic()
        for p, result in zip(batch, outcome.results, strict=True):
            p.state = "done"
            self._sojourn = 0.9 * self._sojourn + 0.1 * (now - p.enqueued)
            if p.future.done():  # its deadline passed while it ran
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
