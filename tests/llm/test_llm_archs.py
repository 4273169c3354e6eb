"""The decoder families beyond Llama, from Hugging Face directories (transformers' classes at
small sizes, seeded random weights, saved with safetensors and a byte-level tokenizer):
Phi-3 (fused q/k/v and gate/up), Gemma (1 + w norms, scaled embeddings, GeGLU) and GPT-2
(LayerNorm, learned positions, Conv1D weights, biases): logits after every token of an odd
prompt, and greedy tokens, against transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import bitsmith.llm as bllm
from bitsmith.llm.sources import byte_tokenizer_json

IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
MODELS = {
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, **IDS)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, vocab_size=300, max_position_embeddings=128,
        **IDS)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128, **IDS)),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_family_matches_transformers(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(byte_tokenizer_json(300))
    llm = bllm.compile(str(tmp_path), kv="f32", max_batch=1, max_seq=96, prefill=(16,),
                       score_chunk=16)
    assert llm.info["arch"] == arch
    ids = [1] + np.random.default_rng(1).integers(3, 300, 20).tolist()  # 21 tokens
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(llm._score(ids), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
    got = llm.complete([ids], max_new_tokens=12, ignore_eos=True)[0].token_ids
    ref, past, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(12):
            res = model(step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            ref.append(int(res.logits[0, -1].argmax()))
            step = torch.tensor([[ref[-1]]])
    assert got == ref
