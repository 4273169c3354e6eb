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
