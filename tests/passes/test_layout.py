"""The layout pass: convs, pools and batch norms channels-last, transposes cancelled, conv
weights pre-packed to HWIO at compile time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitsmith import ir, models, passes
from bitsmith.frontend import from_torch

X = "tensor<2x3x9x7xf32>"
W1, W2 = "tensor<4x3x3x3xf32>", "tensor<4x4x1x1xf32>"
Y = "tensor<2x4x9x7xf32>"
CONV = '{dilation = [1, 1], groups = 1, layout = "%s", padding = [1, 1], stride = [1, 1]}'
CONV1 = '{dilation = [1, 1], groups = 1, layout = "%s", padding = [0, 0], stride = [1, 1]}'

BEFORE = f"""module @m {{
  func.func @main(%x: {X}) -> ({Y}) {{
    %0 = "graph.constant"() {{weight = "w1"}} : () -> {W1}
    %1 = "graph.constant"() {{weight = "w2"}} : () -> {W2}
    %2 = "graph.conv2d"(%x, %0) {CONV % "NCHW"} : ({X}, {W1}) -> {Y}
    %3 = "graph.relu"(%2) : ({Y}) -> {Y}
    %4 = "graph.conv2d"(%3, %1) {CONV1 % "NCHW"} : ({Y}, {W2}) -> {Y}
    %5 = "graph.add"(%4, %3) : ({Y}, {Y}) -> {Y}
    "func.return"(%5) : ({Y}) -> ()
  }}
}}
"""
XN, YN = "tensor<2x9x7x3xf32>", "tensor<2x9x7x4xf32>"
H1, H2 = "tensor<3x3x3x4xf32>", "tensor<1x1x4x4xf32>"
EXPECTED = f"""module @m {{
  func.func @main(%x: {X}) -> ({Y}) {{
    %0 = "graph.permute"(%x) {{perm = [0, 2, 3, 1]}} : ({X}) -> {XN}
    %1 = "graph.constant"() {{layout = "HWIO", weight = "w1:HWIO"}} : () -> {H1}
    %2 = "graph.conv2d"(%0, %1) {CONV % "NHWC"} : ({XN}, {H1}) -> {YN}
    %3 = "graph.relu"(%2) : ({YN}) -> {YN}
    %4 = "graph.constant"() {{layout = "HWIO", weight = "w2:HWIO"}} : () -> {H2}
    %5 = "graph.conv2d"(%3, %4) {CONV1 % "NHWC"} : ({YN}, {H2}) -> {YN}
    %6 = "graph.add"(%5, %3) : ({YN}, {YN}) -> {YN}
    %7 = "graph.permute"(%6) {{perm = [0, 3, 1, 2]}} : ({YN}) -> {Y}
    "func.return"(%7) : ({Y}) -> ()
  }}
}}
"""


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w1": rng.standard_normal((4, 3, 3, 3), dtype=np.float32),
            "w2": rng.standard_normal((4, 4, 1, 1), dtype=np.float32)}


def test_convs_go_channels_last_with_one_permute_at_each_end() -> None:
    w = weights()
    module = ir.parse(BEFORE, weights=w)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 7), dtype=np.float32)
    want = ir.interpret(module, x)
    passes.run(module, "layout")
    assert ir.print_module(module, locations=False) == EXPECTED
    assert sorted(module.weights) == ["w1:HWIO", "w2:HWIO"]  # the OIHW originals are gone
    np.testing.assert_array_equal(module.weights["w1:HWIO"], w["w1"].transpose(2, 3, 1, 0))
    assert module.weights["w1:HWIO"].flags.c_contiguous
    np.testing.assert_allclose(ir.interpret(module, x)[0], want[0], rtol=1e-5, atol=1e-5)
    passes.run(module, "layout")  # a second run changes nothing
    assert ir.print_module(module, locations=False) == EXPECTED


def test_nchw_option_and_a_module_without_convs_are_left_alone() -> None:
    module = ir.parse(BEFORE, weights=weights())
    passes.run(module, "layout{conv=nchw}")
    assert str(module) == str(ir.parse(BEFORE, weights=weights()))
    t = "tensor<3x5xf32>"
    text = (f'module @m {{\n  func.func @main(%x: {t}) -> ({t}) {{\n'
            f'    %0 = "graph.relu"(%x) : ({t}) -> {t}\n'
            f'    "func.return"(%0) : ({t}) -> ()\n  }}\n}}\n')
    plain = ir.parse(text)
    passes.run(plain, "layout")
    assert str(plain) == text


def test_computed_conv_weight_gets_a_permute_not_a_packed_weight() -> None:
    text = f"""module @m {{
  func.func @main(%x: {X}, %w: {W1}) -> ({Y}) {{
    %0 = "graph.conv2d"(%x, %w) {CONV % "NCHW"} : ({X}, {W1}) -> {Y}
    "func.return"(%0) : ({Y}) -> ()
  }}
}}
"""
    module = ir.parse(text)
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 9, 7), dtype=np.float32), weights()["w1"]
    want = ir.interpret(module, x, w)[0]
    passes.run(module, "layout")
    perms = [tuple(op.perm) for op in module.ops if op.name == "graph.permute"]
    assert sorted(perms) == [(0, 2, 3, 1), (0, 3, 1, 2), (2, 3, 1, 0)]
    np.testing.assert_allclose(ir.interpret(module, x, w)[0], want, rtol=1e-5, atol=1e-5)


def test_pool_and_batch_norm_and_broadcast_constants_follow_the_layout() -> None:
    c = "tensor<3xf32>"
    p = "tensor<2x3x4x3xf32>"
    text = f"""module @m {{
  func.func @main(%x: {X}) -> ({p}) {{
    %0 = "graph.constant"() {{weight = "m"}} : () -> {c}
    %1 = "graph.constant"() {{weight = "v"}} : () -> {c}
    %2 = "graph.batch_norm"(%x, %0, %1) {{axis = 1, eps = 1e-05}} : ({X}, {c}, {c}) -> {X}
    %3 = "graph.constant"() {{weight = "s"}} : () -> tensor<3x1x1xf32>
    %4 = "graph.mul"(%2, %3) : ({X}, tensor<3x1x1xf32>) -> {X}
    %5 = "graph.max_pool2d"(%4) {{kernel = [2, 2], layout = "NCHW", stride = [2, 2]}} : ({X}) -> {p}
    "func.return"(%5) : ({p}) -> ()
  }}
}}
"""
    rng = np.random.default_rng(3)
    w = {"m": rng.standard_normal(3, dtype=np.float32),
         "v": rng.random(3, dtype=np.float32) + 0.5,
         "s": rng.standard_normal((3, 1, 1), dtype=np.float32)}
    module = ir.parse(text, weights=w)
    x = rng.standard_normal((2, 3, 9, 7), dtype=np.float32)
    want = ir.interpret(module, x)[0]
    passes.run(module, "layout,canonicalize")
    names = [op.name for op in module.ops if op.name != "graph.constant"]
    assert names == ["graph.permute", "graph.batch_norm", "graph.mul", "graph.max_pool2d",
                     "graph.permute", "func.return"]
    bn = next(op for op in module.ops if op.name == "graph.batch_norm")
    pool = next(op for op in module.ops if op.name == "graph.max_pool2d")
    assert bn.axis == 3 and pool.layout == "NHWC"
    np.testing.assert_allclose(ir.interpret(module, x)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet"])
def test_zoo_cnn_has_no_shuffles_between_convs(name: str) -> None:
    spec = models.get(name)
    torch.manual_seed(0)
    module = from_torch(spec.build().eval(), spec.example_inputs(2), name=name,
                        dynamic_batch=True)
    x = [t.numpy() for t in spec.example_inputs(3)]
    want = ir.interpret(module, *x)[0]
    passes.run(module, "canonicalize,layout,canonicalize")
    permutes = [op for op in module.ops if op.name == "graph.permute"]
    assert len(permutes) == 1 and permutes[0].x is module.inputs[0]  # only at the input
    convs = [op for op in module.ops if op.name == "graph.conv2d"]
    assert convs and all(op.layout == "NHWC" and op.weight.op.layout == "HWIO" for op in convs)
    got = ir.interpret(module, *x)[0]
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())


def test_permuted_constants_alone_are_left_to_folding_not_sunk_forever() -> None:
    a, b = "tensor<1x3x40x40xf32>", "tensor<1x40x40x3xf32>"
    text = f"""module @m {{
  func.func @main(%x: {a}) -> ({a}) {{
    %0 = "graph.full"() {{value = 1.0}} : () -> {b}
    %1 = "graph.full"() {{value = 2.0}} : () -> {a}
    %2 = "graph.permute"(%0) {{perm = [0, 3, 1, 2]}} : ({b}) -> {a}
    %3 = "graph.add"(%2, %1) : ({a}, {a}) -> {a}
    %4 = "graph.mul"(%3, %x) : ({a}, {a}) -> {a}
    "func.return"(%4) : ({a}) -> ()
  }}
}}
"""
    module = ir.parse(text)
    x = np.random.default_rng(4).standard_normal((1, 3, 40, 40), dtype=np.float32)
    want = ir.interpret(module, x)[0]
    passes.run(module, passes.default_pipeline("cpu"))  # used to loop until the cap
    np.testing.assert_array_equal(ir.interpret(module, x)[0], want)


def test_shared_conv_weight_is_packed_once_and_unbound_weights_get_a_permute() -> None:
    text = f"""module @m {{
  func.func @main(%x: {X}, %z: {X}) -> ({Y}) {{
    %0 = "graph.constant"() {{weight = "w1"}} : () -> {W1}
    %1 = "graph.conv2d"(%x, %0) {CONV % "NCHW"} : ({X}, {W1}) -> {Y}
    %2 = "graph.constant"() {{weight = "w1"}} : () -> {W1}
    %3 = "graph.conv2d"(%z, %2) {CONV % "NCHW"} : ({X}, {W1}) -> {Y}
    %4 = "graph.add"(%1, %3) : ({Y}, {Y}) -> {Y}
    "func.return"(%4) : ({Y}) -> ()
  }}
}}
"""
    module = ir.parse(text, weights={"w1": weights()["w1"]})
    passes.run(module, "layout,cse")
    assert sorted(module.weights) == ["w1:HWIO"]
    unbound = ir.parse(BEFORE)  # no weights given: the pass cannot pack them
    passes.run(unbound, "layout")
    perms = sorted(tuple(op.perm) for op in unbound.ops if op.name == "graph.permute")
    assert perms == [(0, 2, 3, 1), (0, 3, 1, 2), (2, 3, 1, 0), (2, 3, 1, 0)]


def test_layout_after_fuse_is_an_error_that_says_the_order() -> None:
    module = ir.parse(BEFORE, weights=weights())
    with pytest.raises(passes.PassError, match=r"layout must run before fuse: kernel 'k0_conv2d"
                                               r".*put layout\{conv=nhwc\} before fuse"):
        passes.run(module, "fuse,layout")
    t = "tensor<3x5xf32>"
    plain = ir.parse(f'module @m {{\n  func.func @main(%x: {t}) -> ({t}) {{\n'
                     f'    %0 = "graph.relu"(%x) : ({t}) -> {t}\n'
                     f'    "func.return"(%0) : ({t}) -> ()\n  }}\n}}\n')
    report = passes.PassManager("fuse,layout").run(plain)  # no convs: nothing to lay out
    assert "nothing to lay out" in report.records[1].remarks[0]


def test_permutes_the_pass_did_not_make_are_left_where_they_are() -> None:
    """Head-splitting permutes in a transformer feed several ops; sinking would multiply them."""
    h, t = "tensor<2x5x3x4xf32>", "tensor<2x3x5x4xf32>"
    text = f"""module @m {{
  func.func @main(%x: {h}, %c: {t}) -> ({t}, {t}) {{
    %0 = "graph.permute"(%x) {{perm = [0, 2, 1, 3]}} : ({h}) -> {t}
    %1 = "graph.mul"(%0, %c) : ({t}, {t}) -> {t}
    %2 = "graph.neg"(%0) : ({t}) -> {t}
    "func.return"(%1, %2) : ({t}, {t}) -> ()
  }}
}}
"""
    module = ir.parse(text)
    passes.run(module, "layout")
    assert str(module) == text
