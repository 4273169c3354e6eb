"""The host sampler: greedy, seeded sampling, top-k/top-p/min-p, repetition penalty, logprobs,
and the checks on parameters and logits."""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bitsmith.errors import InputError
from bitsmith.llm.sampling import Sample, Sampler, SamplingError, SamplingParams, log_softmax

PROBS = np.array([0.4, 0.25, 0.2, 0.1, 0.05])


def _sampler(vocab: int = 5, **params: object) -> Sampler:
    return Sampler(SamplingParams(**params), vocab)  # type: ignore[arg-type]


def _draws(sampler: Sampler, logits: np.ndarray, n: int) -> np.ndarray:
    return np.array([sampler.sample(logits, []).token for _ in range(n)])


def _reference_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + math.log(float(np.exp(x - x.max()).sum())))


def test_greedy_is_argmax() -> None:
    rng = np.random.default_rng(0)
    sampler = _sampler(vocab=1000)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        assert sampler.sample(logits, []).token == int(np.argmax(logits))


def test_greedy_ties_go_to_the_lowest_id() -> None:
    logits = np.array([0.0, 3.0, 1.0, 3.0, 3.0], dtype=np.float32)
    assert _sampler().sample(logits, []).token == 1


def test_same_seed_same_tokens_and_other_seeds_differ() -> None:
    logits = np.zeros(50, dtype=np.float32)  # uniform: every draw depends on the generator
    runs = {seed: _draws(_sampler(50, temperature=1.0, seed=seed), logits, 200)
            for seed in (1, 1, 2, 3)}
    again = _draws(_sampler(50, temperature=1.0, seed=1), logits, 200)
    np.testing.assert_array_equal(runs[1], again)
    assert not np.array_equal(runs[1], runs[2])
    assert not np.array_equal(runs[2], runs[3])
    assert len(set(runs[1].tolist())) > 25  # a uniform draw over 50 ids, not a constant


@pytest.mark.parametrize("params", [
    {"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"top_k": 1, "top_p": 0.5, "min_p": 0.5},
])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_filters_that_keep_one_token_equal_greedy(params: dict, temperature: float) -> None:
    rng = np.random.default_rng(1)
    sampler = _sampler(vocab=300, temperature=temperature, seed=0, **params)
    for _ in range(20):
        logits = rng.normal(size=300).astype(np.float32)
        assert sampler.sample(logits, []).token == int(np.argmax(logits))


def _chi_square(draws: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(draws, minlength=probs.size)
    expected = probs * draws.size
    keep = expected > 0
    assert counts[~keep].sum() == 0  # a token of probability 0 was drawn
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# 99.9% quantiles of chi-square by degrees of freedom: a correct sampler fails 1 in 1000 seeds
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def test_frequencies_match_the_distribution() -> None:
    logits = np.log(PROBS).astype(np.float32) + 3.0  # a shift does not change the softmax
    draws = _draws(_sampler(temperature=1.0, seed=1234), logits, 20000)
    assert _chi_square(draws, PROBS) < CHI2_999[4]


def test_temperature_sharpens_as_the_power_of_the_distribution() -> None:
    draws = _draws(_sampler(temperature=0.5, seed=5), np.log(PROBS), 20000)
    sharp = PROBS ** 2 / (PROBS ** 2).sum()
    assert _chi_square(draws, sharp) < CHI2_999[4]


@pytest.mark.parametrize(("params", "kept"), [
    ({"top_k": 3}, [0, 1, 2]),
    ({"top_p": 0.6}, [0, 1]),           # 0.4 + 0.25 reaches 0.6
    ({"top_p": 0.7}, [0, 1, 2]),
    ({"min_p": 0.45}, [0, 1, 2]),       # prob >= 0.45 * 0.4
    ({"top_k": 4, "top_p": 0.99}, [0, 1, 2, 3]),
    ({"top_k": 4, "top_p": 0.9, "min_p": 0.3}, [0, 1, 2]),  # 0.3 * 0.42 > 0.1 / 0.95
])
def test_filters_keep_the_expected_tokens_renormalised(params: dict, kept: list[int]) -> None:
    draws = _draws(_sampler(temperature=1.0, seed=7, **params), np.log(PROBS), 8000)
    truncated = np.zeros_like(PROBS)
    truncated[kept] = PROBS[kept] / PROBS[kept].sum()
    assert _chi_square(draws, truncated) < CHI2_999[len(kept) - 1]


def test_top_k_keeps_ties_of_the_kth_logit() -> None:
    logits = np.array([1.0, 5.0, 5.0, 0.0, 5.0])
    draws = _draws(_sampler(temperature=1.0, top_k=1, seed=3), logits, 600)
    assert set(draws.tolist()) == {1, 2, 4}


def _reference_allowed(x: np.ndarray, k: int, p: float, min_p: float) -> set[int]:
    """Token ids the filters keep, by full sorts over Python lists."""
    ids = list(range(x.size))
    if 0 < k < x.size:
        kth = sorted(x.tolist(), reverse=True)[k - 1]
        ids = [i for i in ids if x[i] >= kth]
    e = np.exp(x[ids] - x[ids].max())
    prob = dict(zip(ids, (e / e.sum()).tolist(), strict=True))
    if p < 1.0:
        ranked = sorted(ids, key=lambda i: (-prob[i], i))
        total = np.cumsum([prob[i] for i in ranked])
        assume(not np.any(np.abs(total - p) < 1e-9))  # no float coin toss at the boundary
        ids = ranked[:int(np.searchsorted(total, p)) + 1]
    top = max(prob[i] for i in ids)
    return {i for i in ids if prob[i] >= min_p * top}


@settings(max_examples=60)
@given(logits=st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 2.5]), min_size=2,
                       max_size=12),
       k=st.integers(0, 12), p=st.sampled_from([0.2, 0.5, 0.9, 1.0]),
       min_p=st.sampled_from([0.0, 0.1, 0.6]), seed=st.integers(0, 2**32))
def test_sampled_tokens_are_in_the_filtered_set(logits: list[float], k: int, p: float,
                                                 min_p: float, seed: int) -> None:
    x = np.array(logits)
    allowed = _reference_allowed(x, k, p, min_p)
    sampler = _sampler(x.size, temperature=1.0, top_k=k, top_p=p, min_p=min_p, seed=seed)
    assert set(_draws(sampler, x, 40).tolist()) <= allowed


def test_top_k_on_a_large_vocabulary() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=150_000).astype(np.float32)
    top8 = set(np.argsort(-logits)[:8].tolist())
    sampler = _sampler(150_000, temperature=2.0, top_k=8, seed=0)
    assert set(_draws(sampler, logits, 50).tolist()) <= top8


def _nucleus(x: np.ndarray, top_p: float) -> set[int]:
    """The nucleus by a full sort."""
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-probs, kind="stable")
    return set(order[:int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1].tolist())


def test_top_p_on_a_large_vocabulary_peaked_and_flat() -> None:
    rng = np.random.default_rng(3)
    peaked = rng.normal(size=100_000) * 0.1
    peaked[[10, 5000, 77_777]] = 12.0  # three tokens hold 3/4 of the probability
    assert _nucleus(peaked, 0.7) == {10, 5000, 77_777}
    draws = _draws(_sampler(100_000, temperature=1.0, top_p=0.7, seed=1), peaked, 60)
    assert set(draws.tolist()) == {10, 5000, 77_777}
    flat = rng.normal(size=3000)  # the nucleus is larger than the first partition
    nucleus = _nucleus(flat, 0.5)
    assert len(nucleus) > 256
    draws = _draws(_sampler(3000, temperature=1.0, top_p=0.5, seed=1), flat, 300)
    assert set(draws.tolist()) <= nucleus


@pytest.mark.parametrize("logit", [2.0, -2.0])
def test_repetition_penalty_lowers_a_repeated_token(logit: float) -> None:
    logits = np.array([1.0, logit, 0.5, -0.5], dtype=np.float32)
    plain = _sampler(4, logprobs=0).sample(logits, [1, 1, 3])
    penalised = _sampler(4, logprobs=0, repetition_penalty=1.5)
    expected = logits.astype(np.float64)
    expected[1] = logit / 1.5 if logit > 0 else logit * 1.5
    expected[3] = -0.5 * 1.5
    after = penalised.sample(logits, [1, 1, 3])
    assert after.logprob is not None and plain.logprob is not None
    lp_plain = _reference_log_softmax(logits)
    lp_penalised = _reference_log_softmax(expected)
    assert lp_penalised[1] < lp_plain[1]
    assert after.logprob == pytest.approx(lp_penalised[after.token], abs=1e-12)
    assert after.top == [] and plain.top == []


def test_repetition_penalty_can_change_the_greedy_choice() -> None:
    logits = np.array([2.0, 1.9, 0.0], dtype=np.float32)
    assert _sampler(3, repetition_penalty=1.2).sample(logits, [0]).token == 1
    assert _sampler(3, repetition_penalty=1.2).sample(logits, []).token == 0


@pytest.mark.parametrize("temperature", [0.0, 0.7, 2.0])
def test_logprobs_are_the_log_softmax_before_filtering(temperature: float) -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(size=20).astype(np.float32)
    sampler = _sampler(20, temperature=temperature, top_k=2, logprobs=20, seed=9)
    sample = sampler.sample(logits, [])
    scale = temperature if temperature > 0 else 1.0
    lp = _reference_log_softmax(logits.astype(np.float64) / scale)
    assert sample.logprob == pytest.approx(lp[sample.token], abs=1e-12)
    assert sample.top is not None and len(sample.top) == 20  # top-k=2 did not cut them
    assert math.fsum(math.exp(v) for _, v in sample.top) == pytest.approx(1.0, abs=1e-12)
    assert [i for i, _ in sample.top] == np.argsort(-lp, kind="stable").tolist()
    np.testing.assert_allclose([v for _, v in sample.top], np.sort(lp)[::-1], atol=1e-12)


def test_logprob_alternatives_break_ties_by_lowest_id() -> None:
    logits = np.array([0.0, 1.0, 1.0, 1.0, 2.0])
    sample = _sampler(5, logprobs=2).sample(logits, [])
    assert sample.top is not None and [i for i, _ in sample.top] == [4, 1]


def test_no_logprobs_unless_asked() -> None:
    assert _sampler().sample(np.log(PROBS), []) == Sample(0, None, None)


def test_positive_infinity_wins() -> None:
    logits = np.array([1.0, np.inf, 3.0, np.inf, -np.inf])
    assert _sampler(logprobs=1).sample(logits, []).token == 1
    draws = _draws(_sampler(temperature=1.0, seed=0), logits, 200)
    assert set(draws.tolist()) == {1, 3}
    np.testing.assert_allclose(log_softmax(logits)[[1, 3]], [-math.log(2)] * 2)


def test_negative_infinity_is_never_drawn() -> None:
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0, -np.inf])
    draws = _draws(_sampler(temperature=1.0, seed=0, top_p=0.9), logits, 300)
    assert set(draws.tolist()) == {1, 3}


@pytest.mark.parametrize(("logits", "match"), [
    (np.array([0.0, np.nan, 1.0, np.nan, 0.0]), "2 NaN value.*first at token id 1"),
    (np.full(5, -np.inf), "all -inf"),
    (np.zeros(4), r"shape \(5,\), got \(4,\)"),
    (np.zeros((1, 5)), r"shape \(5,\), got \(1, 5\)"),
])
def test_bad_logits_are_refused(logits: np.ndarray, match: str) -> None:
    for temperature in (0.0, 1.0):
        with pytest.raises(SamplingError, match=match):
            _sampler(temperature=temperature).sample(logits, [])


def test_history_ids_out_of_range_are_refused() -> None:
    with pytest.raises(SamplingError, match=r"expected token ids in \[0, 5\), got 7"):
        _sampler(repetition_penalty=1.3).sample(np.zeros(5), [1, 7])


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", 0), ("max_new_tokens", 2.0), ("temperature", -0.1),
    ("temperature", math.nan), ("temperature", math.inf), ("top_k", -1), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.01),
    ("repetition_penalty", 0.0), ("seed", -1), ("seed", 1.5), ("logprobs", 21),
    ("logprobs", -1), ("ignore_eos", "yes"), ("stop", [""]), ("stop", [1]),
    ("stop_token_ids", [-1]), ("stop_token_ids", "12"),
])
def test_bad_parameters_say_expected_and_got(field: str, value: object) -> None:
    with pytest.raises(InputError, match=rf"{field}: expected .*, got {re.escape(repr(value))}"):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_parameters_are_frozen_and_sequences_become_tuples() -> None:
    params = SamplingParams(stop=["</s>", "\n\n"], stop_token_ids=[2, 7])  # type: ignore[arg-type]
    assert params.stop == ("</s>", "\n\n") and params.stop_token_ids == (2, 7)
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]
    hash(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0  # type: ignore[misc]


def test_bad_vocab_size_is_refused() -> None:
    with pytest.raises(InputError, match="vocab_size an int >= 1, got 0"):
        Sampler(SamplingParams(), 0)
