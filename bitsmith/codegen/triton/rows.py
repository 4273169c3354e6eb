"""Row kernels for Triton: one program per row of the output, its lanes across the row, and
every reduction whose operand does not vary along the row (softmax's max and sum, a norm's
statistics, a reduce over the last axes) computed once per program as a `tl.sum` / `tl.max`
across lanes instead of once per output element.

This is the generic lowering with another decomposition of the output and another `reduce`:
`RowEmitter` tracks which names depend on which lane vector (the output's `cols`, or a
reduction's own lanes). A reduction first emits its body on fresh lanes; if the body also
depends on other lanes (a matmul's row by column, a cumsum's prefix), the attempt is rolled
back and the reduction becomes the generic per-lane loop, so every region stays correct and
the common ones (softmax, layer/RMS norm, mean, amax) read each row once.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from ...ir.dialects.graph.nn import AxisOp, NormOp
from ...ir.dialects.graph.reduce import ReduceOp
from ...ir.dialects.kernel import FusedOp
from ...ir.types import Dim, format_dim
from .emit import Emitter, tl_dtype, yielded
from .emit_nn import unravel

_NAME = re.compile(r"[A-Za-z_]\w*")

ROW_OPS = (AxisOp, NormOp, ReduceOp)
"""The reductions a row program computes across its lanes (softmax, norms, reduce_*)."""

MAX_NESTING = 3
LANES = [f"lr{d}" for d in range(MAX_NESTING)]
"""The lane vectors of reductions, one per nesting level (a reduction inside another's body
has lanes of its own, so a body that pairs the two is seen and falls back to the loop)."""

_LANE_COMBINE = {"sum": ("tl.sum", "0.0"), "max": ("tl.max", "-float('inf')"),
                 "min": ("tl.min", "float('inf')")}


class RowEmitter(Emitter):
    """The generic emitter with lane tracking and reductions across lanes."""

    def __init__(self, kernel: FusedOp) -> None:
        super().__init__(kernel)
        self.roots: dict[str, frozenset[str]] = {
            name: frozenset({name}) for name in ["cols", *LANES]}
        self.depth_lanes = 0  # how many lane reductions enclose the code being emitted

    def lanes_of(self, expr: str) -> frozenset[str]:
        """The lane vectors `expr` varies along."""
        out: frozenset[str] = frozenset()
        for token in _NAME.findall(expr):
            out |= self.roots.get(token, frozenset())
        return out

    def let(self, expr: str, prefix: str = "t") -> str:
        var = super().let(expr, prefix)
        lanes = self.lanes_of(expr)
        if lanes:
            self.roots[var] = lanes
        return var

    def reduce(self, combine: str, init: str, extents: Sequence[str],
               body: Callable[[list[str]], str], dtype: str = "tl.float32") -> str:
        sizes = [int(e) for e in extents if e.isdigit()]
        if (combine not in _LANE_COMBINE or len(sizes) != len(extents)
                or self.depth_lanes >= MAX_NESTING or dtype != "tl.float32"):
            return super().reduce(combine, init, extents, body, dtype)
        saved = (len(self.lines), [dict(s) for s in self.scopes], dict(self.roots))
        lane = f"lr{self.depth_lanes}"  # defined at the top of the function
        self.depth_lanes += 1
        try:
            idx = unravel(self, lane, [str(s) for s in sizes]) if len(sizes) > 1 else [lane]
            value = body(idx)
        finally:
            self.depth_lanes -= 1
        if self.lanes_of(value) - {lane}:
            lines, scopes, roots = saved
            del self.lines[lines:]
            self.scopes[:] = scopes
            self.roots = roots
            return super().reduce(combine, init, extents, body)
        key = ("reduce", combine, value, tuple(sizes))
        for scope in reversed(self.scopes):
            if key in scope:
                return scope[key]
        fn, identity = _LANE_COMBINE[combine]
        var = self.name("red")
        live = f"({lane} < {math.prod(sizes)})"
        self.emit(f"{var} = {fn}(tl.where({live}, {value}, {identity}), axis=0)")
        if combine != "sum":  # tl.max / tl.min drop NaN; torch's max and min return it
            nans = self.name("nans")
            self.emit(f"{nans} = tl.sum(tl.where({live}, tl.where({value} != {value}, 1, 0), 0), "
                      "axis=0)")
            self.emit(f"{var} = tl.where({nans} > 0, float('nan'), {var})")
        self.scopes[-1][key] = var
        return var


def row_block(kernel: FusedOp) -> int | None:
    """The lanes a row program needs (a power of two covering each output row and each
    reduced extent), or None when the region is not a row kernel."""
    ops = kernel.body_ops
    if not any(isinstance(o, ROW_OPS) for o in ops):
        return None
    extents: list[Dim | None] = []
    for value in yielded(kernel):
        if value.type.rank == 0:
            return None
        extents.append(value.type.shape[-1])
    for op in ops:
        if not op.operands:  # a source (constant, arange) reduces nothing
            continue
        x = op.operands[0]
        if isinstance(op, AxisOp):
            extents.append(x.type.shape[op.axis % x.type.rank])
        elif isinstance(op, NormOp):
            extents.append(_prod(x.type.shape[x.type.rank - op.ndim:]))
        elif isinstance(op, ReduceOp):
            rank = x.type.rank
            axes = sorted(a % rank for a in op.axes) or list(range(rank))
            extents.append(_prod([x.type.shape[a] for a in axes]))
    sizes = [e for e in extents if isinstance(e, int)]
    if len(sizes) != len(extents):
        return None
    block = 1 << max(0, (max(sizes) - 1).bit_length())
    return block if block <= 16384 else None


def _prod(dims: Sequence[Dim]) -> int | None:
    sizes = [d for d in dims if isinstance(d, int)]
    return math.prod(sizes) if len(sizes) == len(dims) else None


def generate_rows(kernel: FusedOp) -> tuple[str, list[dict]]:
    """Triton source with one `@triton.jit` function per output, one program per output row."""
    outputs = yielded(kernel)
    functions, launches = [], []
    for j, value in enumerate(outputs):
        em = RowEmitter(kernel)
        shape = em.shape(value)
        big = any(not isinstance(d, int) for d in value.type.shape) or math.prod(
            value.type.shape) >= 2**31
        em.emit("row = tl.program_id(0)" + (".to(tl.int64)" if big else ""))
        for lanes in ["cols", *LANES]:
            em.emit(f"{lanes} = tl.arange(0, BLOCK)")
        idx = [*unravel(em, "row", shape[:-1]), "cols"] if len(shape) > 1 else ["cols"]
        result = em.at(value, idx)
        last = shape[-1]
        em.emit(f"tl.store(out{j} + row * {last} + cols, tl.broadcast_to(({result}).to("
                f"{tl_dtype(value.type)}), [BLOCK]), mask=cols < {last})")
        params = [f"in{i}" for i in range(len(kernel.regions[0].block.args))] + [f"out{j}"]
        params += list(em.dim_args.values())
        functions.append("@triton.jit\n"
                         f"def out{j}({', '.join(params)}, BLOCK: tl.constexpr):\n"
                         + "\n".join(em.lines) + "\n")
        rows = [d if isinstance(d, int) else format_dim(d) for d in value.type.shape[:-1]]
        launches.append({"fn": f"out{j}", "output": j, "grid": [[[rows, None]]],
                         "dims": list(em.dim_args)})
    header = (f'"""Kernel {kernel.kernel_name}: generated by bitsmith (row kernel: one program '
              'per output row, reductions across the lanes)."""\nimport triton\n'
              'import triton.language as tl\n\n\n')
    return header + "\n\n".join(functions), launches
