"""NaN and infinities go through every op as torch (x86 CPU) sends them: each op on inputs full
of NaN, +-inf, signed zeros and huge values, compiled (TVM) and compared with torch itself,
element for element (NaN where torch has NaN, the same infinities)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bitsmith
from bitsmith import selfcheck

SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 88.5, -88.5,
           2.5, -0.5, 1e-40, 3.0]

UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp,
    "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "abs": torch.abs,
    "neg": torch.neg, "reciprocal": torch.reciprocal, "floor": torch.floor,
    "round": torch.round, "sign": torch.sign, "erf": torch.erf, "sin": torch.sin,
    "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "relu6": F.relu6,
    "clamp": lambda t: t.clamp(-2.0, 2.0), "clamp_min": lambda t: t.clamp(min=0.5),
    "square": lambda t: t * t, "pow": lambda t: t ** 3, "to_int32": lambda t: t.to(torch.int32),
    "to_int64": lambda t: t.to(torch.int64), "to_bool": lambda t: t.to(torch.bool),
    "isnan": torch.isnan,
}

ROWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda t: t.softmax(-1), "log_softmax": lambda t: t.log_softmax(-1),
    "layer_norm": lambda t: F.layer_norm(t, t.shape[-1:]), "sum": lambda t: t.sum(-1),
    "mean": lambda t: t.mean(-1), "amax": lambda t: t.amax(-1), "amin": lambda t: t.amin(-1),
    "argmax": lambda t: t.argmax(-1), "argmin": lambda t: t.argmin(-1),
    "max_pool": lambda t: F.max_pool1d(t.unsqueeze(1), 2).squeeze(1),
    "cumsum": lambda t: t.cumsum(-1),
}

BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": torch.maximum, "minimum": torch.minimum, "eq": torch.eq, "ne": torch.ne,
    "lt": torch.lt, "ge": torch.ge, "where": lambda a, b: torch.where(a > b, a, b),
    "pow": torch.pow, "floor_divide": torch.floor_divide, "remainder": torch.remainder,
}


class Many(torch.nn.Module):
    """Every function of a table applied to the inputs; one output each."""

    def __init__(self, table: dict[str, Callable[..., torch.Tensor]]) -> None:
        super().__init__()
        self.table = table

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(fn(*xs) for fn in self.table.values())


def _specials(rows: int) -> torch.Tensor:
    values = torch.tensor(SPECIAL)
    return torch.stack([values.roll(r) for r in range(rows)])


def _assert_as_torch(table: dict[str, Callable[..., torch.Tensor]],
                     inputs: list[torch.Tensor]) -> None:
    model = Many(table)
    cm = bitsmith.compile(model, inputs, check=False)  # this test compares, op by op
    got = cm(*[t.numpy() for t in inputs])
    want = selfcheck.torch_outputs(model, inputs, {})
    wrong = {name: d for name, g, w in zip(table, got, want, strict=True)
             if (d := selfcheck.difference(np.asarray(g), w, name)) is not None}
    assert not wrong, "\n".join(wrong.values())


@pytest.mark.parametrize("group", ["unary", "rows"])
def test_one_input_ops_treat_specials_as_torch(group: str) -> None:
    _assert_as_torch(UNARY if group == "unary" else ROWS, [_specials(5)])


def test_binary_ops_treat_specials_as_torch() -> None:
    a = _specials(len(SPECIAL))
    _assert_as_torch(BINARY, [a, a.T.contiguous()])  # every special meets every other


def test_scalar_powers_are_torchs_bit_for_bit() -> None:
    """torch's CPU kernel computes x**2, x**3, x**-1, x**-2, x**0.5 and x**-0.5 as products,
    reciprocals and square roots (not pow), and so does the import: equal to the last bit."""
    exponents = (2.0, 3.0, -1.0, -2.0, 0.5, -0.5, 4.0)
    model = Many({str(e): (lambda t, e=e: t ** e) for e in exponents})
    x = _specials(3) * torch.tensor(1.37)
    got = bitsmith.compile(model, [x])(x.numpy())
    for e, g, w in zip(exponents, got, model(x), strict=True):
        np.testing.assert_array_equal(np.asarray(g), w.numpy(), err_msg=f"x ** {e}")
