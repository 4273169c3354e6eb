"""Continuous batching on the zoo decoder: every greedy request returns exactly its tokens
alone whatever the token budget and arrival order; the prefix cache changes no output
(prefixes ending before, on and after a page boundary), finds what it should, evicts under
pressure, and gives every page back."""
from __future__ import annotations

import numpy as np
import pytest

import bitsmith.llm as bllm
from bitsmith.errors import InputError
from bitsmith.llm.api import Completion
from bitsmith.llm.latency import StepCost, StepModel, measure
from bitsmith.llm.prefix import PrefixCache
from bitsmith.llm.scheduler import Scheduler, run_all

PAGE = 8


@pytest.fixture(scope="module")
def llm() -> bllm.LLM:
    return bllm.compile("llama", kv="f32", max_batch=4, max_seq=160, page_size=PAGE,
                        prefill=(16,), score_chunk=0)


def _alone(llm: bllm.LLM, prompts: list[list[int]], new: int) -> list[list[int]]:
    return [llm.complete([p], max_new_tokens=new, temperature=0.0,
                         ignore_eos=True)[0].token_ids for p in prompts]


def _tokens(results: list[Completion | str]) -> list[list[int]]:
    assert all(isinstance(r, Completion) for r in results), results
    return [r.token_ids for r in results if isinstance(r, Completion)]


def _all_free(llm: bllm.LLM, scheduler: Scheduler) -> bool:
    """Every page free, or held by the prefix cache alone (reference count 1)."""
    cache = scheduler.prefix_cache
    blocks = llm.engine.blocks
    held = 0 if cache is None else sum(1 for p in cache.pages.values()
                                       if blocks.ref_count(p) == 1)
    return blocks.free_pages + held == blocks.num_pages and not scheduler.running


@pytest.mark.parametrize("budget, policy", [(1, "chunked"), (5, "chunked"), (16, "chunked"),
                                            (16, "prefill-first"), (16, "whole")])
def test_every_request_equals_alone(llm: bllm.LLM, budget: int, policy: str) -> None:
    rng = np.random.default_rng(budget)
    prompts = [[int(t) for t in rng.integers(3, 500, int(n))]
               for n in rng.integers(1, 50, 9)]
    scheduler = Scheduler(llm, token_budget=budget, policy=policy)
    params = llm.params(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert _tokens(run_all(scheduler, prompts, params)) == _alone(llm, prompts, 12)
    assert _all_free(llm, scheduler)


def test_prefix_cache_changes_no_output(llm: bllm.LLM) -> None:
    """Shared prefixes of PAGE-1, PAGE, PAGE+1, 2 PAGE and 2 PAGE+1 tokens, each followed by
    different suffixes (one empty: the prompt is the prefix), sent once to fill the cache and
    again to hit it; every output equals the request alone with no cache."""
    rng = np.random.default_rng(7)
    prompts = []
    for length in (PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, 2 * PAGE + 1):
        prefix = [int(t) for t in rng.integers(3, 500, length)]
        for extra in (0, 1, 5):
            prompts.append(prefix + [int(t) for t in rng.integers(3, 500, extra)])
    want = _alone(llm, prompts, 10)
    params = llm.params(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    scheduler = Scheduler(llm, token_budget=16, prefix_cache=True)
    cache = scheduler.prefix_cache
    assert isinstance(cache, PrefixCache)
    assert _tokens(run_all(scheduler, prompts, params)) == want  # filling (and hitting) it
    found = cache.found
    assert _tokens(run_all(scheduler, prompts, params)) == want  # every full page cached now
    assert cache.found - found >= PAGE * 9  # the second round found the prefixes' pages
    assert _all_free(llm, scheduler)
    cache.clear()
    assert llm.engine.blocks.free_pages == llm.engine.blocks.num_pages


def test_prefix_cache_evicts_under_pressure() -> None:
    """A pool of 12 pages (one sequence of 96 tokens): cached pages give way to new requests,
    least recently used first, and the outputs stay those of the requests alone."""
    llm = bllm.compile("llama", kv="f32", max_batch=2, max_seq=96, page_size=PAGE,
                       prefill=(16,), score_chunk=0,
                       kv_memory=12 * 2 * 2 * 2 * PAGE * 16 * 4)
    assert llm.engine.blocks.num_pages == 12
    rng = np.random.default_rng(8)
    prompts = [[int(t) for t in rng.integers(3, 500, 40)] for _ in range(6)]
    want = _alone(llm, prompts, 16)
    scheduler = Scheduler(llm, prefix_cache=True)
    params = llm.params(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert _tokens(run_all(scheduler, prompts, params)) == want
    assert _tokens(run_all(scheduler, prompts[::-1], params)) == want[::-1]
    assert scheduler.prefix_cache is not None and scheduler.prefix_cache.evicted > 0
    assert _all_free(llm, scheduler)


def test_cancel_frees_pages_and_others_go_on(llm: bllm.LLM) -> None:
    scheduler = Scheduler(llm)
    params = llm.params(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    events: list[tuple[int, str]] = []
    handles = [scheduler.submit([5 + i, 9, 11], params,
                                lambda e, i=i: events.append((i, e[0]))) for i in range(3)]
    for _ in range(3):
        scheduler.step()
    scheduler.cancel(handles[1])
    while scheduler.step():
        pass
    assert (1, "error") in events and (0, "done") in events and (2, "done") in events
    assert _all_free(llm, scheduler)


def test_a_request_that_can_never_fit_is_refused(llm: bllm.LLM) -> None:
    scheduler = Scheduler(llm)
    with pytest.raises(InputError, match="context"):
        scheduler.submit([3] * 160, llm.params(max_new_tokens=1), lambda e: None)
    with pytest.raises(InputError, match="max_batch"):
        Scheduler(llm, max_batch=-1)


def test_a_failing_step_ends_its_requests_not_the_scheduler(
        llm: bllm.LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine step that raises (here a RuntimeError, as a kernel might) ends the requests
    in it with an error; the scheduler frees their pages and serves the next ones."""
    scheduler = Scheduler(llm)
    params = llm.params(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    real = llm.engine.step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("kernel failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "step", flaky)
    first = run_all(scheduler, [[5, 6, 7], [8, 9]], params)
    assert all(isinstance(r, str) and "kernel failed" in r for r in first), first
    assert _all_free(llm, scheduler)
    again = run_all(scheduler, [[5, 6, 7]], params)
    assert _tokens(again) == _alone(llm, [[5, 6, 7]], 4)


def test_a_request_whose_sampling_fails_ends_alone(llm: bllm.LLM,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN logits for one sequence (its sampler raises): that request ends with an error,
    its batch-mate finishes as alone."""
    scheduler = Scheduler(llm)
    params = llm.params(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    real = llm.engine.step

    def poisoned(work, **kwargs):
        logits = real(work, **kwargs)
        for i, (seq, _) in enumerate(work):
            if seq == victim[0]:
                logits[i] = np.nan
        return logits

    victim = [-1]
    monkeypatch.setattr(llm.engine, "step", poisoned)
    results: dict[int, object] = {}
    handles = [scheduler.submit(p, params, lambda e, i=i: results.__setitem__(i, e))
               for i, p in enumerate([[5, 6, 7], [8, 9]])]
    victim[0] = handles[0].id
    while scheduler.step():
        pass
    assert results[0][0] == "error"
    assert results[1][0] == "done" and results[1][1].token_ids == _alone(llm, [[8, 9]], 6)[0]
    assert _all_free(llm, scheduler)


def test_step_model_is_measured_for_every_entry(llm: bllm.LLM) -> None:
    model = measure(llm.engine, rounds=1)
    entries = [(e.tokens, e.batch) for e in llm.engine.entries if not e.scores_all]
    assert sorted(model.costs) == sorted(entries)
    assert all(c.base > 0 and c.per_attended >= 0 for c in model.table())
    blocks = llm.engine.blocks
    assert blocks.free_pages == blocks.num_pages  # the timing sequences gave their pages back


def test_an_itl_target_sizes_steps_and_changes_no_output(llm: bllm.LLM) -> None:
    """A step model where a step costs its compiled token count in ms and a 5 ms target:
    while decodes are in flight a step runs at most 4 tokens (the prompt chunks shrink, the
    decodes stay); with none in flight the prompts take the whole budget; every greedy
    output equals the request alone."""
    costs = [StepCost(e.tokens, e.batch, e.tokens * 1e-3, 0.0)
             for e in llm.engine.entries if not e.scores_all]
    plans: list[list[tuple[bool, int]]] = []

    class Recording(Scheduler):
        def _plan(self):  # type: ignore[no-untyped-def]
            work = super()._plan()
            plans.append([(h.request.fed >= len(h.request.prompt), len(t)) for h, t in work])
            return work

    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 500, int(n))]
               for n in rng.integers(10, 50, 7)]
    scheduler = Recording(llm, itl_slo=5e-3, step_model=StepModel(llm.engine, costs))
    params = llm.params(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    assert _tokens(run_all(scheduler, prompts, params)) == _alone(llm, prompts, 10)
    mixed = [p for p in plans if any(d for d, _ in p) and not all(d for d, _ in p)]
    assert mixed and all(sum(n for _, n in p) <= 4 for p in mixed)
    assert any(sum(n for _, n in p) == 16 for p in plans if not any(d for d, _ in p))
    assert _all_free(llm, scheduler)


def test_an_itl_target_needs_the_chunked_policy(llm: bllm.LLM) -> None:
    for bad in (0, -1.0, "5"):
        with pytest.raises(InputError, match="itl_slo"):
            Scheduler(llm, itl_slo=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="chunked"):
        Scheduler(llm, itl_slo=0.05, policy="whole")
