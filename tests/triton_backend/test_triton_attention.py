"""The `triton.attention` template (flash attention: keys in blocks, online softmax) against
the interpreter under TRITON_INTERPRET=1: causal, bool and additive masks (a query masked from
every key gives 0), grouped-query heads, odd lengths and head dims, several blocks, f16."""
import pytest
import torch
import torch.nn.functional as F

from bitsmith.codegen.template import Config
from bitsmith.frontend import from_torch

from .triton_checks import check_module

GPU = "canonicalize,cse,dce,fuse"


def checked(model: torch.nn.Module, *args: torch.Tensor, config: Config | None = None) -> int:
    torch.manual_seed(0)
    module = from_torch(model.eval(), args, {}, name="m")
    return check_module(module, pipeline=GPU, config=config, template="triton.attention")


def blocks(bm: int, bn: int) -> Config:
    return Config({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2})


class Attn(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (F.scaled_dot_product_attention(q, k, v, is_causal=True),
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask.float() - 1.0,
                                               scale=0.3))


@pytest.mark.parametrize("config", [None, blocks(16, 16)])
def test_causal_bool_and_additive_masks(config: Config | None) -> None:
    q, k, v = torch.randn(2, 3, 21, 9), torch.randn(2, 3, 37, 9), torch.randn(2, 3, 37, 5)
    mask = torch.rand(21, 37) > 0.3
    mask[4] = False  # query 4 sees no key: its output is 0
    assert checked(Attn(), q, k, v, mask, config=config) == 3


class Gqa(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_grouped_query_heads() -> None:
    q, k, v = torch.randn(1, 6, 17, 16), torch.randn(1, 2, 17, 16), torch.randn(1, 2, 17, 16)
    assert checked(Gqa(), q, k, v, config=blocks(16, 16)) == 1


def test_f16() -> None:
    q, k, v = (torch.randn(1, 2, 19, 16).half() for _ in range(3))
    assert checked(Gqa(), q, k, v) == 1
