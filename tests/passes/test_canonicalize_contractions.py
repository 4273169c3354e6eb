"""Canonicalize on contractions: transposes folded into matmul operands, batch norm folded into
conv2d weights (before/expected IR, interpreter results, a second run that changes nothing)."""
from __future__ import annotations

import numpy as np
import pytest

from bitsmith import ir
from bitsmith.ir.dtypes import f32 as f32_t

from .ir_checks import check_pass, check_unchanged, func

T = "tensor<3x5x7xf32>"
SIG = f"(%x: {T}) -> ({T})"


def f32(*shape: int, seed: int = 0) -> np.ndarray:
    """A random f32 array."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


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
