"""Range checks of index operands, run between kernels by both executors.

A plan step may list `index_checks`: each names an index operand of an op in the kernel
(`what`), the valid range ([-size, size) when `negative`, else [0, size), `size` a dim
expression over the symbolic dims) and either the plan value holding the indices (`value`, a
kernel input) or, for constant indices whose range has a symbolic size, their `extremes`
([min, max], known when compiling). Kernels clamp indices so they never read out of bounds;
these checks turn an out-of-range index into an IndexOutOfRangeError, as torch raises
IndexError, instead of a clipped row. Plans written before checks existed have none.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import IndexOutOfRangeError
from .artifact import ArtifactError
from .dims import eval_dim


@dataclass(frozen=True, slots=True)
class IndexCheck:
    """One check, its range worked out for a binding of the symbolic dims."""

    what: str  # "graph.embedding at emb, operand indices (input 'ids')"
    source: str | tuple[int, int]  # the plan value to check, or constant indices' extremes
    low: int
    size: int
    axis: int

    def verify(self, least: int, most: int) -> None:
        """Raise IndexOutOfRangeError unless least and most (of non-empty indices) lie in
        [low, size)."""
        if least < self.low or most >= self.size:
            bad = least if least < self.low else most
            raise IndexOutOfRangeError(
                f"{self.what}: index {bad} out of range [{self.low}, {self.size}) (dim "
                f"{self.axis} has size {self.size}); pass indices in that range")


def bind_checks(step: Mapping[str, Any], bindings: Mapping[str, int]) -> list[IndexCheck]:
    """The checks to run before a step, for one binding of the symbolic dims."""
    checks = []
    for entry in step.get("index_checks", ()):
        try:
            size = eval_dim(entry["size"], bindings)
            extremes = entry.get("extremes")
            value = entry.get("value")
            if (value is None) == (extremes is None) or (
                    value is not None and value not in step["inputs"]):
                raise ArtifactError(f"step {step.get('kernel')}: an index check needs one of "
                                    "a value the step reads or extremes; recompile the model")
            source = str(value) if extremes is None else (int(extremes[0]), int(extremes[1]))
            checks.append(IndexCheck(str(entry["what"]), source,
                                     -size if entry["negative"] else 0, size,
                                     int(entry["axis"])))
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise ArtifactError(f"step {step.get('kernel')}: malformed index check {entry!r} "
                                f"({exc!r}); recompile the model") from None
    return checks


def check_values(checks: Sequence[IndexCheck], views: Mapping[str, Any]) -> None:
    """Run checks on numpy arrays (`views` by plan value id)."""
    for check in checks:
        if isinstance(check.source, tuple):
            check.verify(*check.source)
            continue
        values = views[check.source]
        if values.size:
            check.verify(int(values.min()), int(values.max()))
