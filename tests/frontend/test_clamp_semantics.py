"""`clamp` with one bound has no other bound (it once took hardtanh's max=1.0): checked against
torch itself, through the importer and through a compiled model, on odd shapes with values well
outside [-1, 1] so that a stray bound shows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import bitsmith
from bitsmith.frontend import from_torch

from .conftest import assert_matches_torch


class ClampMin(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0.5) + torch.clamp(x, max=-2.0)


class MaskedMean(torch.nn.Module):
    """Sentence-embedding mean pooling: the token count clamped at 1 (never a max)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)


class HardActivations(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(7, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return torch.nn.functional.hardswish(y) + torch.nn.functional.hardsigmoid(y) \
            + torch.nn.functional.hardtanh(y, -2.0, 3.0) + torch.nn.functional.relu6(y)


def _cases() -> list[tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7) * 6
    mask = (torch.rand(3, 5) > 0.4).long()
    return [(ClampMin(), (x,)), (MaskedMean(), (x, mask)), (HardActivations(), (x,))]


@pytest.mark.parametrize("case", range(3), ids=["clamp_one_bound", "masked_mean", "hard_acts"])
def test_imports_as_torch_computes(case: int) -> None:
    model, inputs = _cases()[case]
    assert_matches_torch(from_torch(model.eval(), inputs), model, inputs)


@pytest.mark.parametrize("case", range(3), ids=["clamp_one_bound", "masked_mean", "hard_acts"])
def test_compiles_as_torch_computes(case: int) -> None:
    model, inputs = _cases()[case]
    with torch.no_grad():
        want = model.eval()(*inputs).numpy()
    got = bitsmith.compile(model, inputs)(*[t.numpy() for t in inputs])
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
