"""Evolutionary and random search proposals; the task scheduler's choices."""
from __future__ import annotations

import math
import random

import numpy as np

from bitsmith.autotune.scheduler import TaskScheduler, TaskState
from bitsmith.autotune.search import SearchOptions, evolutionary_search, mutate, random_search
from bitsmith.codegen.template import Config, KernelTemplate, Knob, KnobSpace, Problem


class Toy(KernelTemplate):
    """A space of 4 x 5 x 2 configs; a config is valid when A * B <= 12."""

    name = "toy"
    space = KnobSpace(Knob("A", (1, 2, 3, 4)), Knob("B", (1, 2, 3, 4, 5)), Knob("C", (True, False)))

    def valid(self, problem: Problem, config: Config) -> bool:
        return config["A"] * config["B"] <= 12


PROBLEM = Problem("toy", {})


def _prefers_big_a(configs):
    return np.array([c["A"] * 10 + c["B"] for c in configs], dtype=float)


def test_evolutionary_search_exploits_the_model_and_explores() -> None:
    toy = Toy()
    measured = [(Config({"A": 1, "B": 1, "C": True}), 1.0)]
    batch = evolutionary_search(toy, PROBLEM, _prefers_big_a, measured, 8, random.Random(0),
                                SearchOptions(explore=0.25))
    assert len(batch) == len(set(batch)) == 8
    assert all(toy.valid(PROBLEM, c) for c in batch)
    assert measured[0][0] not in batch
    favourites = batch[:6]  # the model's picks come first, 2 of 8 are random
    assert all(c["A"] == 4 and c["B"] == 3 for c in favourites[:2])
    assert sum(c["A"] >= 3 for c in favourites) == 6


def test_searches_are_deterministic_and_stop_when_the_space_is_used_up() -> None:
    toy = Toy()
    a = evolutionary_search(toy, PROBLEM, _prefers_big_a, [], 8, random.Random(3))
    b = evolutionary_search(toy, PROBLEM, _prefers_big_a, [], 8, random.Random(3))
    assert a == b
    every = [c for c in toy.space.configs() if toy.valid(PROBLEM, c)]
    assert set(random_search(toy, PROBLEM, every[:-2], 10, random.Random(0))) == set(every[-2:])
    assert random_search(toy, PROBLEM, every, 4, random.Random(0)) == []
    config = Config({"A": 2, "B": 2, "C": True})
    changed = mutate(toy, config, random.Random(1))
    assert sum(changed[k] != config[k] for k in config) == 1


def test_scheduler_visits_every_task_then_follows_the_expected_gain() -> None:
    tasks = [TaskState("small", weight=1), TaskState("big", weight=3), TaskState("mid", weight=2)]
    scheduler = TaskScheduler(tasks)
    order = []
    for best in (1e-3, 2e-3, 1e-3):
        task = scheduler.next()
        order.append(task.key)
        scheduler.update(task.key, best, trials=8)
    assert order == ["big", "mid", "small"]  # unseen tasks first, heaviest first
    # "big" (3 x 2 ms) stops improving, "mid" (2 x 1 ms) keeps improving fast
    scheduler.update("big", 2e-3, 8)
    scheduler.update("mid", 0.5e-3, 8)
    gains = {k: t.expected_gain(3) for k, t in scheduler.tasks.items()}
    assert scheduler.next().key == max(gains, key=gains.get) == "mid"
    assert math.isclose(scheduler.estimated_total(), 3 * 1e-3 + 2 * 0.5e-3 + 1 * 1e-3)
    for key in ("big", "mid", "small"):
        scheduler.update(key, 1e-3, 0, exhausted=True)
    assert scheduler.next() is None
