"""Fake models for the serving tests: plain Python functions with a model's contract, whose
timing and failures the tests control, and which record every batch they run."""
from __future__ import annotations

import threading
import time

import numpy as np

from bitsmith.runtime.artifact import TensorSpec
from bitsmith.serving.served import ServedModel

POISON = -999.0
"""A row holding this value makes the fake model raise (alone or in a batch)."""


class Recorder:
    """y = 2x + 1 and s = row sums of x (B, 3); records the batch size of every run; sleeps
    `delay` seconds per run, waits for `gate` when given, raises on a POISON row."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay, self.gate = delay, gate
        self.calls: list[int] = []
        self.rows_seen: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.calls.append(x.shape[0])
        self.rows_seen.append(x.copy())
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if (x == POISON).any():
            raise ValueError("poison row")
        return [x * 2 + 1, x.sum(axis=1)]


def expected(x: np.ndarray) -> list[np.ndarray]:
    """What the fake model answers for x."""
    return [x * 2 + 1, x.sum(axis=1)]


def fake_model(name: str = "fake", *, max_batch: int = 8, delay: float = 0.0,
               gate: threading.Event | None = None) -> tuple[ServedModel, Recorder]:
    """A dynamic-batch fake model x: (B, 3) f32 -> y: (B, 3), s: (B,)."""
    recorder = Recorder(delay, gate)
    model = ServedModel(name, [TensorSpec("x", ("B", 3), "f32")],
                        [TensorSpec("y", ("B", 3), "f32"), TensorSpec("s", ("B",), "f32")],
                        recorder, max_batch=max_batch)
    return model, recorder
