"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ModelSpec
from .weight_init import build_eval, init_module, seeded_generator

VOCAB = 1000
DIM = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HIDDEN = 176  # ~8/3 * DIM, rounded up to a multiple of 16 as Llama does
MAX_SEQ = 64
ROPE_THETA = 10000.0
NORM_EPS = 1e-5
SEQ_LEN = 16


@dataclass(frozen=True)
class LlamaConfig:
    """The decoder's sizes; the defaults are the zoo model's (small enough for tests), larger
    ones (e.g. `LLAMA_1B`) make a decode step stream its weights from memory as a real one."""

    vocab: int = VOCAB
    dim: int = DIM
    layers: int = LAYERS
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    hidden: int = HIDDEN
    max_seq: int = MAX_SEQ


LLAMA_1B = LlamaConfig(vocab=32000, dim=2048, layers=4, heads=16, kv_heads=4, hidden=5632)
"""TinyLlama-1.1B's layer shapes (4 of its 22 layers), for the end-to-end decode benchmark."""


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last axis."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position-dependent angles."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, D) -> (B, kv_heads * n_rep, T, D), each kv head repeated n_rep times."""
    b, kv_heads, t, d = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, kv_heads, n_rep, t, d)
    return x.reshape(b, kv_heads * n_rep, t, d)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary position embeddings."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, T, DIM) -> (B, T, DIM)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, DIM) -> (B, T, DIM)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One decoder layer."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nn.Module):
    """Token embedding, decoder stack, final RMSNorm and an untied LM head."""

    rope_cos: torch.Tensor  # buffers, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, seed: int = 0, cfg: LlamaConfig = LlamaConfig()) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        head_dim = cfg.dim // cfg.heads
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(cfg.max_seq).float(), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        gen = seeded_generator(seed)
        for module in self.modules():
            init_module(module, gen)
            if isinstance(module, RMSNorm):
                with torch.no_grad():
                    module.weight.normal_(1.0, 0.1, generator=gen)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, VOCAB) next-token logits."""
        seq_len = input_ids.shape[1]
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build(cfg: LlamaConfig = LlamaConfig()) -> Llama:
    """A fresh eval-mode Llama decoder with deterministic weights."""
    return build_eval(lambda: Llama(cfg=cfg))


def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    """Token ids, int64 (batch, 16)."""
    gen = seeded_generator(1)
    return (torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=gen),)


SPEC = ModelSpec(
    name="llama",
    description="Llama-style decoder: vocab 1000, dim 64, 2 layers, 4 query / 2 kv heads, "
                "RoPE, RMSNorm, SwiGLU, causal SDPA",
    build=build,
    example_inputs=example_inputs,
    input_names=("input_ids",),
)
