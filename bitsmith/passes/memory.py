"""Memory planning: give every intermediate tensor an offset in one arena, reusing dead memory.

An analysis, not a rewrite: it reads the top-level ops of `module.body` (graph ops before
fusion, `kernel.fused` ops after) without looking at what they compute. Each result of a
top-level op other than a weight constant is a buffer, live from its defining op to its last
top-level user (a value used inside a nested region counts as used by the enclosing top-level
op; a returned value is used by `func.return`, so it lives to the end). Offsets come from the
greedy-by-size scheme of TFLite's arena planner: largest buffers first, each at the lowest
aligned offset that clashes with no placed buffer whose lifetime overlaps its own.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import PassError, PipelineError
from ..ir import Module, Operation, OpResult, Value
from ..ir.dialects.graph import ConstantOp  # weights and literals: never in the arena
from ..ir.dtypes import BoolType
from ..ir.types import TensorType, evaluate_dim
from ..runtime import arena
from ..runtime.arena import align_up
from .manager import ModulePass, PassContext, register_pass


class MemoryPlanError(PassError):
    """A module cannot be planned: an unbound symbolic dim, a bad alignment, an unknown value."""


@dataclass(frozen=True, slots=True)
class Buffer:
    """One planned intermediate: its value, aligned size, live interval [start, end], offset."""

    value: Value
    size: int  # bytes, rounded up to the plan's alignment
    start: int  # index in module.body.ops of the defining op
    end: int  # index of the last top-level op using it (start when unused)
    offset: int  # byte offset in the arena

    def overlaps_in_time(self, other: Buffer) -> bool:
        """True when both are live at some op (an op's inputs and outputs never alias)."""
        return self.start <= other.end and other.start <= self.end

    def overlaps_in_space(self, other: Buffer) -> bool:
        """True when the byte ranges [offset, offset + size) intersect."""
        return self.offset < other.offset + other.size and other.offset < self.offset + self.size


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Where each intermediate lives in the arena, and what the plan saves."""

    buffers: tuple[Buffer, ...]
    naive_bytes: int  # every intermediate its own allocation
    peak_live_bytes: int  # most bytes live at one op: no plan can do better
    arena_bytes: int  # max offset + size over the buffers
    _by_value: dict[Value, Buffer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_value", {b.value: b for b in self.buffers})

    def buffer_of(self, value: Value) -> Buffer:
        """The buffer planned for `value`."""
        buffer = self._by_value.get(value)
        if buffer is None:
            raise MemoryPlanError(f"value of type {value.type} has no buffer in this plan: "
                                  "expected a result of a top-level non-constant op, got a "
                                  f"{_describe_value(value)}")
        return buffer

    def offset_of(self, value: Value) -> int:
        """Byte offset of `value` in the arena."""
        return self.buffer_of(value).offset

    def summary(self) -> str:
        """One line: unplanned vs planned bytes, the lower bound, the buffer count."""
        return (f"intermediates {format_bytes(self.naive_bytes)} unplanned -> "
                f"{format_bytes(self.arena_bytes)} planned arena (peak live "
                f"{format_bytes(self.peak_live_bytes)}, {len(self.buffers)} buffers)")


def plan_memory(module: Module, bindings: Mapping[str, int] | None = None, *,
                alignment: int = 64) -> MemoryPlan:
    """Plan an arena for the intermediates of `module`'s top-level ops."""
    _check_alignment(alignment)
    bindings = _checked_bindings(bindings or {})
    ops = list(module.body.ops)
    index = {op: i for i, op in enumerate(ops)}
    unplaced = [Buffer(value, align_up(tensor_bytes(value.type, bindings, value), alignment),
                       start, _last_use(value, start, index, module), 0)
                for start, op in enumerate(ops) if not isinstance(op, ConstantOp)
                for value in op.results]
    placed = assign_offsets(unplaced)
    return MemoryPlan(buffers=tuple(placed), naive_bytes=sum(b.size for b in placed),
                      peak_live_bytes=peak_live_bytes(placed),
                      arena_bytes=max((b.offset + b.size for b in placed), default=0))


@register_pass("plan-memory")
@dataclass(frozen=True)
class PlanMemory(ModulePass):
    """Analysis: report the arena the intermediates need; the IR is left unchanged.

    Symbolic dims are taken as `batch` for the report; the runtime plans again with the real
    bindings through `plan_memory(module, bindings=...)`.
    """

    alignment: int = 64
    batch: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.alignment, bool) or self.alignment < 1:
            raise PipelineError(f"alignment must be >= 1, got {self.alignment}")
        if self.batch < 1:
            raise PipelineError(f"batch must be >= 1, got {self.batch}")

    def run(self, module: Module, ctx: PassContext) -> None:
        symbols = sorted({s.name for op in module.ops for r in op.results for s in r.type.symbols})
        plan = plan_memory(module, {s: self.batch for s in symbols}, alignment=self.alignment)
        if symbols:
            ctx.remark(f"planned with {', '.join(f'{s}={self.batch}' for s in symbols)}")
        ctx.count("buffers", len(plan.buffers))
        ctx.count("naive-bytes", plan.naive_bytes)
        ctx.count("arena-bytes", plan.arena_bytes)
        ctx.count("peak-live-bytes", plan.peak_live_bytes)
        ctx.remark(plan.summary())


def tensor_bytes(type: TensorType, bindings: Mapping[str, int] | None = None,
                 value: Value | None = None) -> int:
    """Bytes of a dense tensor of `type`, sub-byte elements packed (ceil(n * bits / 8))."""
    bindings = bindings or {}
    missing = sorted({s.name for s in type.symbols} - set(bindings))
    if missing:
        where = f"{_describe_value(value)} of type {type}" if value is not None else f"{type}"
        example = ", ".join(f'"{name}": ...' for name in missing)
        raise MemoryPlanError(f"{where} has unbound symbolic dim(s) {', '.join(missing)}; "
                              f"pass plan_memory(module, bindings={{{example}}})")
    subs = {s: bindings[s.name] for s in type.symbols}
    numel = math.prod(evaluate_dim(d, subs) for d in type.shape)
    return -(-numel * element_bits(type) // 8)


def element_bits(type: TensorType) -> int:
    """Bits one element occupies in memory."""
    if isinstance(type.dtype, BoolType):
        return 8  # one bit in the IR, but every runtime holds bools as bytes (numpy bool_)
    return type.dtype.bits  # a QuantType counts its storage bits; scales are separate values


def assign_offsets(buffers: Iterable[Buffer]) -> list[Buffer]:
    """Greedy by size: biggest first (ties: earliest start), each at the lowest fitting offset
    (the runtime's own planner, so that what is reported is what runs).

    Returns the buffers with offsets, in definition order.
    """
    buffers = list(buffers)
    offsets = arena.assign_offsets([(b.size, b.start, b.end) for b in buffers])
    return [_with_offset(b, offset) for b, offset in zip(buffers, offsets, strict=True)]


def peak_live_bytes(buffers: Iterable[Buffer]) -> int:
    """Most bytes live at any one op."""
    delta: dict[int, int] = {}
    for b in buffers:
        delta[b.start] = delta.get(b.start, 0) + b.size
        delta[b.end + 1] = delta.get(b.end + 1, 0) - b.size
    live = peak = 0
    for t in sorted(delta):
        live += delta[t]
        peak = max(peak, live)
    return peak


def format_bytes(n: int) -> str:
    """Human size: `512 B`, `3.1 KiB`, `12.3 MiB`, `1.0 GiB`."""
    if n < 1024:
        return f"{n} B"
    size, unit = float(n), "B"
    for next_unit in ("KiB", "MiB", "GiB"):
        size, unit = size / 1024, next_unit
        if size < 1024:
            break
    return f"{size:.1f} {unit}"


def _with_offset(buffer: Buffer, offset: int) -> Buffer:
    return Buffer(buffer.value, buffer.size, buffer.start, buffer.end, offset)


def _last_use(value: Value, start: int, index: dict[Operation, int], module: Module) -> int:
    tops = (_top_level(user, module) for user, _ in value.uses)
    return max((index[top] for top in tops if top is not None and top in index), default=start)


def _top_level(op: Operation, module: Module) -> Operation | None:
    """The op of `module.body` that is `op` or encloses it (None for a detached op)."""
    while op.parent is not None and op.parent is not module.body:
        region = op.parent.parent
        if region is None or region.parent is None:
            return None
        op = region.parent
    return op if op.parent is module.body else None


def _check_alignment(alignment: int) -> None:
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
        raise MemoryPlanError(f"alignment must be a positive int of bytes, got {alignment!r}")


def _checked_bindings(bindings: Mapping[str, int]) -> dict[str, int]:
    for name, value in bindings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MemoryPlanError(f"binding {name!r} must be a non-negative int, got {value!r}")
    return dict(bindings)


def _describe_value(value: Value) -> str:
    if not isinstance(value, OpResult):
        return f"block argument '{value.name_hint or '?'}'"
    op = value.op
    where = f" at {op.loc}" if op.loc else ""
    return f"result #{value.index} of '{op.name}'{where}"
