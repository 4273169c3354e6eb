"""ViT-tiny: a pre-norm vision transformer on 4x4 patches of a 32x32 image."""

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ModelSpec
from .weight_init import build_eval, init_module, seeded_generator

IMAGE_SIZE = 32
PATCH = 4
DIM = 64
DEPTH = 3
HEADS = 4
MLP_RATIO = 4
NUM_CLASSES = 10


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, head_dim)."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all tokens; no mask."""
        b, n, c = x.shape
        q = self._split_heads(self.q(x))
        k = self._split_heads(self.k(x))
        v = self._split_heads(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio),
            nn.GELU(),
            nn.Linear(dim * mlp_ratio, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention then residual MLP."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, learned positions, transformer blocks, linear head."""

    def __init__(self, image_size: int = IMAGE_SIZE, patch: int = PATCH, dim: int = DIM,
                 depth: int = DEPTH, heads: int = HEADS, mlp_ratio: int = MLP_RATIO,
                 num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
        super().__init__()
        num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        gen = seeded_generator(seed)
        with torch.no_grad():
            self.cls_token.normal_(0.0, 0.02, generator=gen)
            self.pos_embed.normal_(0.0, 0.02, generator=gen)
        for module in self.modules():
            init_module(module, gen)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes), read from the class token."""
        x = self.patch_embed(image).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def build() -> ViT:
    """A fresh eval-mode ViT-tiny with deterministic weights."""
    return build_eval(ViT)


def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    """Images of shape (batch, 3, 32, 32)."""
    gen = seeded_generator(1)
    return (torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),)


SPEC = ModelSpec(
    name="vit",
    description="ViT-tiny: 4x4 patches, dim 64, 3 pre-norm blocks, 4 heads, SDPA, cls-token head",
    build=build,
    example_inputs=example_inputs,
    input_names=("image",),
)
