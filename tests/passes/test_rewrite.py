"""The greedy rewrite driver: non-convergence names the patterns, higher benefit goes first."""
from __future__ import annotations

import re

import numpy as np
import pytest

from bitsmith import ir
from bitsmith.ir import graph
from bitsmith.passes import PassError, apply_patterns, pattern
from bitsmith.passes.rewrite import PatternRewriter

from .ir_checks import func, text

T = "tensor<3x5x7xf32>"
SIG = f"(%x: {T}) -> ({T})"


def f32(*shape: int, seed: int = 0) -> np.ndarray:
    """A random f32 array."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- the rewrite driver --------------------------------------------------------------------
RELU = func(SIG, f"""
    %0 = "graph.relu"(%x) : ({T}) -> {T}
    "func.return"(%0) : ({T}) -> ()
""")


@pattern("graph.relu")
def relu_to_clamp(op: ir.Operation, rw: PatternRewriter) -> bool:
    """relu(x) -> clamp(x, 0)"""
    rw.replace_op(op, rw.value(graph.ClampOp, op.x, min=0.0))
    return True


@pattern("graph.clamp")
def clamp_to_relu(op: ir.Operation, rw: PatternRewriter) -> bool:
    """clamp(x, 0) -> relu(x)"""
    if op.min != 0.0 or op.max is not None:
        return False
    rw.replace_op(op, rw.value(graph.UNARY_OPS["relu"], op.x))
    return True


@pattern("graph.relu", benefit=2)
def relu_to_clamp_preferred(op: ir.Operation, rw: PatternRewriter) -> bool:
    """relu(x) -> clamp(x, 0, inf), tried before relu_to_clamp"""
    rw.replace_op(op, rw.value(graph.ClampOp, op.x, min=0.0, max=float("inf")))
    return True


def test_patterns_that_undo_each_other_raise_naming_both() -> None:
    module = ir.parse(func(f"(%x: {T}, %y: {T}) -> ({T}, {T})", f"""
        %0 = "graph.relu"(%x) : ({T}) -> {T}
        %1 = "graph.clamp"(%y) {{min = 0.0}} : ({T}) -> {T}
        "func.return"(%0, %1) : ({T}, {T}) -> ()
    """))
    with pytest.raises(PassError, match="did not converge in 4 sweeps") as info:
        apply_patterns(module, [relu_to_clamp, clamp_to_relu], max_iterations=4)
    message = str(info.value)
    assert re.search(r"relu_to_clamp \(\dx\)", message)
    assert re.search(r"clamp_to_relu \(\dx\)", message)
    assert "undo each other" in message


def test_one_op_cycling_between_two_patterns_names_both() -> None:
    with pytest.raises(PassError) as info:
        apply_patterns(ir.parse(RELU), [relu_to_clamp, clamp_to_relu], max_iterations=4)
    assert "relu_to_clamp" in str(info.value) and "clamp_to_relu" in str(info.value)


def test_higher_benefit_pattern_is_tried_first() -> None:
    module = ir.parse(RELU)
    fired = apply_patterns(module, [relu_to_clamp, relu_to_clamp_preferred, clamp_to_relu])
    assert fired == {"relu_to_clamp_preferred": 1}
    expected = func(SIG, f"""
        %0 = "graph.clamp"(%x) {{min = 0.0, max = inf}} : ({T}) -> {T}
        "func.return"(%0) : ({T}) -> ()
    """)
    assert text(module) == text(ir.parse(expected))
