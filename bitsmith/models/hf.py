"""Small transformers architectures built offline from a config (random weights), with
example inputs: what tests and benchmarks use to cover Hugging Face models."""
from __future__ import annotations

from collections.abc import Callable

import torch
import transformers

T = transformers


def _text(batch: int, mask: bool) -> tuple:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, 500, (batch, 12), generator=gen)
    if not mask:
        return (ids,)
    attention = torch.ones(batch, 12, dtype=torch.int64)
    attention[batch - 1, -3:] = 0
    return ids, attention


def _image(batch: int, size: int) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)),)


ARCHS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], tuple]]] = {
    "bert": (lambda: T.BertModel(T.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=1000, max_position_embeddings=64)), lambda b: _text(b, True)),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0)), lambda b: _text(b, False)),
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64,
        use_cache=False)), lambda b: _text(b, False)),
    "vit": (lambda: T.ViTModel(T.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8)), lambda b: _image(b, 32)),
    "resnet": (lambda: T.ResNetModel(T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")),
        lambda b: _image(b, 64)),
    "mobilenet_v2": (lambda: T.MobileNetV2Model(T.MobileNetV2Config(
        image_size=64, depth_multiplier=0.35)), lambda b: _image(b, 64)),
    "convnext": (lambda: T.ConvNextModel(T.ConvNextConfig(
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)), lambda b: _image(b, 64)),
}
