"""The greedy rewrite driver: patterns with a benefit, applied to a fixpoint under a cap."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PassError
from ..ir import Block, Module, Operation, Rewriter

RewriteFn = Callable[[Operation, "PatternRewriter"], bool]


@dataclass(frozen=True, slots=True)
class Pattern:
    """A rewrite rooted at ops named in `roots` (empty: any op); higher benefit is tried first.

    `fn(op, rewriter)` rewrites through the rewriter and returns True, or returns False and
    leaves the IR untouched.
    """

    name: str
    roots: tuple[str, ...]
    fn: RewriteFn
    benefit: int = 1

    def matches(self, op: Operation) -> bool:
        """Whether `op` is a root this pattern may be tried on."""
        return not self.roots or op.name in self.roots


def pattern(*roots: type[Operation] | str, benefit: int = 1) -> Callable[[RewriteFn], Pattern]:
    """Decorator: turn `fn(op, rw) -> bool` into a Pattern rooted at the given op kinds."""
    names = tuple(r if isinstance(r, str) else r.name for r in roots)

    def wrap(fn: RewriteFn) -> Pattern:
        return Pattern(fn.__name__, names, fn, benefit)
    return wrap


class PatternRewriter(Rewriter):
    """A Rewriter that knows its module, so patterns can add weights (e.g. folded constants)."""

    def __init__(self, module: Module) -> None:
        super().__init__(module.body)
        self.module = module

    def add_weight(self, base: str, array: np.ndarray) -> str:
        """Store a new module weight under a fresh name derived from `base`; return the name."""
        name, n = base, 1
        while name in self.module.weights:
            n += 1
            name = f"{base}.{n}"
        self.module.weights[name] = array
        self.changed = True
        return name


def _all_ops(module: Module) -> list[Operation]:
    return [op for op in module.walk() if op.name not in ("func.return", "kernel.yield")]


def apply_patterns(module: Module, patterns: Iterable[Pattern], *, max_iterations: int = 16,
                   before_sweep: Callable[[Block], object] | None = None) -> Counter[str]:
    """Sweep all ops trying `patterns` (best benefit first) until a sweep changes nothing.

    `before_sweep(module.body)` runs first in every sweep (canonicalize erases dead ops there,
    so that single-use checks in patterns see only live users).
    Returns how often each pattern fired. Raises PassError when `max_iterations` sweeps still
    changed the IR, naming the patterns that kept firing.
    """
    if max_iterations < 1:
        raise PassError(f"max_iterations must be >= 1, got {max_iterations}")
    ordered: Sequence[Pattern] = sorted(patterns, key=lambda p: -p.benefit)
    fired: Counter[str] = Counter()
    recent: list[Counter[str]] = []
    for _ in range(max_iterations):
        if before_sweep is not None:
            before_sweep(module.body)
        sweep = _sweep(module, ordered)
        fired.update(sweep)
        if not sweep:
            return fired
        recent = (recent + [sweep])[-2:]  # two patterns undoing each other alternate sweeps
    names = ", ".join(f"{name} ({n}x)" for name, n in sum(recent, Counter()).most_common())
    raise PassError(f"rewriting did not converge in {max_iterations} sweeps; patterns still "
                    f"firing in the last two sweeps: {names}. Two patterns probably undo each "
                    "other.")


def _sweep(module: Module, patterns: Sequence[Pattern]) -> Counter[str]:
    fired: Counter[str] = Counter()
    rewriter = PatternRewriter(module)
    for op in _all_ops(module):
        if op.parent is None:
            continue  # erased by an earlier rewrite in this sweep
        for p in patterns:
            if not p.matches(op):
                continue
            rewriter.set_insertion_before(op)
            if p.fn(op, rewriter):
                fired[p.name] += 1
                break
    return fired
