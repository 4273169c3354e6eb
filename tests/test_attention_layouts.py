"""Attention whose output interleaves the batch with the sequence (torch's sequence-first
`nn.MultiheadAttention` and `nn.TransformerEncoderLayer`: `[S * B, H * D]` after the heads) once
compiled to a wrong answer: the scheduled consumer of P.V read rows of other batches before they
were computed. Checked against torch itself, repeatedly, at odd sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import bitsmith


class SelfAttention(torch.nn.Module):
    def __init__(self, width: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _models() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "mha_seq_first": (SelfAttention(16, 4, False), torch.randn(5, 3, 16)),
        "mha_batch_first": (SelfAttention(12, 3, True), torch.randn(3, 7, 12)),
        "encoder_layer_seq_first": (torch.nn.TransformerEncoderLayer(
            16, 2, dim_feedforward=24, dropout=0.0), torch.randn(7, 2, 16)),
    }


@pytest.mark.parametrize("name", sorted(_models()))
def test_compiled_attention_matches_torch_every_call(name: str) -> None:
    model, x = _models()[name]
    model.eval()
    with torch.no_grad():
        want = model(x).numpy()
    cm = bitsmith.compile(model, (x,))
    for _ in range(3):  # a kernel reading memory it should not differs from call to call
        got = cm(x.numpy())
        got = got[0] if isinstance(got, (list, tuple)) else got
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
