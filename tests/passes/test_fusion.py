"""Fusion: which ops share a kernel, why the others do not, and that semantics are kept."""
from __future__ import annotations

import pytest

from bitsmith.passes import PipelineError
from bitsmith.passes.manager import PassManager

from .fusion_checks import (
    LINEAR_WEIGHTS,
    R,
    S,
    T,
    V,
    W,
    assert_every_refusal_has_a_reason,
    fuse,
    kernels,
    parse,
    ret,
    separate,
    weights,
)

# ---- matmul epilogues -----------------------------------------------------------------------
LINEAR_BLOCK = [
    f'%0 = "graph.constant"() {{weight = "w"}} : () -> {W}',
    f'%1 = "graph.constant"() {{weight = "b"}} : () -> {V}',
    f'%2 = "graph.linear"(%x, %0) : ({T}, {W}) -> {T}',
    f'%3 = "graph.add"(%2, %1) : ({T}, {V}) -> {T}',
    f'%4 = "graph.gelu"(%3) : ({T}) -> {T}',
    f'%5 = "graph.add"(%4, %x) : ({T}, {T}) -> {T}',
    ret("%5"),
]


def test_linear_bias_gelu_residual_is_one_matmul_kernel() -> None:
    module = parse(LINEAR_BLOCK, {"x": T}, [T], LINEAR_WEIGHTS)
    report = fuse(module)
    expected = parse([
        f'%0 = "graph.constant"() {{weight = "w"}} : () -> {W}',
        f'%1 = "graph.constant"() {{weight = "b"}} : () -> {V}',
        '%2 = "kernel.fused"(%x, %0, %1) ({',
        f"^bb0(%arg0: {T}, %arg1: {W}, %arg2: {V}):",
        f'  %3 = "graph.linear"(%arg0, %arg1) : ({T}, {W}) -> {T}',
        f'  %4 = "graph.add"(%3, %arg2) : ({T}, {V}) -> {T}',
        f'  %5 = "graph.gelu"(%4) : ({T}) -> {T}',
        f'  %6 = "graph.add"(%5, %arg0) : ({T}, {T}) -> {T}',
        f'  "kernel.yield"(%6) : ({T}) -> ()',
        f'}}) {{kind = "matmul", name = "k0_linear_add_gelu"}} : ({T}, {W}, {V}) -> {T}',
        ret("%2"),
    ], {"x": T}, [T], LINEAR_WEIGHTS)
    assert str(module) == str(expected)
    assert kernels(module) == [("matmul", ["graph.linear", "graph.add", "graph.gelu",
                                           "graph.add"])]
    assert report.records[0].stats == {"kernels-formed": 1, "kernels-matmul": 1, "ops-fused": 4}
    assert report.remarks("fuse") == ["fused    graph.linear -> graph.add",
                                      "fused    graph.add -> graph.gelu",
                                      "fused    graph.gelu -> graph.add",
                                      "kernel   k0_linear_add_gelu (matmul, 3 inputs, 1 "
                                      "outputs): linear, add, gelu, add"]


M = "tensor<3x5x5xf32>"
MATMUL_SCALE_CAST = [
    f'%0 = "graph.constant"() {{value = dense<{S} [0.125]>}} : () -> {S}',
    f'%1 = "graph.matmul"(%x, %y) {{transpose_rhs = true}} : ({T}, {T}) -> {M}',
    f'%2 = "graph.mul"(%1, %0) : ({M}, {S}) -> {M}',
    f'%3 = "graph.cast"(%2) {{dtype = f16}} : ({M}) -> tensor<3x5x5xf16>',
    ret("%3", type="tensor<3x5x5xf16>"),
]


def test_matmul_scale_cast_is_one_kernel() -> None:
    module = parse(MATMUL_SCALE_CAST, {"x": T, "y": T}, ["tensor<3x5x5xf16>"])
    fuse(module)
    assert kernels(module) == [("matmul", ["graph.matmul", "graph.constant", "graph.mul",
                                           "graph.cast"])]
    (kernel,) = module.ops[:-1]
    assert kernel.operands == tuple(module.inputs)  # the scale is copied in, not passed


MATMUL_TWO_USERS = [
    f'%0 = "graph.matmul"(%x, %y) {{transpose_rhs = true}} : ({T}, {T}) -> {M}',
    f'%1 = "graph.relu"(%0) : ({M}) -> {M}',
    f'%2 = "graph.add"(%0, %1) : ({M}, {M}) -> {M}',
    ret("%2", type=M),
]


@pytest.mark.parametrize("returned", [False, True])
def test_matmul_result_with_two_users_takes_no_epilogue(returned: bool) -> None:
    body = MATMUL_TWO_USERS[:-1] + ([ret("%2", "%0", type=M)] if returned else [ret("%2",
                                                                                    type=M)])
    module = parse(body, {"x": T, "y": T}, [M, M] if returned else [M])
    report = fuse(module)
    assert kernels(module) == [("matmul", ["graph.matmul"]),
                               ("elementwise", ["graph.relu", "graph.add"])]
    assert ("separate graph.matmul -> graph.relu: the graph.matmul result is also used "
            "elsewhere, and a matmul kernel has one output") in report.remarks("fuse")


def test_matmul_takes_no_reduction_and_does_not_absorb_producers() -> None:
    body = [f'%0 = "graph.exp"(%x) : ({T}) -> {T}',
            f'%1 = "graph.matmul"(%0, %y) {{transpose_rhs = true}} : ({T}, {T}) -> {M}',
            f'%2 = "graph.softmax"(%1) {{axis = 2}} : ({M}) -> {M}',
            ret("%2", type=M)]
    module = parse(body, {"x": T, "y": T}, [M])
    report = fuse(module)
    assert kernels(module) == [("elementwise", ["graph.exp"]), ("matmul", ["graph.matmul"]),
                               ("reduction", ["graph.softmax"])]
    assert separate(report) == [
        "separate graph.exp -> graph.matmul: graph.matmul does not absorb producers (it would "
        "recompute them per tile)",
        "separate graph.matmul -> graph.softmax: graph.softmax (reduction) does not join a "
        "matmul kernel (only elementwise epilogues and reshapes do)"]


# ---- elementwise, injective, reductions -----------------------------------------------------
CHAIN = [
    f'%0 = "graph.exp"(%x) : ({T}) -> {T}',
    f'%1 = "graph.reshape"(%0) : ({T}) -> tensor<15x7xf32>',
    '%2 = "graph.permute"(%1) {perm = [1, 0]} : (tensor<15x7xf32>) -> tensor<7x15xf32>',
    '%3 = "graph.add"(%2, %y) : (tensor<7x15xf32>, tensor<7x15xf32>) -> tensor<7x15xf32>',
    ret("%3", type="tensor<7x15xf32>"),
]


def test_elementwise_and_injective_chain_is_one_kernel() -> None:
    module = parse(CHAIN, {"x": T, "y": "tensor<7x15xf32>"}, ["tensor<7x15xf32>"])
    report = fuse(module)
    assert kernels(module) == [("injective", ["graph.exp", "graph.reshape", "graph.permute",
                                              "graph.add"])]
    assert separate(report) == []


NORM_WEIGHTS = weights(w=(7,), b=(7,))
REDUCTIONS = {
    "softmax": ([f'%0 = "graph.softmax"(%x) {{axis = -1}} : ({T}) -> {T}', ret("%0")],
                ["graph.softmax"]),
    "layer_norm": ([
        f'%0 = "graph.constant"() {{weight = "w"}} : () -> {V}',
        f'%1 = "graph.constant"() {{weight = "b"}} : () -> {V}',
        f'%2 = "graph.layer_norm"(%x, %0, %1) : ({T}, {V}, {V}) -> {T}',
        ret("%2")], ["graph.layer_norm"]),
    "rms_norm": ([
        f'%0 = "graph.constant"() {{weight = "w"}} : () -> {V}',
        f'%1 = "graph.constant"() {{value = dense<{S} [2.0]>}} : () -> {S}',
        f'%2 = "graph.constant"() {{value = dense<{S} [1.0e-06]>}} : () -> {S}',
        f'%3 = "graph.pow"(%x, %1) : ({T}, {S}) -> {T}',
        f'%4 = "graph.reduce_mean"(%3) {{axes = [-1], keepdim = true}} : ({T}) -> {R}',
        f'%5 = "graph.add"(%4, %2) : ({R}, {S}) -> {R}',
        f'%6 = "graph.rsqrt"(%5) : ({R}) -> {R}',
        f'%7 = "graph.mul"(%x, %6) : ({T}, {R}) -> {T}',
        f'%8 = "graph.mul"(%0, %7) : ({V}, {T}) -> {T}',
        ret("%8")], ["graph.constant", "graph.pow", "graph.reduce_mean", "graph.constant",
                     "graph.add", "graph.rsqrt", "graph.mul", "graph.mul"]),
    "decomposed_softmax": ([
        f'%0 = "graph.reduce_max"(%x) {{axes = [2], keepdim = true}} : ({T}) -> {R}',
        f'%1 = "graph.sub"(%x, %0) : ({T}, {R}) -> {T}',
        f'%2 = "graph.exp"(%1) : ({T}) -> {T}',
        f'%3 = "graph.reduce_sum"(%2) {{axes = [-1], keepdim = true}} : ({T}) -> {R}',
        f'%4 = "graph.div"(%2, %3) : ({T}, {R}) -> {T}',
        ret("%4")], ["graph.reduce_max", "graph.sub", "graph.exp", "graph.reduce_sum",
                     "graph.div"]),
}


@pytest.mark.parametrize("name", REDUCTIONS)
def test_norms_and_softmax_are_one_reduction_kernel(name: str) -> None:
    body, ops = REDUCTIONS[name]
    module = parse(body, {"x": T}, [T], NORM_WEIGHTS)
    report = fuse(module)
    assert kernels(module) == [("reduction", ops)]
    assert separate(report) == []


TWO_AXES = [
    f'%0 = "graph.reduce_sum"(%x) {{axes = [2], keepdim = true}} : ({T}) -> {R}',
    f'%1 = "graph.sub"(%x, %0) : ({T}, {R}) -> {T}',
    f'%2 = "graph.reduce_max"(%1) {{axes = [1], keepdim = true}} : ({T}) -> tensor<3x1x7xf32>',
    ret("%2", type="tensor<3x1x7xf32>"),
]


def test_reductions_over_different_axes_stay_apart() -> None:
    module = parse(TWO_AXES, {"x": T}, ["tensor<3x1x7xf32>"])
    report = fuse(module)
    assert kernels(module) == [("reduction", ["graph.reduce_sum", "graph.sub"]),
                               ("reduction", ["graph.reduce_max"])]
    assert separate(report) == ["separate graph.sub -> graph.reduce_max: it reduces other rows "
                                "than the reduction kernel it would join"]


def test_injective_op_after_a_reduction_starts_a_new_kernel() -> None:
    p = "tensor<3x7x5xf32>"
    body = [f'%0 = "graph.softmax"(%x) {{axis = 2}} : ({T}) -> {T}',
            f'%1 = "graph.permute"(%0) {{perm = [0, 2, 1]}} : ({T}) -> {p}',
            ret("%1", type=p)]
    module = parse(body, {"x": T}, [p])
    report = fuse(module)
    assert kernels(module) == [("reduction", ["graph.softmax"]),
                               ("injective", ["graph.permute"])]
    assert separate(report) == ["separate graph.softmax -> graph.permute: graph.permute "
                                "(injective) after a reduction starts a new kernel"]


def test_a_reshape_is_a_free_epilogue_of_reductions_and_matmuls() -> None:
    flat = "tensor<105xf32>"
    body = [f'%0 = "graph.softmax"(%x) {{axis = 2}} : ({T}) -> {T}',
            f'%1 = "graph.reshape"(%0) : ({T}) -> {flat}',
            f'%2 = "graph.matmul"(%x, %y) {{transpose_rhs = true}} : ({T}, {T}) -> {M}',
            f'%3 = "graph.reshape"(%2) : ({M}) -> tensor<75xf32>',
            '%4 = "graph.relu"(%3) : (tensor<75xf32>) -> tensor<75xf32>',
            f'"func.return"(%1, %4) : ({flat}, tensor<75xf32>) -> ()']
    module = parse(body, {"x": T, "y": T}, [flat, "tensor<75xf32>"])
    fuse(module)
    assert kernels(module) == [("reduction", ["graph.softmax", "graph.reshape"]),
                               ("matmul", ["graph.matmul", "graph.reshape", "graph.relu"])]


# ---- attention ------------------------------------------------------------------------------
X, H, Q = "tensor<3x5x6xf32>", "tensor<3x5x2x3xf32>", "tensor<3x2x5x3xf32>"
KT, SC, MASK = "tensor<3x2x3x5xf32>", "tensor<3x2x5x5xf32>", "tensor<3x1x1x5xf32>"
HEADS = {"q": X, "k": X, "v": X, "mask": MASK}


def attention_body(k_transposed_by: str) -> list[str]:
    """Multi-head attention written out; k is transposed by a permute or by the matmul."""
    by_permute = k_transposed_by == "permute"
    k_perm, k_type = ("[0, 2, 3, 1]", KT) if by_permute else ("[0, 2, 1, 3]", Q)
    qk_attrs = "" if by_permute else " {transpose_rhs = true}"
    return [
        f'%0 = "graph.constant"() {{value = dense<{S} [1.7320508]>}} : () -> {S}',
        f'%1 = "graph.reshape"(%q) : ({X}) -> {H}',
        f'%2 = "graph.permute"(%1) {{perm = [0, 2, 1, 3]}} : ({H}) -> {Q}',
        f'%3 = "graph.reshape"(%k) : ({X}) -> {H}',
        f'%4 = "graph.permute"(%3) {{perm = {k_perm}}} : ({H}) -> {k_type}',
        f'%5 = "graph.reshape"(%v) : ({X}) -> {H}',
        f'%6 = "graph.permute"(%5) {{perm = [0, 2, 1, 3]}} : ({H}) -> {Q}',
        f'%7 = "graph.matmul"(%2, %4){qk_attrs} : ({Q}, {k_type}) -> {SC}',
        f'%8 = "graph.div"(%7, %0) : ({SC}, {S}) -> {SC}',
        f'%9 = "graph.add"(%8, %mask) : ({SC}, {MASK}) -> {SC}',
        f'%10 = "graph.softmax"(%9) {{axis = -1}} : ({SC}) -> {SC}',
        f'%11 = "graph.matmul"(%10, %6) : ({SC}, {Q}) -> {Q}',
        f'%12 = "graph.permute"(%11) {{perm = [0, 2, 1, 3]}} : ({Q}) -> {H}',
        f'%13 = "graph.reshape"(%12) : ({H}) -> {X}',
        ret("%13", type=X),
    ]


ATTENTION_OPS = ["graph.reshape", "graph.permute"] * 3 + [
    "graph.matmul", "graph.constant", "graph.div", "graph.add", "graph.softmax",
    "graph.matmul", "graph.permute", "graph.reshape"]


@pytest.mark.parametrize("k_transposed_by", ["permute", "matmul"])
def test_written_out_attention_is_one_attention_kernel(k_transposed_by: str) -> None:
    module = parse(attention_body(k_transposed_by), HEADS, [X])
    report = fuse(module)
    assert kernels(module) == [("attention", ATTENTION_OPS)]
    (kernel,) = module.ops[:-1]
    assert kernel.operands == tuple(module.inputs)
    assert report.records[0].stats["kernels-attention"] == 1
    assert separate(report) == []


def test_attention_op_alone_is_an_attention_kernel() -> None:
    body = [f'%0 = "graph.attention"(%q, %k, %v) : ({Q}, {Q}, {Q}) -> {Q}', ret("%0", type=Q)]
    module = parse(body, {"q": Q, "k": Q, "v": Q}, [Q])
    fuse(module)
    assert kernels(module) == [("attention", ["graph.attention"])]


def test_attention_kernel_takes_no_epilogue() -> None:
    body = attention_body("matmul")
    body[-1:] = [f'%14 = "graph.relu"(%13) : ({X}) -> {X}', ret("%14", type=X)]
    module = parse(body, HEADS, [X])
    report = fuse(module)
    assert kernels(module) == [("attention", ATTENTION_OPS), ("elementwise", ["graph.relu"])]
    assert separate(report) == ["separate graph.reshape -> graph.relu: an attention kernel "
                                "takes no further ops"]


def test_attention_with_q_k_v_from_one_view_chain() -> None:
    """Self-similarity: the views feeding q, k and v are one chain, absorbed once."""
    body = [f'%0 = "graph.reshape"(%q) : ({X}) -> {H}',
            f'%1 = "graph.permute"(%0) {{perm = [0, 2, 1, 3]}} : ({H}) -> {Q}',
            f'%2 = "graph.matmul"(%1, %1) {{transpose_rhs = true}} : ({Q}, {Q}) -> {SC}',
            f'%3 = "graph.softmax"(%2) {{axis = 3}} : ({SC}) -> {SC}',
            f'%4 = "graph.matmul"(%3, %1) : ({SC}, {Q}) -> {Q}',
            ret("%4", type=Q)]
    module = parse(body, {"q": X}, [Q])
    fuse(module)
    assert kernels(module) == [("attention", ["graph.reshape", "graph.permute", "graph.matmul",
                                              "graph.softmax", "graph.matmul"])]


def test_attention_longer_than_the_cap_is_not_matched() -> None:
    module = parse(attention_body("permute"), HEADS, [X])
    report = fuse(module, "fuse{max-ops=3}")
    assert all(kind != "attention" and len(ops) <= 3 + ops.count("graph.constant")
               for kind, ops in kernels(module))
    assert ("separate attention at graph.matmul: its 5 ops exceed max-ops=3"
            in report.remarks("fuse"))


# ---- the cap and cycles ---------------------------------------------------------------------
LONG_CHAIN = [f'%{i} = "graph.{name}"({"%x" if i == 0 else f"%{i - 1}"}) : ({T}) -> {T}'
              for i, name in enumerate(["exp", "neg", "tanh", "abs", "sigmoid"])] + [ret("%4")]


def test_max_ops_splits_a_long_chain() -> None:
    module = parse(LONG_CHAIN, {"x": T}, [T])
    report = fuse(module, "fuse{max-ops=2}")
    assert kernels(module) == [("elementwise", ["graph.exp", "graph.neg"]),
                               ("elementwise", ["graph.tanh", "graph.abs"]),
                               ("elementwise", ["graph.sigmoid"])]
    assert separate(report) == [
        "separate graph.neg -> graph.tanh: the kernel already has max-ops=2 ops",
        "separate graph.abs -> graph.sigmoid: the kernel already has max-ops=2 ops"]


def test_max_ops_must_be_positive() -> None:
    with pytest.raises(PipelineError, match=r"pass 'fuse': max-ops must be >= 1, got 0"):
        PassManager("fuse{max-ops=0}")


CYCLE_THROUGH_LINEAR = [
    f'%0 = "graph.constant"() {{weight = "w"}} : () -> {W}',
    f'%1 = "graph.exp"(%x) : ({T}) -> {T}',
    f'%2 = "graph.linear"(%1, %0) : ({T}, {W}) -> {T}',
    f'%3 = "graph.add"(%1, %2) : ({T}, {T}) -> {T}',
    ret("%3"),
]
CYCLE_THROUGH_OPAQUE = [
    f'%0 = "graph.exp"(%x) : ({T}) -> {T}',
    f'%1 = "graph.cumsum"(%0) {{axis = 1}} : ({T}) -> {T}',
    f'%2 = "graph.add"(%0, %1) : ({T}, {T}) -> {T}',
    ret("%2"),
]


def test_add_joins_the_linear_kernel_not_the_exp_kernel_it_feeds() -> None:
    module = parse(CYCLE_THROUGH_LINEAR, {"x": T}, [T], LINEAR_WEIGHTS)
    report = fuse(module)
    assert kernels(module) == [("elementwise", ["graph.exp"]),
                               ("matmul", ["graph.linear", "graph.add"])]
    assert ("separate graph.exp -> graph.add: fusing would create a cycle through another "
            "kernel") in separate(report)


def test_op_after_an_opaque_one_does_not_join_a_kernel_that_feeds_it() -> None:
    module = parse(CYCLE_THROUGH_OPAQUE, {"x": T}, [T])
    report = fuse(module)
    assert kernels(module) == [("elementwise", ["graph.exp"]), ("opaque", ["graph.cumsum"]),
                               ("elementwise", ["graph.add"])]
    assert separate(report) == [
        "separate graph.exp -> graph.cumsum: graph.cumsum is opaque and runs as its own kernel",
        "separate graph.exp -> graph.add: fusing would create a cycle through another kernel",
        "separate graph.cumsum -> graph.add: the producer kernel is opaque and runs as its own "
        "kernel"]


CROSSED = [
    f'%0 = "graph.exp"(%x) : ({T}) -> {T}',
    f'%1 = "graph.exp"(%y) : ({T}) -> {T}',
    f'%2 = "graph.add"(%0, %1) : ({T}, {T}) -> {T}',
    f'%3 = "graph.mul"(%1, %0) : ({T}, {T}) -> {T}',
    ret("%2", "%3"),
]


def test_two_kernels_never_feed_each_other() -> None:
    """No op path leaves a kernel and comes back, yet {exp x, add} and {exp y, mul} would
    each need the other's output first."""
    module = parse(CROSSED, {"x": T, "y": T}, [T, T])
    report = fuse(module)
    assert kernels(module) == [("elementwise", ["graph.exp"]),
                               ("elementwise", ["graph.exp", "graph.add", "graph.mul"])]
    assert separate(report) == ["separate graph.exp -> graph.mul: fusing would create a cycle "
                                "through another kernel"]


# ---- constants and modules with nothing to fuse ---------------------------------------------
def test_weights_are_kernel_inputs_and_small_literals_are_copied_in() -> None:
    small = ", ".join(["0.5"] * 7)
    big = ", ".join(["0.25"] * 35)
    body = [f'%0 = "graph.constant"() {{weight = "w"}} : () -> {V}',
            f'%1 = "graph.constant"() {{value = dense<{V} [{small}]>}} : () -> {V}',
            f'%2 = "graph.constant"() {{value = dense<tensor<5x7xf32> [{big}]>}} : () -> '
            "tensor<5x7xf32>",
            f'%3 = "graph.mul"(%x, %0) : ({T}, {V}) -> {T}',
            f'%4 = "graph.add"(%3, %1) : ({T}, {V}) -> {T}',
            f'%5 = "graph.sub"(%4, %2) : ({T}, tensor<5x7xf32>) -> {T}',
            ret("%5")]
    module = parse(body, {"x": T}, [T], NORM_WEIGHTS)
    fuse(module)
    assert kernels(module) == [("elementwise", ["graph.mul", "graph.constant", "graph.add",
                                                "graph.sub"])]
    weight, literal, kernel = module.ops[:-1]
    assert weight.weight == "w" and literal.value.array.size == 35
    assert kernel.operands == (module.inputs[0], weight.result, literal.result)
    (copied,) = [op for op in kernel.body_ops if op.name == "graph.constant"]
    assert copied.value.array.tolist() == [0.5] * 7


@pytest.mark.parametrize("body, outputs", [
    ([ret("%x")], [T]),
    ([f'%0 = "graph.constant"() {{weight = "w"}} : () -> {V}',
      f'%1 = "graph.constant"() {{value = dense<{S} [1.5]>}} : () -> {S}',
      f'"func.return"(%x, %0, %1) : ({T}, {V}, {S}) -> ()'], [T, V, S]),
])
def test_nothing_to_fuse_leaves_the_module_unchanged(body: list[str], outputs: list[str]) -> None:
    module = parse(body, {"x": T}, outputs, NORM_WEIGHTS)
    text = str(module)
    report = fuse(module)
    assert str(module) == text
    assert kernels(module) == []
    assert report.remarks("fuse") == [] and report.records[0].stats == {}


def test_dead_ops_make_no_empty_kernel() -> None:
    body = [f'%0 = "graph.exp"(%x) : ({T}) -> {T}',
            f'%1 = "graph.neg"(%x) : ({T}) -> {T}',
            f'%2 = "graph.matmul"(%x, %x) {{transpose_rhs = true}} : ({T}, {T}) -> {M}',
            ret("%1")]
    module = parse(body, {"x": T}, [T])
    report = fuse(module)
    assert kernels(module) == [("elementwise", ["graph.neg"])]
    assert all(op.results for op in module.ops[:-1])
    assert report.records[0].stats["kernels-formed"] == 1


def test_a_partly_fused_module_keeps_its_kernels_and_numbers_on() -> None:
    body = ['%0 = "kernel.fused"(%x) ({',
            f"^bb0(%a: {T}):",
            f'  %1 = "graph.exp"(%a) : ({T}) -> {T}',
            f'  "kernel.yield"(%1) : ({T}) -> ()',
            f'}}) {{kind = "elementwise", name = "k0_exp"}} : ({T}) -> {T}',
            f'%2 = "graph.relu"(%0) : ({T}) -> {T}',
            ret("%2")]
    module = parse(body, {"x": T}, [T])
    old_kernel = module.ops[0]
    fuse(module)
    assert kernels(module) == [("elementwise", ["graph.exp"]), ("elementwise", ["graph.relu"])]
    assert module.ops[0] is old_kernel
    assert [op.kernel_name for op in module.ops[:-1]] == ["k0_exp", "k1_relu"]


# ---- explanations ---------------------------------------------------------------------------
EXPLAINED = {
    "two_users": (MATMUL_TWO_USERS, {"x": T, "y": T}, [M], "fuse"),
    "two_axes": (TWO_AXES, {"x": T}, ["tensor<3x1x7xf32>"], "fuse"),
    "cap": (LONG_CHAIN, {"x": T}, [T], "fuse{max-ops=2}"),
    "cycle_linear": (CYCLE_THROUGH_LINEAR, {"x": T}, [T], "fuse"),
    "cycle_opaque": (CYCLE_THROUGH_OPAQUE, {"x": T}, [T], "fuse"),
    "crossed": (CROSSED, {"x": T, "y": T}, [T, T], "fuse"),
    "attention_capped": (attention_body("permute"), HEADS, [X], "fuse{max-ops=3}"),
}


@pytest.mark.parametrize("name", EXPLAINED)
def test_every_refusal_explains_why(name: str) -> None:
    body, inputs, outputs, pipeline = EXPLAINED[name]
    module = parse(body, inputs, outputs, LINEAR_WEIGHTS)
    report = fuse(module, pipeline)
    assert separate(report), "each case refuses at least one fusion"
    assert_every_refusal_has_a_reason(report)
