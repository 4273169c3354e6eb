"""Spending trials across the kernels of a model where they are expected to pay most.

Each task (a distinct kernel; identical kernels of a model are one task, weighted by how often
they occur) first gets one round so that its time is known. After that, each round goes to
the task with the largest expected gain: its share of model time (weight x best median) times
its expected relative improvement from one more round, estimated from how much its best time
moved over its last few rounds, with an optimistic floor that shrinks as the task gets more
trials (so that a task that stopped improving is not abandoned forever). Ties go to the task key
so runs are deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TaskState:
    """What the scheduler knows of one task."""

    key: str
    weight: float  # occurrences of this kernel in the model(s)
    best: float = math.inf  # best median seconds so far
    history: list[float] = field(default_factory=list)  # best after each round
    trials: int = 0
    exhausted: bool = False  # every valid config measured, or nothing left to propose

    @property
    def share(self) -> float:
        """Seconds of model time this task accounts for (at its best so far)."""
        return self.weight * self.best if math.isfinite(self.best) else 0.0

    def expected_gain(self, window: int) -> float:
        """Seconds of model time one more round is expected to save."""
        if len(self.history) < 2:
            rate = 0.5
        else:
            old = self.history[max(0, len(self.history) - 1 - window)]
            rounds = min(window, len(self.history) - 1)
            rate = (old - self.history[-1]) / old / rounds if math.isfinite(old) else 0.5
        floor = 0.1 / (1.0 + self.trials / 16)
        return self.share * max(rate, floor)


class TaskScheduler:
    """Chooses the task of the next round."""

    def __init__(self, tasks: list[TaskState], window: int = 3) -> None:
        self.tasks = {t.key: t for t in tasks}
        self.window = window

    def next(self) -> TaskState | None:
        """The task to tune next, or None when every task is exhausted."""
        live = [t for t in self.tasks.values() if not t.exhausted]
        if not live:
            return None
        unseen = [t for t in live if t.trials == 0]
        if unseen:
            return max(unseen, key=lambda t: (t.weight, t.key))
        return max(live, key=lambda t: (t.expected_gain(self.window), t.key))

    def update(self, key: str, best: float, trials: int, exhausted: bool = False) -> None:
        """Record a round of `key`: its best median so far and trials spent in the round."""
        task = self.tasks[key]
        task.best = min(task.best, best)
        task.history.append(task.best)
        task.trials += trials
        task.exhausted = exhausted

    def estimated_total(self) -> float:
        """Model time (seconds) if every task ran at its best so far."""
        return sum(t.share for t in self.tasks.values())
