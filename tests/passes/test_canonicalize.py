"""Canonicalize: folding, identities, shape no-ops, transposes into matmul, batch norm into conv,
the fixpoint; and the rewrite driver (non-convergence, benefit order).

Each rewrite is a before/expected pair of IR text (checked by `check_pass`: printed result,
interpreter results on random inputs, and a second run that changes nothing).
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from bitsmith import ir, passes
from bitsmith.ir import graph
from bitsmith.ir.dtypes import f32 as f32_t
from bitsmith.passes import PassError, apply_patterns, pattern
from bitsmith.passes.rewrite import PatternRewriter

from .ir_checks import check_pass, check_unchanged, func, random_inputs, text

T = "tensor<3x5x7xf32>"
SIG = f"(%x: {T}) -> ({T})"


def f32(*shape: int, seed: int = 0) -> np.ndarray:
    """A random f32 array."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- constant folding through the interpreter ----------------------------------------------
def test_add_of_inline_constants_folds_to_one_inline_constant() -> None:
    before = func("(%x: tensor<3xf32>) -> (tensor<3xf32>)", """
        %0 = "graph.constant"() {value = dense<tensor<3xf32> [1.0, 2.0, 3.0]>} : () -> tensor<3xf32>
        %1 = "graph.constant"() {value = dense<tensor<3xf32> [0.5, -2.0, 4.0]>}
            : () -> tensor<3xf32>
        %2 = "graph.add"(%0, %1) : (tensor<3xf32>, tensor<3xf32>) -> tensor<3xf32>
        %3 = "graph.mul"(%x, %2) : (tensor<3xf32>, tensor<3xf32>) -> tensor<3xf32>
        "func.return"(%3) : (tensor<3xf32>) -> ()
    """)
    expected = func("(%x: tensor<3xf32>) -> (tensor<3xf32>)", """
        %0 = "graph.constant"() {value = dense<tensor<3xf32> [1.5, 0.0, 7.0]>} : () -> tensor<3xf32>
        %1 = "graph.mul"(%x, %0) : (tensor<3xf32>, tensor<3xf32>) -> tensor<3xf32>
        "func.return"(%1) : (tensor<3xf32>) -> ()
    """)
    _, record = check_pass(before, expected, "canonicalize")
    assert record.stats == {"fold_constant_op": 1, "ops-removed": 2, "weights-removed": 0}


def test_permute_of_a_weight_folds_into_a_new_weight_and_the_old_one_is_pruned() -> None:
    w = f32(3, 5, 7)
    before = func("(%x: tensor<7x3x5xf32>) -> (tensor<7x3x5xf32>)", """
        %0 = "graph.constant"() {weight = "w"} : () -> tensor<3x5x7xf32>
        %1 = "graph.permute"(%0) {perm = [2, 0, 1]} : (tensor<3x5x7xf32>) -> tensor<7x3x5xf32>
        %2 = "graph.add"(%x, %1) : (tensor<7x3x5xf32>, tensor<7x3x5xf32>) -> tensor<7x3x5xf32>
        "func.return"(%2) : (tensor<7x3x5xf32>) -> ()
    """)
    expected = func("(%x: tensor<7x3x5xf32>) -> (tensor<7x3x5xf32>)", """
        %0 = "graph.constant"() {weight = "w.permute"} : () -> tensor<7x3x5xf32>
        %1 = "graph.add"(%x, %0) : (tensor<7x3x5xf32>, tensor<7x3x5xf32>) -> tensor<7x3x5xf32>
        "func.return"(%1) : (tensor<7x3x5xf32>) -> ()
    """)
    module, record = check_pass(before, expected, "canonicalize", weights={"w": w})
    assert list(module.weights) == ["w.permute"]
    np.testing.assert_array_equal(module.weights["w.permute"], np.transpose(w, (2, 0, 1)))
    assert module.weights["w.permute"].flags.c_contiguous
    assert record.stats["weights-removed"] == 1


BIG = "tensor<64x64xf32>"  # 16 KiB: more than folding may add


@pytest.mark.parametrize("body", [
    pytest.param(f"""
        %0 = "graph.constant"() {{value = dense<tensor<1xf32> [2.0]>}} : () -> tensor<1xf32>
        %1 = "graph.expand"(%0) : (tensor<1xf32>) -> {BIG}
        %2 = "graph.add"(%x, %1) : ({BIG}, {BIG}) -> {BIG}
        "func.return"(%2) : ({BIG}) -> ()
    """, id="expand-of-a-scalar"),
    pytest.param(f"""
        %0 = "graph.full"() {{value = 2.0}} : () -> {BIG}
        %1 = "graph.neg"(%0) : ({BIG}) -> {BIG}
        %2 = "graph.add"(%x, %1) : ({BIG}, {BIG}) -> {BIG}
        "func.return"(%2) : ({BIG}) -> ()
    """, id="op-of-a-full-which-stores-no-data"),
    pytest.param(f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {BIG}
        %1 = "graph.permute"(%0) {{perm = [1, 0]}} : ({BIG}) -> {BIG}
        %2 = "graph.add"(%x, %1) : ({BIG}, {BIG}) -> {BIG}
        %3 = "graph.add"(%2, %0) : ({BIG}, {BIG}) -> {BIG}
        "func.return"(%3) : ({BIG}) -> ()
    """, id="permute-of-a-weight-that-other-ops-use"),
])
def test_fold_refused_when_it_would_grow_the_constant_data(body: str) -> None:
    weights = {"w": f32(64, 64)} if '"w"' in body else {}
    check_unchanged(func(f"(%x: {BIG}) -> ({BIG})", body), "canonicalize", weights=weights)


def test_op_with_a_symbolic_result_is_not_folded() -> None:
    check_unchanged(func("(%x: tensor<Bx3xf32>) -> (tensor<Bx3xf32>)", """
        %0 = "graph.constant"() {value = dense<tensor<1x3xf32> [1.0, 2.0, 3.0]>}
            : () -> tensor<1x3xf32>
        %1 = "graph.expand"(%0) : (tensor<1x3xf32>) -> tensor<Bx3xf32>
        %2 = "graph.add"(%x, %1) : (tensor<Bx3xf32>, tensor<Bx3xf32>) -> tensor<Bx3xf32>
        "func.return"(%2) : (tensor<Bx3xf32>) -> ()
    """), "canonicalize")


def test_fold_that_would_fail_is_left_to_fail_at_run_time() -> None:
    before = func("() -> (tensor<2xi32>)", """
        %0 = "graph.constant"() {value = dense<tensor<2xi32> [1, 2]>} : () -> tensor<2xi32>
        %1 = "graph.constant"() {value = dense<tensor<2xi32> [0, 4]>} : () -> tensor<2xi32>
        %2 = "graph.div"(%0, %1) : (tensor<2xi32>, tensor<2xi32>) -> tensor<2xi32>
        "func.return"(%2) : (tensor<2xi32>) -> ()
    """)
    check_unchanged(before, "canonicalize")
    with pytest.raises(ir.InterpretError, match="integer division by zero"):
        ir.interpret(passes.run(ir.parse(before), "canonicalize"))


def test_weight_not_bound_to_the_module_is_not_folded() -> None:
    check_unchanged(func("() -> (tensor<5x3xf32>)", """
        %0 = "graph.constant"() {weight = "w"} : () -> tensor<3x5xf32>
        %1 = "graph.permute"(%0) {perm = [1, 0]} : (tensor<3x5xf32>) -> tensor<5x3xf32>
        "func.return"(%1) : (tensor<5x3xf32>) -> ()
    """), "canonicalize")


# ---- algebraic identities ------------------------------------------------------------------
IDENTITIES = [  # (op, constant value, constant type, x is the lhs)
    ("add", 0.0, T, True), ("add", 0.0, "tensor<5x7xf32>", False),
    ("mul", 1.0, "tensor<7xf32>", True), ("mul", 1.0, T, False),
    ("sub", 0.0, "tensor<1x1x1xf32>", True), ("div", 1.0, T, True), ("pow", 1.0, T, True),
]


@pytest.mark.parametrize("kind, value, ctype, x_lhs", IDENTITIES,
                         ids=[f"{k}-{'x-c' if lhs else 'c-x'}" for k, _, _, lhs in IDENTITIES])
def test_identity_operation_folds_to_its_operand(kind: str, value: float, ctype: str,
                                                 x_lhs: bool) -> None:
    operands = "%x, %0" if x_lhs else "%0, %x"
    types = f"{T}, {ctype}" if x_lhs else f"{ctype}, {T}"
    before = func(SIG, f"""
        %0 = "graph.full"() {{value = {value}}} : () -> {ctype}
        %1 = "graph.{kind}"({operands}) : ({types}) -> {T}
        %2 = "graph.relu"(%1) : ({T}) -> {T}
        "func.return"(%2) : ({T}) -> ()
    """)
    expected = func(SIG, f"""
        %0 = "graph.relu"(%x) : ({T}) -> {T}
        "func.return"(%0) : ({T}) -> ()
    """)
    check_pass(before, expected, "canonicalize")


def test_splat_inline_literal_counts_as_a_unit() -> None:
    before = func("(%x: tensor<2x3xf32>) -> (tensor<2x3xf32>)", """
        %0 = "graph.constant"() {value = dense<tensor<3xf32> [1.0, 1.0, 1.0]>} : () -> tensor<3xf32>
        %1 = "graph.mul"(%0, %x) : (tensor<3xf32>, tensor<2x3xf32>) -> tensor<2x3xf32>
        "func.return"(%1) : (tensor<2x3xf32>) -> ()
    """)
    expected = func("(%x: tensor<2x3xf32>) -> (tensor<2x3xf32>)", """
        "func.return"(%x) : (tensor<2x3xf32>) -> ()
    """)
    check_pass(before, expected, "canonicalize")


def test_double_negation_folds() -> None:
    before = func(SIG, f"""
        %0 = "graph.neg"(%x) : ({T}) -> {T}
        %1 = "graph.neg"(%0) : ({T}) -> {T}
        %2 = "graph.exp"(%1) : ({T}) -> {T}
        "func.return"(%2) : ({T}) -> ()
    """)
    expected = func(SIG, f"""
        %0 = "graph.exp"(%x) : ({T}) -> {T}
        "func.return"(%0) : ({T}) -> ()
    """)
    _, record = check_pass(before, expected, "canonicalize")
    assert record.stats["fold_double_negation"] == 1


def test_identities_that_do_not_hold_are_kept() -> None:
    check_unchanged(func("(%x: tensor<3xf32>) -> (tensor<4x3xf32>, tensor<3xf32>, "
                         "tensor<3xf32>, tensor<3xf32>)", """
        %0 = "graph.full"() {value = 0.0} : () -> tensor<4x3xf32>
        %1 = "graph.add"(%x, %0) : (tensor<3xf32>, tensor<4x3xf32>) -> tensor<4x3xf32>
        %2 = "graph.full"() {value = 0.0} : () -> tensor<3xf32>
        %3 = "graph.mul"(%x, %2) : (tensor<3xf32>, tensor<3xf32>) -> tensor<3xf32>
        %4 = "graph.sub"(%2, %x) : (tensor<3xf32>, tensor<3xf32>) -> tensor<3xf32>
        %5 = "graph.full"() {value = 2.0} : () -> tensor<3xf32>
        %6 = "graph.pow"(%x, %5) : (tensor<3xf32>, tensor<3xf32>) -> tensor<3xf32>
        "func.return"(%1, %3, %4, %6)
            : (tensor<4x3xf32>, tensor<3xf32>, tensor<3xf32>, tensor<3xf32>) -> ()
    """), "canonicalize")


# ---- no-op and consecutive shape ops -------------------------------------------------------
NOOPS = {
    "reshape": f'"graph.reshape"(%x) : ({T}) -> {T}',
    "permute": f'"graph.permute"(%x) {{perm = [0, 1, 2]}} : ({T}) -> {T}',
    "cast": f'"graph.cast"(%x) {{dtype = f32}} : ({T}) -> {T}',
    "expand": f'"graph.expand"(%x) : ({T}) -> {T}',
    "slice": f'"graph.slice"(%x) {{axis = 1, start = 0, end = 5}} : ({T}) -> {T}',
    "concat": f'"graph.concat"(%x) {{axis = 2}} : ({T}) -> {T}',
}


@pytest.mark.parametrize("op", NOOPS.values(), ids=NOOPS.keys())
def test_noop_shape_op_is_removed(op: str) -> None:
    before = func(SIG, f"""
        %0 = {op}
        %1 = "graph.relu"(%0) : ({T}) -> {T}
        "func.return"(%1) : ({T}) -> ()
    """)
    expected = func(SIG, f"""
        %0 = "graph.relu"(%x) : ({T}) -> {T}
        "func.return"(%0) : ({T}) -> ()
    """)
    check_pass(before, expected, "canonicalize")


def test_shape_ops_that_do_something_are_kept() -> None:
    outs = f"tensor<15x7xf32>, tensor<3x5x7xf16>, tensor<3x3x7xf32>, {T}, tensor<5x3x7xf32>"
    check_unchanged(func(f"(%x: {T}) -> ({outs})", f"""
        %0 = "graph.reshape"(%x) : ({T}) -> tensor<15x7xf32>
        %1 = "graph.cast"(%x) {{dtype = f16}} : ({T}) -> tensor<3x5x7xf16>
        %2 = "graph.slice"(%x) {{axis = 1, start = 0, end = 3}} : ({T}) -> tensor<3x3x7xf32>
        %3 = "graph.slice"(%x) {{axis = 1, start = 3, end = 9}} : ({T}) -> tensor<3x2x7xf32>
        %4 = "graph.concat"(%2, %3) {{axis = 1}}
            : (tensor<3x3x7xf32>, tensor<3x2x7xf32>) -> {T}
        %5 = "graph.permute"(%x) {{perm = [1, 0, 2]}} : ({T}) -> tensor<5x3x7xf32>
        "func.return"(%0, %1, %2, %4, %5) : ({outs}) -> ()
    """), "canonicalize")


def test_reshape_of_reshape_merges() -> None:
    before = func(f"(%x: {T}) -> (tensor<105xf32>)", f"""
        %0 = "graph.reshape"(%x) : ({T}) -> tensor<15x7xf32>
        %1 = "graph.reshape"(%0) : (tensor<15x7xf32>) -> tensor<105xf32>
        "func.return"(%1) : (tensor<105xf32>) -> ()
    """)
    expected = func(f"(%x: {T}) -> (tensor<105xf32>)", f"""
        %0 = "graph.reshape"(%x) : ({T}) -> tensor<105xf32>
        "func.return"(%0) : (tensor<105xf32>) -> ()
    """)
    check_pass(before, expected, "canonicalize")


def test_reshapes_back_to_the_input_shape_vanish() -> None:
    before = func(SIG, f"""
        %0 = "graph.reshape"(%x) : ({T}) -> tensor<105xf32>
        %1 = "graph.reshape"(%0) : (tensor<105xf32>) -> {T}
        "func.return"(%1) : ({T}) -> ()
    """)
    check_pass(before, func(SIG, f'"func.return"(%x) : ({T}) -> ()'), "canonicalize")


def test_permute_of_permute_merges() -> None:
    before = func(f"(%x: {T}) -> (tensor<5x3x7xf32>)", f"""
        %0 = "graph.permute"(%x) {{perm = [1, 2, 0]}} : ({T}) -> tensor<5x7x3xf32>
        %1 = "graph.permute"(%0) {{perm = [0, 2, 1]}} : (tensor<5x7x3xf32>) -> tensor<5x3x7xf32>
        "func.return"(%1) : (tensor<5x3x7xf32>) -> ()
    """)
    expected = func(f"(%x: {T}) -> (tensor<5x3x7xf32>)", f"""
        %0 = "graph.permute"(%x) {{perm = [1, 0, 2]}} : ({T}) -> tensor<5x3x7xf32>
        "func.return"(%0) : (tensor<5x3x7xf32>) -> ()
    """)
    check_pass(before, expected, "canonicalize")


def test_composed_permutation_is_right_for_every_pair() -> None:
    x = random_inputs(ir.parse(func(SIG, f'"func.return"(%x) : ({T}) -> ()')))[0]
    for p, q in itertools.product(itertools.permutations(range(3)), repeat=2):
        module = ir.Module("m", [ir.TensorType((3, 5, 7), ir.dtypes.f32)], ["x"])
        b = ir.Builder.at_end(module.body)
        out = b.value(graph.PermuteOp, b.value(graph.PermuteOp, module.inputs[0], perm=p),
                      perm=q)
        b.create(ir.OP_REGISTRY["func.return"], out)
        passes.run(module, "canonicalize")
        assert len(module.ops) == (1 if [p[i] for i in q] == [0, 1, 2] else 2), (p, q)
        (got,) = ir.interpret(module, x)
        np.testing.assert_array_equal(got, np.transpose(np.transpose(x, p), q), str((p, q)))


@pytest.mark.parametrize("shape, perm, out", [
    ("3x1x5", "[1, 0, 2]", "1x3x5"),
    ("1x5x1x7", "[2, 1, 3, 0]", "1x5x7x1"),
])
def test_permute_moving_only_unit_dims_becomes_a_reshape(shape: str, perm: str,
                                                         out: str) -> None:
    src, dst = f"tensor<{shape}xf32>", f"tensor<{out}xf32>"
    before = func(f"(%x: {src}) -> ({dst})", f"""
        %0 = "graph.permute"(%x) {{perm = {perm}}} : ({src}) -> {dst}
        "func.return"(%0) : ({dst}) -> ()
    """)
    expected = func(f"(%x: {src}) -> ({dst})", f"""
        %0 = "graph.reshape"(%x) : ({src}) -> {dst}
        "func.return"(%0) : ({dst}) -> ()
    """)
    _, record = check_pass(before, expected, "canonicalize")
    assert record.stats["permute_of_unit_dims_to_reshape"] == 1


@pytest.mark.parametrize("batch", ["2", "B"])
def test_views_that_keep_every_element_in_place_collapse_to_one_reshape(batch: str) -> None:
    """channels-last -> NCHW -> flatten HW -> tokens-major is just a reshape of NHWC."""
    nhwc, nchw = f"tensor<{batch}x3x5x4xf32>", f"tensor<{batch}x4x3x5xf32>"
    flat, tokens = f"tensor<{batch}x4x15xf32>", f"tensor<{batch}x15x4xf32>"
    before = func(f"(%x: {nhwc}) -> ({tokens})", f"""
        %0 = "graph.permute"(%x) {{perm = [0, 3, 1, 2]}} : ({nhwc}) -> {nchw}
        %1 = "graph.reshape"(%0) : ({nchw}) -> {flat}
        %2 = "graph.permute"(%1) {{perm = [0, 2, 1]}} : ({flat}) -> {tokens}
        "func.return"(%2) : ({tokens}) -> ()
    """)
    expected = func(f"(%x: {nhwc}) -> ({tokens})", f"""
        %0 = "graph.reshape"(%x) : ({nhwc}) -> {tokens}
        "func.return"(%0) : ({tokens}) -> ()
    """)
    _, record = check_pass(before, expected, "canonicalize")
    assert record.stats["collapse_views_to_reshape"] == 1


def test_views_that_move_elements_stay() -> None:
    nhwc, nchw = "tensor<2x3x5x4xf32>", "tensor<2x4x3x5xf32>"
    flat = "tensor<2x4x15xf32>"
    moving = func(f"(%x: {nhwc}) -> ({flat})", f"""
        %0 = "graph.permute"(%x) {{perm = [0, 3, 1, 2]}} : ({nhwc}) -> {nchw}
        %1 = "graph.reshape"(%0) : ({nchw}) -> {flat}
        "func.return"(%1) : ({flat}) -> ()
    """)
    check_unchanged(moving, "canonicalize")


# ---- transposes folded into matmul ---------------------------------------------------------
def test_transposed_rhs_folds_into_matmul() -> None:
    sig = "(%a: tensor<2x3x5xf32>, %b: tensor<2x7x5xf32>) -> (tensor<2x3x7xf32>)"
    before = func(sig, """
        %0 = "graph.permute"(%b) {perm = [0, 2, 1]} : (tensor<2x7x5xf32>) -> tensor<2x5x7xf32>
        %1 = "graph.matmul"(%a, %0) : (tensor<2x3x5xf32>, tensor<2x5x7xf32>) -> tensor<2x3x7xf32>
        "func.return"(%1) : (tensor<2x3x7xf32>) -> ()
    """)
    expected = func(sig, """
        %0 = "graph.matmul"(%a, %b) {transpose_rhs = true}
            : (tensor<2x3x5xf32>, tensor<2x7x5xf32>) -> tensor<2x3x7xf32>
        "func.return"(%0) : (tensor<2x3x7xf32>) -> ()
    """)
    _, record = check_pass(before, expected, "canonicalize")
    assert record.stats["fold_transpose_into_matmul"] == 1


def test_transposed_lhs_folds_into_matmul() -> None:
    sig = "(%a: tensor<5x3xf32>, %b: tensor<5x7xf32>) -> (tensor<3x7xf32>)"
    before = func(sig, """
        %0 = "graph.permute"(%a) {perm = [1, 0]} : (tensor<5x3xf32>) -> tensor<3x5xf32>
        %1 = "graph.matmul"(%0, %b) : (tensor<3x5xf32>, tensor<5x7xf32>) -> tensor<3x7xf32>
        "func.return"(%1) : (tensor<3x7xf32>) -> ()
    """)
    expected = func(sig, """
        %0 = "graph.matmul"(%a, %b) {transpose_lhs = true}
            : (tensor<5x3xf32>, tensor<5x7xf32>) -> tensor<3x7xf32>
        "func.return"(%0) : (tensor<3x7xf32>) -> ()
    """)
    check_pass(before, expected, "canonicalize")


def test_transpose_of_an_already_transposed_operand_cancels() -> None:
    sig = "(%a: tensor<3x5xf32>, %b: tensor<5x7xf32>) -> (tensor<3x7xf32>)"
    before = func(sig, """
        %0 = "graph.permute"(%b) {perm = [1, 0]} : (tensor<5x7xf32>) -> tensor<7x5xf32>
        %1 = "graph.matmul"(%a, %0) {transpose_rhs = true}
            : (tensor<3x5xf32>, tensor<7x5xf32>) -> tensor<3x7xf32>
        "func.return"(%1) : (tensor<3x7xf32>) -> ()
    """)
    expected = func(sig, """
        %0 = "graph.matmul"(%a, %b) : (tensor<3x5xf32>, tensor<5x7xf32>) -> tensor<3x7xf32>
        "func.return"(%0) : (tensor<3x7xf32>) -> ()
    """)
    check_pass(before, expected, "canonicalize")


def test_permute_moving_the_innermost_dim_leaves_a_cheaper_permute() -> None:
    sig = ("(%a: tensor<2x3x4x5xf32>, %b: tensor<2x7x3x5xf32>) -> (tensor<2x3x4x7xf32>)")
    before = func(sig, """
        %0 = "graph.permute"(%b) {perm = [0, 2, 3, 1]}
            : (tensor<2x7x3x5xf32>) -> tensor<2x3x5x7xf32>
        %1 = "graph.matmul"(%a, %0)
            : (tensor<2x3x4x5xf32>, tensor<2x3x5x7xf32>) -> tensor<2x3x4x7xf32>
        "func.return"(%1) : (tensor<2x3x4x7xf32>) -> ()
    """)
    expected = func(sig, """
        %0 = "graph.permute"(%b) {perm = [0, 2, 1, 3]}
            : (tensor<2x7x3x5xf32>) -> tensor<2x3x7x5xf32>
        %1 = "graph.matmul"(%a, %0) {transpose_rhs = true}
            : (tensor<2x3x4x5xf32>, tensor<2x3x7x5xf32>) -> tensor<2x3x4x7xf32>
        "func.return"(%1) : (tensor<2x3x4x7xf32>) -> ()
    """)
    check_pass(before, expected, "canonicalize")


def test_permute_keeping_the_innermost_dim_stays_outside_matmul() -> None:
    check_unchanged(func("(%a: tensor<2x3x4x5xf32>, %b: tensor<3x2x5x7xf32>) -> "
                         "(tensor<2x3x4x7xf32>)", """
        %0 = "graph.permute"(%b) {perm = [1, 0, 2, 3]}
            : (tensor<3x2x5x7xf32>) -> tensor<2x3x5x7xf32>
        %1 = "graph.matmul"(%a, %0)
            : (tensor<2x3x4x5xf32>, tensor<2x3x5x7xf32>) -> tensor<2x3x4x7xf32>
        "func.return"(%1) : (tensor<2x3x4x7xf32>) -> ()
    """), "canonicalize")


# ---- batch norm folded into conv2d ---------------------------------------------------------
C = 20  # output channels: more than INLINE_ELEMENTS, so the folded bias is a named weight


def conv_bn_weights(weight_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Conv weight and bias, and batch-norm statistics with a positive variance."""
    return {"conv.w": f32(*weight_shape), "conv.b": f32(C, seed=1), "bn.mean": f32(C, seed=2),
            "bn.var": np.abs(f32(C, seed=3)) + 0.5, "bn.gamma": f32(C, seed=4),
            "bn.beta": f32(C, seed=5)}


def conv_bn(x: str, w: str, y: str, conv_attrs: str, bn_attrs: str,
            extra_use: bool = False) -> str:
    """x -> conv2d(w, b) -> batch_norm, all parameters constants (C channels)."""
    c = f"tensor<{C}xf32>"
    ret = (f'"func.return"(%7, %6) : ({y}, {y}) -> ()' if extra_use
           else f'"func.return"(%7) : ({y}) -> ()')
    outs = f"{y}, {y}" if extra_use else y
    return func(f"(%x: {x}) -> ({outs})", f"""
        %0 = "graph.constant"() {{weight = "conv.w"}} : () -> {w}
        %1 = "graph.constant"() {{weight = "conv.b"}} : () -> {c}
        %2 = "graph.constant"() {{weight = "bn.mean"}} : () -> {c}
        %3 = "graph.constant"() {{weight = "bn.var"}} : () -> {c}
        %4 = "graph.constant"() {{weight = "bn.gamma"}} : () -> {c}
        %5 = "graph.constant"() {{weight = "bn.beta"}} : () -> {c}
        %6 = "graph.conv2d"(%x, %0, %1) {conv_attrs} : ({x}, {w}, {c}) -> {y}
        %7 = "graph.batch_norm"(%6, %2, %3, %4, %5) {bn_attrs} : ({y}, {c}, {c}, {c}, {c}) -> {y}
        {ret}
    """)


def folded_conv(x: str, w: str, y: str, conv_attrs: str) -> str:
    """The expected result: one conv2d with the folded weight and bias."""
    c = f"tensor<{C}xf32>"
    return func(f"(%x: {x}) -> ({y})", f"""
        %0 = "graph.constant"() {{weight = "conv.w.bn"}} : () -> {w}
        %1 = "graph.constant"() {{weight = "conv.w.bn_bias"}} : () -> {c}
        %2 = "graph.conv2d"(%x, %0, %1) {conv_attrs} : ({x}, {w}, {c}) -> {y}
        "func.return"(%2) : ({y}) -> ()
    """)


@pytest.mark.parametrize("layout, x, w, y, axis", [
    ("NCHW", "tensor<2x3x7x5xf32>", (C, 3, 3, 3), f"tensor<2x{C}x7x5xf32>", 1),
    ("NHWC", "tensor<2x7x5x3xf32>", (3, 3, 3, C), f"tensor<2x7x5x{C}xf32>", -1),
])
def test_batch_norm_folds_into_conv(layout: str, x: str, w: tuple[int, ...], y: str,
                                    axis: int) -> None:
    wt = f"tensor<{'x'.join(map(str, w))}xf32>"
    attrs = f'{{layout = "{layout}", padding = [1, 1]}}'
    before = conv_bn(x, wt, y, attrs, f"{{axis = {axis}, eps = 1.0e-3}}")
    weights = conv_bn_weights(w)
    module, record = check_pass(before, folded_conv(x, wt, y, attrs), "canonicalize",
                                weights=weights, rtol=1e-5)
    assert record.stats["fold_batch_norm_into_conv"] == 1
    assert sorted(module.weights) == ["conv.w.bn", "conv.w.bn_bias"]
    scale = weights["bn.gamma"] / np.sqrt(weights["bn.var"] + np.float32(1e-3))
    out_axis = 0 if layout == "NCHW" else 3
    want = weights["conv.w"] * np.expand_dims(scale, [a for a in range(4) if a != out_axis])
    np.testing.assert_allclose(module.weights["conv.w.bn"], want, rtol=1e-6)


def test_batch_norm_of_a_conv_with_another_user_is_not_folded() -> None:
    attrs = "{padding = [1, 1]}"
    before = conv_bn("tensor<2x3x7x5xf32>", "tensor<20x3x3x3xf32>", "tensor<2x20x7x5xf32>",
                     attrs, "{axis = 1}", extra_use=True)
    check_unchanged(before, "canonicalize", weights=conv_bn_weights((C, 3, 3, 3)))


def test_batch_norm_over_another_axis_than_the_conv_channels_is_not_folded() -> None:
    before = func("(%x: tensor<2x3x7x5xf32>) -> (tensor<2x3x7x5xf32>)", """
        %0 = "graph.constant"() {weight = "conv.w"} : () -> tensor<3x3x1x1xf32>
        %1 = "graph.conv2d"(%x, %0)
            : (tensor<2x3x7x5xf32>, tensor<3x3x1x1xf32>) -> tensor<2x3x7x5xf32>
        %2 = "graph.constant"() {weight = "bn.mean"} : () -> tensor<5xf32>
        %3 = "graph.batch_norm"(%1, %2, %2) {axis = 3}
            : (tensor<2x3x7x5xf32>, tensor<5xf32>, tensor<5xf32>) -> tensor<2x3x7x5xf32>
        "func.return"(%3) : (tensor<2x3x7x5xf32>) -> ()
    """)
    check_unchanged(before, "canonicalize",
                    weights={"conv.w": f32(3, 3, 1, 1), "bn.mean": np.abs(f32(5))})


def test_batch_norm_folds_into_a_conv_whose_weight_is_not_a_named_weight() -> None:
    sig = "(%x: tensor<1x2x5x5xf32>) -> (tensor<1x4x3x3xf32>)"
    before = func(sig, """
        %0 = "graph.full"() {value = 0.5} : () -> tensor<4x2x3x3xf32>
        %1 = "graph.conv2d"(%x, %0)
            : (tensor<1x2x5x5xf32>, tensor<4x2x3x3xf32>) -> tensor<1x4x3x3xf32>
        %2 = "graph.constant"() {value = dense<tensor<4xf32> [1.0, 2.0, 3.0, 4.0]>}
            : () -> tensor<4xf32>
        %3 = "graph.batch_norm"(%1, %2, %2) {eps = 0.0}
            : (tensor<1x4x3x3xf32>, tensor<4xf32>, tensor<4xf32>) -> tensor<1x4x3x3xf32>
        "func.return"(%3) : (tensor<1x4x3x3xf32>) -> ()
    """)
    mean = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    bias = -mean * (np.float32(1.0) / np.sqrt(mean))  # (0 - mean) * scale + 0, as folded
    expected = func(sig, f"""
        %0 = "graph.constant"() {{weight = "conv.bn"}} : () -> tensor<4x2x3x3xf32>
        %1 = "graph.constant"() {{value = {ir.DenseAttr(ir.TensorType((4,), f32_t), bias)}}}
            : () -> tensor<4xf32>
        %2 = "graph.conv2d"(%x, %0, %1)
            : (tensor<1x2x5x5xf32>, tensor<4x2x3x3xf32>, tensor<4xf32>) -> tensor<1x4x3x3xf32>
        "func.return"(%2) : (tensor<1x4x3x3xf32>) -> ()
    """)
    module, _ = check_pass(before, expected, "canonicalize", rtol=1e-5)
    np.testing.assert_allclose(module.weights["conv.bn"][:, 0, 0, 0], 0.5 / np.sqrt(mean),
                               rtol=1e-6)


# ---- the fixpoint --------------------------------------------------------------------------
CHAIN = func("(%a: tensor<3x5xf32>, %b: tensor<7x5xf32>) -> (tensor<3x7xf32>)", """
    %0 = "graph.permute"(%b) {perm = [1, 0]} : (tensor<7x5xf32>) -> tensor<5x7xf32>
    %1 = "graph.permute"(%0) {perm = [1, 0]} : (tensor<5x7xf32>) -> tensor<7x5xf32>
    %2 = "graph.permute"(%1) {perm = [1, 0]} : (tensor<7x5xf32>) -> tensor<5x7xf32>
    %3 = "graph.matmul"(%a, %2) : (tensor<3x5xf32>, tensor<5x7xf32>) -> tensor<3x7xf32>
    "func.return"(%3) : (tensor<3x7xf32>) -> ()
""")


def test_chain_needing_several_sweeps_converges() -> None:
    expected = func("(%a: tensor<3x5xf32>, %b: tensor<7x5xf32>) -> (tensor<3x7xf32>)", """
        %0 = "graph.matmul"(%a, %b) {transpose_rhs = true}
            : (tensor<3x5xf32>, tensor<7x5xf32>) -> tensor<3x7xf32>
        "func.return"(%0) : (tensor<3x7xf32>) -> ()
    """)
    _, record = check_pass(CHAIN, expected, "canonicalize")
    assert record.stats["ops-removed"] == 3
    with pytest.raises(PassError, match="did not converge in 1 sweeps"):
        passes.run(ir.parse(CHAIN), "canonicalize{max-iterations=1}")


def test_nothing_to_do_leaves_the_text_identical() -> None:
    record = check_unchanged(func(SIG, f"""
        %0 = "graph.full"() {{value = 2.0}} : () -> {T}
        %1 = "graph.add"(%x, %0) : ({T}, {T}) -> {T} loc("layer.0")
        %2 = "graph.relu"(%1) : ({T}) -> {T} loc("layer.0.act")
        "func.return"(%2) : ({T}) -> ()
    """), "canonicalize")
    assert record.stats == {"ops-removed": 0, "weights-removed": 0}


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
