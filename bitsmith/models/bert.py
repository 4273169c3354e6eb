"""A BERT-style post-norm encoder with padding mask and pooler."""

import math

import torch
from torch import nn

from .spec import ModelSpec
from .weight_init import build_eval, init_module, seeded_generator

VOCAB = 1000
HIDDEN = 64
LAYERS = 2
HEADS = 4
INTERMEDIATE = 256
MAX_POSITIONS = 64
TYPE_VOCAB = 2
SEQ_LEN = 16
CLS_ID = 1
PAD_ID = 0
LN_EPS = 1e-12


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    position_ids: torch.Tensor  # buffers, registered in __init__
    token_type_ids: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(TYPE_VOCAB, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.dropout = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(MAX_POSITIONS).expand(1, -1),
                             persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, MAX_POSITIONS, dtype=torch.long),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden) embeddings; every token has type 0."""
        batch, seq_len = input_ids.shape
        position_ids = self.position_ids[:, :seq_len]
        token_type_ids = self.token_type_ids[:, :seq_len].expand(batch, seq_len)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head attention written out: softmax(q k^T / sqrt(d) + mask) v."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = HIDDEN // HEADS
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.dropout = nn.Dropout(0.1)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, heads, T, head_dim)."""
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, HEADS, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """Context vectors (B, T, C); `mask_bias` is (B, 1, 1, T), 0 or large negative."""
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(x))
        v = self._split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = self.dropout(torch.softmax(scores + mask_bias, dim=-1))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return context.view(x.shape)


class EncoderLayer(nn.Module):
    """Post-norm layer: LN(x + attn(x)), then LN(h + ffn(h))."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = SelfAttention()
        self.attention_output = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.intermediate = nn.Linear(HIDDEN, INTERMEDIATE)
        self.act = nn.GELU()  # exact erf GELU, as in the original BERT
        self.output = nn.Linear(INTERMEDIATE, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """One encoder layer."""
        attn = self.dropout(self.attention_output(self.attention(x, mask_bias)))
        h = self.attention_norm(x + attn)
        ffn = self.dropout(self.output(self.act(self.intermediate(h))))
        return self.output_norm(h + ffn)


class Bert(nn.Module):
    """Embeddings, encoder stack and tanh pooler over the [CLS] token."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.embeddings = Embeddings()
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        self.pooler = nn.Linear(HIDDEN, HIDDEN)
        gen = seeded_generator(seed)
        for module in self.modules():
            init_module(module, gen)
        with torch.no_grad():
            self.embeddings.word_embeddings.weight[PAD_ID].zero_()

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state (B, T, C), pooled output (B, C))."""
        x = self.embeddings(input_ids)
        # 1 = attend, 0 = padding; padding keys get the most negative float as a bias.
        mask = attention_mask[:, None, None, :].to(x.dtype)
        mask_bias = (1.0 - mask) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask_bias)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return x, pooled


def build() -> Bert:
    """A fresh eval-mode BERT encoder with deterministic weights."""
    return build_eval(Bert)


def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask), both int64 (batch, 16); every row ends in padding."""
    gen = seeded_generator(1)
    input_ids = torch.randint(2, VOCAB, (batch, SEQ_LEN), generator=gen)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN, (batch, 1), generator=gen)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths).long()
    input_ids[:, 0] = CLS_ID
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    return input_ids, attention_mask


SPEC = ModelSpec(
    name="bert",
    description="BERT-style post-norm encoder: vocab 1000, hidden 64, 2 layers, 4 heads, "
                "padding mask, erf-GELU FFN, tanh pooler",
    build=build,
    example_inputs=example_inputs,
    input_names=("input_ids", "attention_mask"),
)
