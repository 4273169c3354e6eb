"""Offsets in one arena for buffers with live intervals: TFLite's greedy-by-size planner.

Shared by the `plan-memory` pass (which reports on the IR) and the executor (which plans again
for each batch size it sees, since sizes depend on it). Pure Python, no dependencies.
"""
from __future__ import annotations

from collections.abc import Sequence

Interval = tuple[int, int, int]
"""(size in bytes, first op, last op): a buffer is live at ops first..last inclusive."""


def assign_offsets(buffers: Sequence[Interval]) -> list[int]:
    """Byte offsets, in the order of `buffers`: biggest first (ties: earliest start), each at
    the lowest offset that clashes with no placed buffer live at the same time.

    Sizes should be multiples of the wanted alignment: then so is every offset.
    """
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i][0], buffers[i][1], i))
    offsets = [0] * len(buffers)
    placed: list[int] = []
    for i in order:
        size, start, end = buffers[i]
        clashes = sorted((j for j in placed if buffers[j][1] <= end and start <= buffers[j][2]),
                         key=lambda j: offsets[j])
        candidate = 0
        for j in clashes:
            if offsets[j] - candidate >= size:
                break
            candidate = max(candidate, offsets[j] + buffers[j][0])
        offsets[i] = candidate
        placed.append(i)
    return offsets


def align_up(n: int, alignment: int) -> int:
    """`n` rounded up to a multiple of `alignment`."""
    return -(-n // alignment) * alignment
