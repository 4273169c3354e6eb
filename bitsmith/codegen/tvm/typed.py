"""Typed entry points to the TVM calls whose Python annotations are missing or wrong.

`te.compute` is unannotated (and returns a tuple for a multi-output body); `te.Tensor` reflects
its `shape` from C++ without declaring it; `Schedule.fuse` and `Schedule.reorder` annotate each
of their loop varargs as a list of loops; `Schedule.get` returns everything a random variable
can stand for. The lowering and the schedules call these instead, so that what they hold is typed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tvm.s_tir as s_tir
from tvm import te, topi
from tvm.s_tir import SBlock
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.tirx import For

from ..template import CodegenError


def compute(shape: Sequence[Any], fcompute: Callable[..., Any],
            name: str = "compute") -> te.Tensor:
    """`te.compute` of a body with one output: that output's tensor."""
    out = te.compute(shape, fcompute, name=name)
    if not isinstance(out, te.Tensor):
        raise CodegenError(f"te.compute '{name}': expected one output tensor, got {len(out)}")
    return out


def cast_tensor(tensor: te.Tensor, dtype: str) -> te.Tensor:
    """`topi.cast` of a tensor: one te.compute (its inferred type allows a tuple of them)."""
    out = topi.cast(tensor, dtype)
    if not isinstance(out, te.Tensor):
        raise CodegenError(f"topi.cast to {dtype}: expected one tensor, got {type(out).__name__}")
    return out


def shape_of(tensor: te.Tensor) -> Sequence[Any]:
    """A TE tensor's shape."""
    return tensor.shape  # pyright: ignore[reportAttributeAccessIssue] - a reflected FFI field


def fuse(sch: s_tir.Schedule, *loops: LoopRV) -> LoopRV:
    """`sch.fuse(*loops)`: one loop for the nest `loops`."""
    return sch.fuse(*loops)  # pyright: ignore[reportArgumentType] - tvm: each vararg a list


def reorder(sch: s_tir.Schedule, *loops: LoopRV) -> None:
    """`sch.reorder(*loops)`: the loops nested in this order."""
    sch.reorder(*loops)  # pyright: ignore[reportArgumentType] - tvm: each vararg a list


def block_of(sch: s_tir.Schedule, block: SBlockRV) -> SBlock:
    """The block statement a block random variable stands for."""
    stmt = sch.get(block)
    if not isinstance(stmt, SBlock):
        raise CodegenError(f"schedule: expected a block, got {type(stmt).__name__}")
    return stmt


def loop_of(sch: s_tir.Schedule, loop: LoopRV) -> For:
    """The loop statement a loop random variable stands for."""
    stmt = sch.get(loop)
    if not isinstance(stmt, For):
        raise CodegenError(f"schedule: expected a loop, got {type(stmt).__name__}")
    return stmt
