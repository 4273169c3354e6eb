"""bfloat16 at the model's boundary and between kernels: torch tensors in and out (torch cannot
hand bf16 to numpy, numpy cannot hand it to TVM through DLPack), compiled vs torch."""
from __future__ import annotations

from pathlib import Path

import torch

import bitsmith
from bitsmith import selfcheck


class Bf16Boundary(torch.nn.Module):
    """A bf16 input, a bf16 value between two kernels (a reduction reads it), bf16 outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = (x * 3).exp()
        return h, h.sum(-1) - 1, self.proj(x.float())


def test_bf16_inputs_intermediates_and_outputs_match_torch(tmp_path: Path) -> None:
    model = Bf16Boundary().eval()
    x = (torch.randn(3, 7) / 2).to(torch.bfloat16)
    cm = bitsmith.compile(model, [x])
    cm.save(tmp_path / "m.bsm")
    for compiled in (cm, bitsmith.load(tmp_path / "m.bsm")):
        got = compiled(x)
        assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32]
        want = selfcheck.torch_outputs(model, [x], {})
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert selfcheck.difference(selfcheck.as_numpy(g), w, f"output {i}") is None


class Bf16ThenExp(torch.nn.Module):
    """exp, sigmoid and silu in f32 of a value read from bf16 (one kernel: the cast inlined)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = x.float()
        return (y * 3).exp(), torch.sigmoid(y * 2 - 1), torch.nn.functional.silu(y + 0.5)


def test_f32_exp_of_a_bf16_read_matches_torch() -> None:
    """TVM's bf16 legalisation miscompiles a Let over a bf16 read (every element inf):
    `fast_exp` binds nothing in such a kernel. The compile's own check against torch fails
    otherwise; the outputs are compared here too."""
    model = Bf16ThenExp().eval()
    x = torch.cat([torch.randn(3, 7) / 2, torch.tensor([[30.0, -100.0, 0, 1, -1, 2, -2]])])
    x = x.to(torch.bfloat16)
    got = bitsmith.compile(model, [x])(x)
    want = selfcheck.torch_outputs(model, [x], {})
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert selfcheck.difference(selfcheck.as_numpy(g), w, f"output {i}") is None
