"""TVM's arithmetic simplifier applies integer algebra to float expressions inside one fused
kernel: x - x -> 0, x * 0 -> 0, (x + y) - y -> x, x + y - x -> y, x + 0 -> x. Those differ from
IEEE (and torch) for NaN, infinities, -0 and rounding (3 + 1e-30 - 3 is 0, not 1e-30). The
differential fuzzer (tests/test_fuzz_torch.py) found it. TVM 0.27 has no switch for it, so the
lowering hides the operands of float arithmetic from it (`lower_math.lower_arithmetic`); these
check that every such kernel computes what torch does, bit for bit, in the elementwise template
(vectorised) and in a dense template's epilogue, and that bf16 rounds after every op.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import bitsmith
from bitsmith import ir, passes
from bitsmith.ir.interpreter import kernel_calls

from .tvm_checks import build_and_run, func

X = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, 1e30, 3.0, -0.0, 5.0]])
Y = torch.tensor([[1.0, 2.0, float("inf"), 0.0, 1e30, 1e-30, 0.0, -0.0]])


class Expression(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "x-x":
            return x - x
        if self.kind == "x*0":
            return x * 0
        if self.kind == "(x+y)-y":
            return (x + y) - y
        if self.kind == "x+0":
            return x + 0
        if self.kind == "x/x":
            return x / x
        return x + y - x


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Equal values, NaN where NaN, and the same sign of every zero."""
    np.testing.assert_array_equal(got, want)
    assert (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all(), (got, want)


@pytest.mark.parametrize("kind", ["x-x", "x*0", "(x+y)-y", "x+y-x", "x+0", "x/x"])
@pytest.mark.parametrize("width", [1, 512], ids=["scalar", "vectorised"])
def test_float_algebra_is_not_simplified(kind: str, width: int) -> None:
    model = Expression(kind)
    x, y = X.repeat(1, width), Y.repeat(1, width)
    got = np.asarray(bitsmith.compile(model, [x, y])(x.numpy(), y.numpy()))
    assert_bits_equal(got, model(x, y).numpy())


class LinearEpilogue(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 32)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (self.linear(x) + r) - r


def test_dense_epilogue_is_not_simplified() -> None:
    torch.manual_seed(0)
    model = LinearEpilogue().eval()
    x, r = torch.randn(4, 8), torch.randn(4, 32)
    r[0, :3] = torch.tensor([float("inf"), float("nan"), 1e30])
    cm = bitsmith.compile(model, [x, r])
    with torch.no_grad():
        want = model(x, r).numpy()
    got = np.asarray(cm(x.numpy(), r.numpy()))
    assert np.isnan(got[0, :2]).all() and got[0, 2] == 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_rounds_after_every_op() -> None:
    """(1 + 300) - 300 in bf16: 301 rounds to 300 before the subtraction (torch gives 0)."""
    b = "tensor<1x4xbf16>"
    module = ir.parse(func(f"%x: {b}, %y: {b}", b, f"""
        %0 = "graph.add"(%x, %y) : ({b}, {b}) -> {b}
        %1 = "graph.sub"(%0, %y) : ({b}, {b}) -> {b}
        "func.return"(%1) : ({b}) -> ()
    """), weights={})
    passes.run(module, "canonicalize,fuse")
    x = np.array([[1.0, 3.0, np.nan, -0.0]], ml_dtypes.bfloat16)
    y = np.array([[300.0, 1e-30, 1.0, 0.0]], ml_dtypes.bfloat16)
    (op, args, ctx), = kernel_calls(module, [x, y])
    _, (got,) = build_and_run(op, args, op.evaluate(ctx, *args))
    tx, ty = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) for a in (x, y))
    want = ((tx + ty) - ty).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    assert_bits_equal(got.astype(np.float32), want.astype(np.float32))
