"""Canonicalize: folding, identities, shape no-ops, transposes into matmul, batch norm into conv,
the fixpoint; and the rewrite driver (non-convergence, benefit order).

Each rewrite is a before/expected pair of IR text (checked by `check_pass`: printed result,
interpreter results on random inputs, and a second run that changes nothing).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitsmith import ir, passes
from bitsmith.ir import graph
from bitsmith.passes import PassError

from .ir_checks import check_pass, check_unchanged, func, random_inputs

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


def test_shape_ops_and_casts_of_a_big_fill_become_a_fill() -> None:
    big, flat = "tensor<64x128xf32>", "tensor<128x64xi32>"
    before = func(f"(%x: {flat}) -> ({flat})", f"""
        %0 = "graph.full"() {{value = -2.5}} : () -> {big}
        %1 = "graph.permute"(%0) {{perm = [1, 0]}} : ({big}) -> tensor<128x64xf32>
        %2 = "graph.cast"(%1) {{dtype = i32}} : (tensor<128x64xf32>) -> {flat}
        %3 = "graph.add"(%x, %2) : ({flat}, {flat}) -> {flat}
        "func.return"(%3) : ({flat}) -> ()
    """)
    expected = func(f"(%x: {flat}) -> ({flat})", f"""
        %0 = "graph.full"() {{value = -2}} : () -> {flat}
        %1 = "graph.add"(%x, %0) : ({flat}, {flat}) -> {flat}
        "func.return"(%1) : ({flat}) -> ()
    """)
    _, record = check_pass(before, expected, "canonicalize")
    assert record.stats["fold_shape_op_of_full"] == 2


# ---- algebraic identities ------------------------------------------------------------------
IDENTITIES = [  # (op, constant value, constant type, x is the lhs)
    ("add", -0.0, T, True), ("add", -0.0, "tensor<5x7xf32>", False),
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


def test_float_plus_positive_zero_is_kept_but_int_plus_zero_folds() -> None:
    """-0.0 + 0.0 is +0.0, so for floats only x + (-0.0) is x (as in MLIR)."""
    check_unchanged(func("(%x: tensor<3xf32>) -> (tensor<3xf32>)", """
        %0 = "graph.full"() {value = 0.0} : () -> tensor<3xf32>
        %1 = "graph.add"(%x, %0) : (tensor<3xf32>, tensor<3xf32>) -> tensor<3xf32>
        "func.return"(%1) : (tensor<3xf32>) -> ()
    """), "canonicalize")
    i = "tensor<3xi32>"
    check_pass(func(f"(%x: {i}) -> ({i})", f"""
        %0 = "graph.full"() {{value = 0}} : () -> {i}
        %1 = "graph.add"(%0, %x) : ({i}, {i}) -> {i}
        "func.return"(%1) : ({i}) -> ()
    """), func(f"(%x: {i}) -> ({i})", f"""
        "func.return"(%x) : ({i}) -> ()
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
