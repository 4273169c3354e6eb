"""Proposing configs to measure: model-guided evolutionary search, and random search.

Both propose batches of configs of one template's knob space that `valid` keeps for the problem
and that have not been measured yet. The evolutionary search keeps a population ranked by the
cost model: it starts from the best measured configs and random ones, breeds children (one knob
changed, or two parents crossed), keeps the best-scored, and after a few generations proposes
the top of the population, plus a share of random configs so the model keeps learning about
parts of the space it scores badly (exploration).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..codegen.template import Config, KernelTemplate, Problem

Scorer = Callable[[Sequence[Config]], np.ndarray]
"""Scores configs, higher = predicted faster."""


@dataclass(frozen=True)
class SearchOptions:
    """How the evolutionary search explores."""

    population: int = 64
    generations: int = 4
    mutation: float = 0.85  # the rest of the children are crossovers
    explore: float = 0.25  # share of each batch proposed at random
    max_tries: int = 2000  # random draws spent finding valid configs


def random_valid(template: KernelTemplate, problem: Problem, rng: random.Random, count: int,
                 exclude: set[Config], max_tries: int = 2000) -> list[Config]:
    """Up to `count` distinct valid configs not in `exclude`, drawn uniformly."""
    out: list[Config] = []
    seen = set(exclude)
    for _ in range(max_tries):
        if len(out) >= count:
            break
        config = Config({k.name: rng.choice(k.choices) for k in template.space.knobs})
        if config not in seen and template.valid(problem, config):
            seen.add(config)
            out.append(config)
    return out


def mutate(template: KernelTemplate, config: Config, rng: random.Random) -> Config:
    """`config` with one knob set to another of its choices."""
    knobs = [k for k in template.space.knobs if len(k.choices) > 1]
    if not knobs:
        return config
    knob = rng.choice(knobs)
    choice = rng.choice([c for c in knob.choices if c != config[knob.name]])
    return Config({**config, knob.name: choice})


def neighbours(template: KernelTemplate, config: Config) -> list[Config]:
    """Every config that differs from `config` in exactly one knob."""
    return [Config({**config, knob.name: choice}) for knob in template.space.knobs
            for choice in knob.choices if choice != config[knob.name]]


def crossover(a: Config, b: Config, rng: random.Random) -> Config:
    """Each knob taken from one parent or the other."""
    return Config({name: (a if rng.random() < 0.5 else b)[name] for name in a})


def evolutionary_search(template: KernelTemplate, problem: Problem, score: Scorer,
                        measured: Iterable[tuple[Config, float]], batch: int,
                        rng: random.Random, options: SearchOptions = SearchOptions(),
                        ) -> list[Config]:
    """A batch of unmeasured valid configs: the model's favourites plus random exploration."""
    measured = list(measured)
    done = {c for c, _ in measured}
    elite = [c for c, _ in sorted(measured, key=lambda ct: ct[1])[:options.population // 4]]
    population = list(dict.fromkeys(elite + random_valid(
        template, problem, rng, options.population - len(elite), done, options.max_tries)))
    if not population:
        return []
    for _ in range(options.generations):
        children = []
        for _ in range(options.population):
            if rng.random() < options.mutation or len(population) < 2:
                child = mutate(template, rng.choice(population), rng)
            else:
                mother, father = rng.sample(population, 2)
                child = crossover(mother, father, rng)
            if template.valid(problem, child):
                children.append(child)
        pool = list(dict.fromkeys(population + children))
        scores = score(pool)
        order = sorted(range(len(pool)), key=lambda i: (-scores[i], pool[i].to_json()))
        population = [pool[i] for i in order[:options.population]]
    fresh = [c for c in population if c not in done]
    n_explore = max(0, min(batch, round(batch * options.explore)))
    chosen = fresh[:batch - n_explore]
    chosen += random_valid(template, problem, rng, batch - len(chosen), done | set(chosen),
                           options.max_tries)
    return chosen


def random_search(template: KernelTemplate, problem: Problem, measured: Iterable[Config],
                  batch: int, rng: random.Random) -> list[Config]:
    """The baseline: a batch of unmeasured valid configs drawn uniformly."""
    return random_valid(template, problem, rng, batch, set(measured))
