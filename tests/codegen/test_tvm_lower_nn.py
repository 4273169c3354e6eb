"""Generic TVM lowering of conv2d, pools, batch norm, pad, split and attention, and of every
kernel of every zoo model, each checked against the interpreter."""
from __future__ import annotations

import pytest
import torch

from bitsmith import models, passes
from bitsmith.frontend import from_torch
from bitsmith.models.hf import ARCHS

from .tvm_checks import check_module, func

X, XN = "tensor<2x3x9x7xf32>", "tensor<2x9x7x3xf32>"
CONVS = [  # (layout, x, weight shape, groups, stride, padding, dilation, out)
    ("NCHW", X, (4, 3, 3, 3), 1, (1, 1), (1, 1), (1, 1), "tensor<2x4x9x7xf32>"),
    ("NCHW", X, (6, 1, 3, 2), 3, (2, 1), (1, 0), (1, 2), "tensor<2x6x5x5xf32>"),
    ("NHWC", XN, (3, 3, 3, 4), 1, (2, 2), (1, 1), (1, 1), "tensor<2x5x4x4xf32>"),
    ("NHWC", XN, (1, 1, 1, 3), 3, (1, 1), (0, 0), (1, 1), "tensor<2x9x7x3xf32>"),
]


@pytest.mark.parametrize("layout, x, wshape, groups, stride, padding, dilation, out", CONVS)
def test_conv2d(layout: str, x: str, wshape: tuple, groups: int, stride: tuple, padding: tuple,
                dilation: tuple, out: str) -> None:
    w = f"tensor<{'x'.join(map(str, wshape))}xf32>"
    cout = wshape[0] if layout == "NCHW" else wshape[3]
    b = f"tensor<{cout}xf32>"
    attrs = (f'{{dilation = [{dilation[0]}, {dilation[1]}], groups = {groups}, layout = '
             f'"{layout}", padding = [{padding[0]}, {padding[1]}], stride = [{stride[0]}, '
             f'{stride[1]}]}}')
    text = func(f"%x: {x}, %w: {w}, %b: {b}", out, f"""
        %0 = "graph.conv2d"(%x, %w, %b) {attrs} : ({x}, {w}, {b}) -> {out}
        %1 = "graph.relu"(%0) : ({out}) -> {out}
        "func.return"(%1) : ({out}) -> ()
    """)
    assert check_module(text) == 1


def test_pools_batch_norm_and_pad() -> None:
    c = "tensor<3xf32>"
    p1, p2 = "tensor<2x3x5x3xf32>", "tensor<2x3x4x3xf32>"
    a1, padded = "tensor<2x1x1x3xf32>", "tensor<2x3x10x10xf32>"
    text = func(f"%x: {X}, %xn: {XN}, %m: {c}, %v: {c}, %g: {c}",
                f"{p1}, {p2}, {a1}, {X}, {padded}, tensor<2x3x2x3xf32>", f"""
        %0 = "graph.max_pool2d"(%x) {{ceil_mode = true, kernel = [3, 3], layout = "NCHW",
            padding = [1, 0], stride = [2, 2]}} : ({X}) -> {p1}
        %1 = "graph.avg_pool2d"(%x) {{count_include_pad = false, kernel = [2, 2],
            layout = "NCHW", padding = [1, 1], stride = [3, 3]}} : ({X}) -> tensor<2x3x4x3xf32>
        %2 = "graph.adaptive_avg_pool2d"(%xn) {{layout = "NHWC", size = [1, 1]}}
            : ({XN}) -> {a1}
        %3 = "graph.abs"(%v) : ({c}) -> {c}
        %4 = "graph.batch_norm"(%x, %m, %3, %g) {{axis = 1, eps = 1e-05}}
            : ({X}, {c}, {c}, {c}) -> {X}
        %5 = "graph.pad"(%x) {{pads = [0, 0, 0, 0, 1, 0, 0, 3], value = -1.5}}
            : ({X}) -> {padded}
        %6 = "graph.adaptive_avg_pool2d"(%x) {{layout = "NCHW", size = [2, 3]}}
            : ({X}) -> tensor<2x3x2x3xf32>
        "func.return"(%0, %1, %2, %4, %5, %6)
            : ({p1}, {p2}, {a1}, {X}, {padded}, tensor<2x3x2x3xf32>) -> ()
    """)
    assert check_module(text) >= 5


def test_split() -> None:
    t, a, b = "tensor<3x9x2xf32>", "tensor<3x4x2xf32>", "tensor<3x5x2xf32>"
    text = func(f"%x: {t}", f"{a}, {b}", f"""
        %0:2 = "graph.split"(%x) {{axis = 1, sizes = [4, 5]}} : ({t}) -> ({a}, {b})
        %1 = "graph.exp"(%0#1) : ({b}) -> {b}
        "func.return"(%0#0, %1) : ({a}, {b}) -> ()
    """)
    assert check_module(text) >= 1


@pytest.mark.parametrize("mask, causal, gqa", [("", False, False), ("bool", False, False),
                                               ("f32", True, False), ("", True, True)])
def test_attention(mask: str, causal: bool, gqa: bool) -> None:
    q, kv = "tensor<Bx4x5x6xf32>", f"tensor<Bx{2 if gqa else 4}x7x6xf32>"
    o = "tensor<Bx4x5x6xf32>"
    m = f"tensor<Bx1x5x7x{mask}>" if mask else ""
    args = f"%q: {q}, %k: {kv}, %v: {kv}" + (f", %m: {m}" if mask else "")
    operands = "%q, %k, %v" + (", %m" if mask else "")
    types = f"{q}, {kv}, {kv}" + (f", {m}" if mask else "")
    attrs = (f"{{gqa = {str(gqa).lower()}, is_causal = {str(causal).lower()}, "
             f"scale = 0.3}}")
    text = func(args, o, f"""
        %0 = "graph.attention"({operands}) {attrs} : ({types}) -> {o}
        "func.return"(%0) : ({o}) -> ()
    """)
    assert check_module(text, batches=(1, 2)) == 1


@pytest.mark.parametrize("name", models.names())
def test_every_kernel_of_a_zoo_model_matches_the_interpreter(name: str) -> None:
    spec = models.get(name)
    torch.manual_seed(0)
    module = from_torch(spec.build().eval(), spec.example_inputs(2), name=name,
                        dynamic_batch=True)
    passes.run(module, passes.default_pipeline("cpu"))
    assert check_module(module, pipeline="", batches=(3,)) > 0


SLOW_ARCHS = {"gpt2", "mobilenet_v2", "llama"}
"""15, 13 and 17 s of the default suite: under -m slow (bert and vit cover the attention
kernels, resnet and convnext the conv ones, and tests/llm the Llama decoder's, by default)."""


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_ARCHS
                                  else a for a in sorted(ARCHS)])
def test_every_kernel_of_a_transformers_architecture_matches_the_interpreter(arch: str) -> None:
    build, make_inputs = ARCHS[arch]
    torch.manual_seed(0)
    module = from_torch(build().eval(), make_inputs(2), name=arch, dynamic_batch=True)
    passes.run(module, passes.default_pipeline("cpu"))
    arrays = [t.numpy() for t in make_inputs(3)]
    assert check_module(module, pipeline="", inputs=arrays) > 0


def test_arange_cumsum_and_index() -> None:
    i64 = "tensor<3x6xi64>"
    text = func(f"%x: {i64}, %t: tensor<4x6x5xf32>, %ix: tensor<2x1xi64>, %iy: tensor<3xi64>",
                f"{i64}, tensor<6xi64>, tensor<4x2x3xf32>", f"""
        %0 = "graph.cumsum"(%x) {{axis = 1}} : ({i64}) -> {i64}
        %1 = "graph.arange"() {{start = 2, step = 3}} : () -> tensor<6xi64>
        %2 = "graph.index"(%t, %ix, %iy) {{axes = [1, 2]}}
            : (tensor<4x6x5xf32>, tensor<2x1xi64>, tensor<3xi64>) -> tensor<4x2x3xf32>
        "func.return"(%0, %1, %2) : ({i64}, tensor<6xi64>, tensor<4x2x3xf32>) -> ()
    """)
    assert check_module(text) >= 2
