"""CSE and DCE: before/expected IR, cases where nothing matches, statistics, a second run."""
from __future__ import annotations

import numpy as np

from bitsmith import ir, passes
from bitsmith.passes import PassManager

from .ir_checks import check_pass, check_unchanged, func, random_inputs, text

T = "tensor<3x5x7xf32>"
SIG = f"(%x: {T}) -> ({T})"


def weight(*shape: int, seed: int = 0) -> np.ndarray:
    """A random f32 array."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- CSE ------------------------------------------------------------------------------------
def test_cse_merges_identical_ops() -> None:
    before = func(SIG, f"""
        %0 = "graph.exp"(%x) : ({T}) -> {T}
        %1 = "graph.exp"(%x) : ({T}) -> {T}
        %2 = "graph.softmax"(%0) {{axis = 2}} : ({T}) -> {T}
        %3 = "graph.softmax"(%1) {{axis = 2}} : ({T}) -> {T}
        %4 = "graph.sub"(%2, %3) : ({T}, {T}) -> {T}
        "func.return"(%4) : ({T}) -> ()
    """)
    expected = func(SIG, f"""
        %0 = "graph.exp"(%x) : ({T}) -> {T}
        %1 = "graph.softmax"(%0) {{axis = 2}} : ({T}) -> {T}
        %2 = "graph.sub"(%1, %1) : ({T}, {T}) -> {T}
        "func.return"(%2) : ({T}) -> ()
    """)
    _, record = check_pass(before, expected, "cse")
    assert record.stats == {"ops-removed": 2}  # the second softmax only matches after the exp


def test_cse_merges_constants_of_the_same_weight() -> None:
    before = func(SIG, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> tensor<7xf32>
        %1 = "graph.add"(%x, %0) : ({T}, tensor<7xf32>) -> {T}
        %2 = "graph.constant"() {{weight = "w"}} : () -> tensor<7xf32>
        %3 = "graph.mul"(%1, %2) : ({T}, tensor<7xf32>) -> {T}
        "func.return"(%3) : ({T}) -> ()
    """)
    expected = func(SIG, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> tensor<7xf32>
        %1 = "graph.add"(%x, %0) : ({T}, tensor<7xf32>) -> {T}
        %2 = "graph.mul"(%1, %0) : ({T}, tensor<7xf32>) -> {T}
        "func.return"(%2) : ({T}) -> ()
    """)
    module, _ = check_pass(before, expected, "cse", weights={"w": weight(7)})
    assert list(module.weights) == ["w"]


def test_cse_merges_every_result_of_a_multi_result_op() -> None:
    before = func(f"(%x: {T}) -> (tensor<3x2x7xf32>, tensor<3x3x7xf32>)", f"""
        %0:2 = "graph.split"(%x) {{axis = 1, sizes = [2, 3]}}
            : ({T}) -> (tensor<3x2x7xf32>, tensor<3x3x7xf32>)
        %1:2 = "graph.split"(%x) {{axis = 1, sizes = [2, 3]}}
            : ({T}) -> (tensor<3x2x7xf32>, tensor<3x3x7xf32>)
        "func.return"(%0#0, %1#1) : (tensor<3x2x7xf32>, tensor<3x3x7xf32>) -> ()
    """)
    expected = func(f"(%x: {T}) -> (tensor<3x2x7xf32>, tensor<3x3x7xf32>)", f"""
        %0:2 = "graph.split"(%x) {{axis = 1, sizes = [2, 3]}}
            : ({T}) -> (tensor<3x2x7xf32>, tensor<3x3x7xf32>)
        "func.return"(%0#0, %0#1) : (tensor<3x2x7xf32>, tensor<3x3x7xf32>) -> ()
    """)
    check_pass(before, expected, "cse")


def test_cse_keeps_ops_that_differ() -> None:
    record = check_unchanged(func(f"(%x: {T}, %y: {T}) -> ({T}, {T}, {T}, {T}, {T}, {T})", f"""
        %0 = "graph.softmax"(%x) {{axis = 1}} : ({T}) -> {T}
        %1 = "graph.softmax"(%x) {{axis = 2}} : ({T}) -> {T}
        %2 = "graph.exp"(%x) : ({T}) -> {T}
        %3 = "graph.exp"(%y) : ({T}) -> {T}
        %4 = "graph.sub"(%x, %y) : ({T}, {T}) -> {T}
        %5 = "graph.sub"(%y, %x) : ({T}, {T}) -> {T}
        %6 = "graph.constant"() {{weight = "w"}} : () -> tensor<7x7xf32>
        %7 = "graph.constant"() {{weight = "w", layout = "KN"}} : () -> tensor<7x7xf32>
        %8 = "graph.matmul"(%0, %6) : ({T}, tensor<7x7xf32>) -> {T}
        %9 = "graph.matmul"(%1, %7) : ({T}, tensor<7x7xf32>) -> {T}
        "func.return"(%8, %9, %2, %3, %4, %5) : ({T}, {T}, {T}, {T}, {T}, {T}) -> ()
    """), "cse", weights={"w": weight(7, 7)})
    assert record.stats == {"ops-removed": 0}


def test_cse_keeps_constants_that_differ_only_in_the_sign_of_zero() -> None:
    before = func(f"(%x: {T}) -> ({T}, {T})", f"""
        %0 = "graph.full"() {{value = 0.0}} : () -> {T}
        %1 = "graph.full"() {{value = -0.0}} : () -> {T}
        %2 = "graph.div"(%x, %0) : ({T}, {T}) -> {T}
        %3 = "graph.div"(%x, %1) : ({T}, {T}) -> {T}
        "func.return"(%2, %3) : ({T}, {T}) -> ()
    """)
    check_unchanged(before, "cse")
    module = ir.parse(before)
    x = random_inputs(module)[0]
    plus, minus = ir.interpret(passes.run(module, "cse"), x)
    np.testing.assert_array_equal(np.sign(plus), np.sign(x))
    np.testing.assert_array_equal(np.sign(minus), -np.sign(x))


def test_cse_then_dce_shares_one_chain() -> None:
    before = func(SIG, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> tensor<7xf32>
        %1 = "graph.constant"() {{weight = "w"}} : () -> tensor<7xf32>
        %2 = "graph.add"(%x, %0) : ({T}, tensor<7xf32>) -> {T}
        %3 = "graph.add"(%x, %1) : ({T}, tensor<7xf32>) -> {T}
        %4 = "graph.mul"(%2, %3) : ({T}, {T}) -> {T}
        "func.return"(%4) : ({T}) -> ()
    """)
    expected = func(SIG, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> tensor<7xf32>
        %1 = "graph.add"(%x, %0) : ({T}, tensor<7xf32>) -> {T}
        %2 = "graph.mul"(%1, %1) : ({T}, {T}) -> {T}
        "func.return"(%2) : ({T}) -> ()
    """)
    check_pass(before, expected, "cse,dce", weights={"w": weight(7)})


# ---- DCE ------------------------------------------------------------------------------------
def test_dce_removes_a_whole_dead_chain_in_one_run() -> None:
    before = func(SIG, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> tensor<7xf32>
        %1 = "graph.add"(%x, %0) : ({T}, tensor<7xf32>) -> {T}
        %2 = "graph.exp"(%1) : ({T}) -> {T}
        %3 = "graph.relu"(%x) : ({T}) -> {T}
        %4 = "graph.neg"(%2) : ({T}) -> {T}
        "func.return"(%3) : ({T}) -> ()
    """)
    expected = func(SIG, f"""
        %0 = "graph.relu"(%x) : ({T}) -> {T}
        "func.return"(%0) : ({T}) -> ()
    """)
    module, record = check_pass(before, expected, "dce", weights={"w": weight(7)})
    assert record.stats == {"ops-removed": 4, "weights-removed": 1}
    assert (record.ops_before, record.ops_after) == (5, 1)
    assert module.weights == {}


def test_dce_prunes_weights_no_constant_names() -> None:
    before = func(SIG, f"""
        %0 = "graph.constant"() {{weight = "used"}} : () -> tensor<7xf32>
        %1 = "graph.add"(%x, %0) : ({T}, tensor<7xf32>) -> {T}
        "func.return"(%1) : ({T}) -> ()
    """)
    module, record = check_pass(before, before, "dce",
                                weights={"used": weight(7), "stale": weight(3, seed=1)})
    assert list(module.weights) == ["used"]
    assert record.stats == {"ops-removed": 0, "weights-removed": 1}


def test_dce_keeps_ops_that_func_return_uses() -> None:
    record = check_unchanged(func(f"(%x: {T}) -> ({T}, {T}, tensor<3x2x7xf32>)", f"""
        %0 = "graph.exp"(%x) : ({T}) -> {T}
        %1:2 = "graph.split"(%0) {{axis = 1, sizes = [2, 3]}}
            : ({T}) -> (tensor<3x2x7xf32>, tensor<3x3x7xf32>)
        %2 = "graph.neg"(%0) : ({T}) -> {T}
        "func.return"(%2, %2, %1#0) : ({T}, {T}, tensor<3x2x7xf32>) -> ()
    """), "dce")
    assert record.stats == {"ops-removed": 0, "weights-removed": 0}


def test_dce_statistics_appear_in_the_report_table() -> None:
    module = ir.parse(func(SIG, f"""
        %0 = "graph.exp"(%x) : ({T}) -> {T}
        %1 = "graph.neg"(%0) : ({T}) -> {T}
        "func.return"(%x) : ({T}) -> ()
    """))
    report = PassManager("cse,dce").run(module)
    assert [r.name for r in report.records] == ["cse", "dce"]
    assert report.records[1].stats == {"ops-removed": 2, "weights-removed": 0}
    assert "ops-removed=2, weights-removed=0" in report.table()
    assert text(module) == text(ir.parse(func(SIG, f'"func.return"(%x) : ({T}) -> ()')))
