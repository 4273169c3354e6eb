"""The OpenAI-compatible endpoints on the zoo decoder, through the official `openai` client:
greedy requests under concurrency return exactly what they return alone, streaming equals
non-streaming, stop strings never leak, a disconnect frees its pages, errors in OpenAI's shape
(400, 404, 503), and every KV page comes back when the load ends."""
from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import orjson
import pytest

import bitsmith.llm as bllm
from bitsmith.serving.openai_api import LlmService
from bitsmith.serving.server import ServeOptions

from .live import LiveServer, metric, wait_for

MAX_SEQ = 160


@pytest.fixture(scope="module")
def llm() -> bllm.LLM:
    return bllm.compile("llama", kv="f32", max_batch=4, max_seq=MAX_SEQ, page_size=8,
                        prefill=(16,), score_chunk=0)


@pytest.fixture(scope="module")
def server(llm: bllm.LLM):
    with LiveServer([], llms=[LlmService("zoo", llm, max_waiting=64)]) as live:
        yield live


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 500, int(n))]
            for n in rng.integers(1, 60, count)]


def _alone(llm: bllm.LLM, prompt: list[int], new: int) -> str:
    """The text a greedy request returns alone (detokenized after the prompt's own tokens)."""
    return llm.complete([prompt], max_new_tokens=new, temperature=0.0, ignore_eos=True)[0].text


def _free(llm: bllm.LLM) -> bool:
    blocks = llm.engine.blocks
    return blocks.free_pages == blocks.num_pages


def test_models_and_a_greedy_completion(server: LiveServer, llm: bllm.LLM) -> None:
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["zoo"]
    prompt = _prompts(1, seed=1)[0]
    got = client.completions.create(model="zoo", prompt=prompt, max_tokens=12,
                                    temperature=0, extra_body={"ignore_eos": True})
    want = llm.complete([prompt], max_new_tokens=12, temperature=0.0, ignore_eos=True)[0]
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert got.usage is not None and got.usage.completion_tokens == 12
    assert got.usage.prompt_tokens == len(prompt)


def test_concurrent_streams_equal_alone_and_pages_return(server: LiveServer,
                                                         llm: bllm.LLM) -> None:
    """32 streaming clients at once, mixed prompt and output lengths: each gets exactly its
    text alone, none lost or doubled, and every page comes back."""
    prompts = _prompts(32, seed=2)
    news = [int(n) for n in np.random.default_rng(3).integers(1, 40, len(prompts))]
    want = [_alone(llm, p, n) for p, n in zip(prompts, news, strict=True)]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    async def one(prompt: list[int], new: int) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model="zoo", prompt=prompt, max_tokens=new, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_of() -> list[tuple[str, str | None]]:
        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, news, strict=True)))

    before = metric(server, "bitsmith_llm_generated_tokens_total", model="zoo")
    got = asyncio.run(all_of())
    assert [t for t, _ in got] == want
    assert all(reason == "length" for _, reason in got)
    wait_for(lambda: _free(llm), "every KV page back in the pool")
    assert metric(server, "bitsmith_llm_generated_tokens_total", model="zoo") - before == \
        sum(news)
    assert metric(server, "bitsmith_llm_kv_pages_used", model="zoo") == 0
    assert metric(server, "bitsmith_llm_time_to_first_token_seconds_count", model="zoo") >= 32
    assert metric(server, "bitsmith_llm_running", model="zoo") == 0


def test_chat_streaming_equals_non_streaming_with_usage(server: LiveServer) -> None:
    client = _client(server)
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="zoo", messages=messages,  # type: ignore[arg-type]
                                           max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model="zoo", messages=messages, max_tokens=10, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_never_leak(server: LiveServer, llm: bllm.LLM) -> None:
    prompt = _prompts(1, seed=4)[0]
    full = _alone(llm, prompt, 30)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    client = _client(server)
    whole = client.completions.create(model="zoo", prompt=prompt, max_tokens=30, temperature=0,
                                      stop=[stop], extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="zoo", prompt=prompt, max_tokens=30, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert whole.choices[0].text == full[:full.index(stop)] == streamed
    assert whole.choices[0].finish_reason == "stop"


def test_errors_in_openai_shape(server: LiveServer) -> None:
    client = _client(server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="zoo", prompt=[5] * MAX_SEQ)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="zoo", prompt=[5] * 100, max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model="zoo", prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="zoo", prompt="hi", temperature=7)
    with pytest.raises(openai.BadRequestError, match="unrecognized"):
        client.completions.create(model="zoo", prompt="hi", extra_body={"bogus": 1})
    with pytest.raises(openai.BadRequestError, match="out of range"):
        client.completions.create(model="zoo", prompt=[10**9])
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.completions.create(model="zoo", prompt="hi", stream=True,
                                  stream_options="x")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model="zoo", prompt="hi", stop=["x" * 300])
    for body in (b"[1, 2", b"[1, 2]", b'{"model": 5}', b'{"model": "zoo", "prompt": {}}',
                 b'{"model": "zoo", "prompt": "hi", "max_tokens": "9"}',
                 b'{"model": "zoo", "prompt": "hi", "logprobs": true}',
                 b'{"model": "zoo", "messages": [{"role": 1}]}'):
        answer = httpx.post(server.url + "/v1/completions", content=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request_error"
    too_big = httpx.post(server.url + "/v1/completions", content=b" " * (65 * 2**20))
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]
    # max_completion_tokens: null leaves max_tokens in charge
    got = client.completions.create(model="zoo", prompt=[5, 6], max_tokens=3, temperature=0,
                                    extra_body={"max_completion_tokens": None,
                                                "ignore_eos": True})
    assert got.usage is not None and got.usage.completion_tokens == 3


def test_disconnect_mid_stream_frees_pages(server: LiveServer, llm: bllm.LLM,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = llm.engine.step

    def slow(*args, **kwargs):  # 120 steps take 2.4 s at least: the client leaves long before
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "step", slow)
    body = {"model": "zoo", "prompt": _prompts(1, seed=5)[0], "max_tokens": 120,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "text" in first
        assert not _free(llm)  # generating: its pages are taken
    wait_for(lambda: metric(server, "bitsmith_llm_kv_pages_used", model="zoo") == 0 and
             metric(server, "bitsmith_llm_running", model="zoo") == 0,
             "the disconnected request's pages freed (as the metrics say)")
    assert _free(llm)
    assert metric(server, "bitsmith_llm_requests_total", model="zoo", code="499") >= 1


def test_full_server_answers_503_never_hangs(llm: bllm.LLM) -> None:
    service = LlmService("tiny", llm, max_waiting=1)
    with LiveServer([], llms=[service]) as live:
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)

        async def one() -> int:
            try:
                await client.completions.create(model="tiny", prompt=[7, 8, 9], max_tokens=60,
                                                temperature=0, extra_body={"ignore_eos": True})
                return 200
            except openai.APIStatusError as exc:
                assert exc.response.headers["Retry-After"] == "1"
                return exc.status_code

        async def many() -> list[int]:
            return await asyncio.gather(*(one() for _ in range(24)))

        codes = asyncio.run(many())
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    assert _free(llm)


def test_prefix_cache_on_and_off_answer_alike(llm: bllm.LLM) -> None:
    """Chats sharing a long system prompt, through a server with --prefix-cache: the same
    greedy answers as without it, and the metrics show the prefix found."""
    system = {"role": "system", "content": "Be terse. " * 4}
    chats = [[system, {"role": "user", "content": f"Question {i}?"}] for i in range(6)]
    want = [llm.complete([llm.chat_prompt(c)], max_new_tokens=8, temperature=0.0,
                         ignore_eos=True)[0].text for c in chats]
    service = LlmService("cached", llm, prefix_cache=True)
    try:
        with LiveServer([], llms=[service]) as live:
            client = _client(live)
            answers = [client.chat.completions.create(
                model="cached", messages=c, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                extra_body={"ignore_eos": True}) for c in chats]
            assert [a.choices[0].message.content for a in answers] == want
            cached = [a.usage.prompt_tokens_details.cached_tokens for a in answers]  # type: ignore[union-attr]
            page = llm.engine.blocks.page_size  # the first chat found nothing; later ones
            assert cached[0] == 0 and all(c > 0 and c % page == 0 for c in cached[1:])  # pages
            assert all(c < a.usage.prompt_tokens for c, a in zip(cached, answers, strict=True))  # type: ignore[union-attr]
            assert metric(live, "bitsmith_llm_prefix_cache_hit_rate", model="cached") > 0.5
            assert metric(live, "bitsmith_llm_kv_pages_used", model="cached") == 0
    finally:
        assert service.scheduler.prefix_cache is not None
        service.scheduler.prefix_cache.clear()
    assert _free(llm)


def test_loadtest_openai_cli(server: LiveServer, llm: bllm.LLM, capsys) -> None:
    import json

    from bitsmith.cli import main
    assert main(["loadtest", server.url, "--openai", "--model", "zoo", "--concurrency", "3",
                 "--duration", "1s", "--prompt-len", "2:4", "--gen-len", "2:5",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["ok"] >= 1 and not doc["errors"] and doc["output_tokens_per_s"] > 0
    assert doc["ttft_p50_ms"] is not None
    wait_for(lambda: _free(llm), "every KV page back in the pool")


def test_an_itl_target_measures_its_steps_and_answers_alike(llm: bllm.LLM) -> None:
    """A service with an ITL target measures the step latency model before it is ready,
    then answers concurrent greedy streams exactly as alone."""
    prompts = _prompts(6, seed=11)
    want = [_alone(llm, p, 9) for p in prompts]
    service = LlmService("slo", llm, itl_slo=0.05)
    with LiveServer([], llms=[service]) as live:
        assert service.scheduler.step_model is not None
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)

        async def one(prompt: list[int]) -> str:
            got = await client.completions.create(model="slo", prompt=prompt, max_tokens=9,
                                                  temperature=0,
                                                  extra_body={"ignore_eos": True})
            return got.choices[0].text

        async def many() -> list[str]:
            return await asyncio.gather(*(one(p) for p in prompts))

        assert asyncio.run(many()) == want
    assert _free(llm)


def test_sigterm_drains_llm_streams(llm: bllm.LLM) -> None:
    """SIGTERM with streams in flight (running and queued): each stream already accepted ends
    with [DONE], its text whole (as alone) or an error event, never cut silently; a request
    after the signal is a 503; every page comes back and the server exits."""
    prompts = _prompts(6, seed=21)
    new = 100
    want = [_alone(llm, p, new) for p in prompts]
    service = LlmService("drain", llm)
    submitted: list[int] = []
    submit = service.scheduler.submit

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        handle = submit(*args, **kwargs)
        submitted.append(handle.id)
        return handle

    with LiveServer([], ServeOptions(drain_grace_ms=1000), llms=[service]) as live:
        service.scheduler.submit = counted  # type: ignore[method-assign]  # after warm-up
        def stream(prompt: list[int]) -> tuple[str, bool, bool]:
            text, done, error = "", False, False
            body = {"model": "drain", "prompt": prompt, "max_tokens": new, "temperature": 0,
                    "stream": True, "ignore_eos": True}
            with httpx.stream("POST", live.url + "/v1/completions", json=body,
                              timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        doc = orjson.loads(line[6:])
                        error = error or "error" in doc
                        text += "".join(c["text"] for c in doc.get("choices", []))
            return text, done, error

        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(stream, p) for p in prompts]
            wait_for(lambda: len(submitted) == len(prompts), "every request accepted")
            scheduler = service.scheduler
            in_flight = len(scheduler.running) + len(scheduler.waiting)
            live.server.handle_exit(signal.SIGTERM, None)
            late = httpx.post(live.url + "/v1/completions", timeout=30,
                              json={"model": "drain", "prompt": [5], "max_tokens": 2})
            results = [f.result() for f in futures]
        live.thread.join(60)
        assert not live.thread.is_alive(), "the server did not exit"
    assert in_flight >= 1  # the last one accepted at least: it needs `new` steps
    assert late.status_code == 503 and "drain" in late.json()["error"]["message"]
    for (text, done, error), full in zip(results, want, strict=True):
        assert done, "a stream was cut without [DONE]"
        assert error or text == full
    assert _free(llm)


def test_a_failed_latency_measurement_leaves_the_model_unready(llm: bllm.LLM) -> None:
    """The step latency model cannot be measured: the model never reports ready and its
    requests are 503s, never a queue that nobody steps."""
    service = LlmService("broken", llm, itl_slo=0.05)

    def fail(progress=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("no timer")

    service.scheduler.calibrate = fail  # type: ignore[method-assign]
    with LiveServer([], llms=[service], wait_ready=False) as live:
        wait_for(lambda: not service._thread or not service._thread.is_alive(),
                 "the scheduler thread ended")
        got = httpx.post(live.url + "/v1/completions", timeout=30,
                         json={"model": "broken", "prompt": [5], "max_tokens": 2})
        assert got.status_code == 503 and not service.ready
        assert httpx.get(live.url + "/health", timeout=30).status_code != 200
    assert _free(llm)
