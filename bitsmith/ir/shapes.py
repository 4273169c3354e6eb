"""Shape arithmetic shared by op type inference: broadcasting, axes, element counts."""
from __future__ import annotations

from collections.abc import Sequence

import sympy

from ..errors import ShapeError
from .types import Dim, dims_equal, format_dim, make_dim


def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    """Numpy/torch broadcasting of static or symbolic shapes."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for axis in range(rank):
        dim: Dim = 1
        for shape in shapes:
            offset = axis - (rank - len(shape))
            if offset < 0:
                continue
            d = shape[offset]
            if d == 1:
                continue
            if dim == 1 or dims_equal(dim, d):
                dim = d
            else:
                shown = [tuple(format_dim(x) for x in s) for s in shapes]
                raise ShapeError(f"shapes {shown} do not broadcast (axis {axis}: "
                                 f"{format_dim(dim)} vs {format_dim(d)})")
        out.append(dim)
    return tuple(out)


def normalize_axis(axis: int, rank: int) -> int:
    """Map a possibly negative axis into 0..rank-1."""
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise ShapeError(f"axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def product(dims: Sequence[Dim]) -> Dim:
    """The product of dims (symbolic when any is)."""
    return make_dim(sympy.Mul(*[sympy.sympify(d) for d in dims])) if dims else 1
