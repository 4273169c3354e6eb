"""OpenAI-compatible LLM endpoints: `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions`, streamed (server-sent events, `data: ...` then `data: [DONE]`) or
not, over a continuous-batching `Scheduler` per LLM (one thread each: the engine's steps are
blocking kernel calls; events come back to the event loop through `call_soon_threadsafe`).

Requests are checked field by field (hostile JSON: types, ranges, unknown fields) and refused in
OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad parameter
or a prompt longer than the context, 404 for an unknown model, 503 (with Retry-After) when the
queue is full, the model warms up or the server drains. A client that disconnects cancels its
request: its KV pages are freed at the scheduler's next step. Only `n=1` is served; `echo`,
`best_of` > 1, penalties other than 0 and tools are refused with a 400 that says so.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from ..errors import BitsmithError, InputError, ServingError
from ..llm.api import LLM, Completion
from ..llm.sampling import MAX_LOGPROBS, SamplingParams
from ..llm.scheduler import Event, Handle, Scheduler, SchedulerFull
from .metrics import ServerMetrics

log = logging.getLogger("uvicorn.error")  # printed with, and like, uvicorn's own lines
MAX_STOP = 16
MAX_STOP_CHARS = 256
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "min_p", "seed", "stop", "stop_token_ids", "stream", "stream_options", "n",
           "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty", "user",
           "logit_bias"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "response_format",
                         "tools", "tool_choice"}


class OpenAIError(BitsmithError):
    """A request refused with an HTTP status, in OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def response(self) -> Response:
        headers = {"Retry-After": "1"} if self.status == 503 else {}
        doc = {"error": {"message": str(self), "type": self.kind, "param": self.param,
                         "code": None}}
        return Response(orjson.dumps(doc), self.status, headers=headers,
                        media_type="application/json")


class LlmService:
    """One served LLM: its scheduler, the thread that steps it, and readiness."""

    def __init__(self, name: str, llm: LLM, *, token_budget: int | None = None,
                 max_batch: int | None = None, max_waiting: int = 256,
                 prefix_cache: bool = False, policy: str = "chunked",
                 itl_slo: float | None = None) -> None:
        self.name = name
        self.llm = llm
        self.scheduler = Scheduler(llm, token_budget=token_budget, max_batch=max_batch,
                                   max_waiting=max_waiting, prefix_cache=prefix_cache,
                                   policy=policy, itl_slo=itl_slo)
        self.created = int(time.time())
        self.ready = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"llm-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        scheduler = self.scheduler
        if scheduler.itl_slo is not None:  # before the warm-up request is admitted
            start = time.perf_counter()
            try:
                scheduler.calibrate(lambda line: log.info("%s: %s", self.name, line))
            except Exception as exc:  # noqa: BLE001 - the model then fails its warm-up
                scheduler.stop()  # later requests: 503, never a queue nobody steps
                scheduler.fail_all(f"measuring the step latency failed: {exc}")
                log.exception("%s: measuring the step latency failed", self.name)
                return
            log.info("%s: step latency model measured in %.1f s; ITL target %.0f ms",
                     self.name, time.perf_counter() - start, scheduler.itl_slo * 1e3)
        scheduler.run()

    async def warm_up(self) -> None:
        """One token through every part of the path; then the model is ready."""
        handle, events = self.submit([self.llm.tokenizer.bos_id or 1],
                                     SamplingParams(max_new_tokens=1, ignore_eos=True))
        del handle
        while (event := await events.get())[0] == "text":
            pass
        if event[0] == "error":
            raise ServingError(f"model {self.name}: the warm-up request failed: {event[1]}")
        self.ready = True

    async def close(self) -> None:
        """Finish what is admitted and waiting, then stop the thread."""
        self.scheduler.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def submit(self, prompt: list[int], params: SamplingParams
               ) -> tuple[Handle, asyncio.Queue[Event]]:
        """Queue a request; its events arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # the scheduler's thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            return self.scheduler.submit(prompt, params, on_event), events
        except SchedulerFull as exc:
            raise OpenAIError(str(exc), 503, kind="server_error") from None
        except InputError as exc:
            raise OpenAIError(str(exc)) from None


def models_response(services: Mapping[str, LlmService]) -> Response:
    data = [{"id": name, "object": "model", "created": s.created, "owned_by": "bitsmith"}
            for name, s in services.items()]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")


async def handle(request: Request, services: Mapping[str, LlmService], *, chat: bool,
                 draining: bool, metrics: ServerMetrics,
                 read_body: Callable[[Request], Awaitable[bytes]]) -> Response:
    """One /v1/completions or /v1/chat/completions request; `read_body` reads the body within
    the server's limits (size, time, the budget of bodies being read), raising an error with
    a `status` (413, 408, 503) or `ClientDisconnect`."""
    name = ""
    try:
        try:
            raw = await read_body(request)
        except ClientDisconnect:
            metrics.llm_requests.labels("", "499").inc()
            return Response(status_code=499)
        except BitsmithError as exc:
            raise OpenAIError(str(exc), int(getattr(exc, "status", 400))) from None
        body = _body(raw)
        service = _service(body, services)
        name = service.name
        if draining or not service.ready:
            raise OpenAIError("the server is draining" if draining else
                              f"model {service.name} is warming up; retry shortly", 503,
                              kind="server_error")
        prompt = _chat_prompt(body, service.llm) if chat else _prompt(body, service.llm)
        params = _params(body, service.llm, prompt, chat)
        stream = _flag(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise OpenAIError(f"stream_options: expected an object, got {_brief(options)}",
                              param="stream_options")
        usage_in_stream = stream and _flag(options, "include_usage")
        handle_, events = service.submit(prompt, params)
    except OpenAIError as exc:
        metrics.llm_requests.labels(name, str(exc.status)).inc()
        return exc.response()
    tag = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    meta = {"id": tag, "created": int(time.time()), "model": service.name}
    answered = metrics.llm_requests.labels(name, "200")
    if stream:
        left = metrics.llm_requests.labels(name, "499")
        return StreamingResponse(_stream(service, handle_, events, meta, chat, usage_in_stream,
                                         (answered, left)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        out = await _wait(service, handle_, events, request)
    except OpenAIError as exc:
        metrics.llm_requests.labels(name, str(exc.status)).inc()
        return exc.response()
    if out is None:
        metrics.llm_requests.labels(name, "499").inc()
        return Response(status_code=499)  # the client left; nobody reads this
    answered.inc()
    return Response(orjson.dumps(_final(out, meta, chat, service.llm)),
                    media_type="application/json")


async def _wait(service: LlmService, handle: Handle, events: asyncio.Queue[Event],
                request: Request) -> Completion | None:
    """The request's completion; None (and the request cancelled) if the client left."""
    disconnected = asyncio.ensure_future(_disconnect(request))
    ended = False
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, disconnected},
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return None
            kind, value = getter.result()
            if kind == "done":
                ended = True
                return value
            if kind == "error":
                ended = True
                raise OpenAIError(f"generation failed: {value}", 500, kind="server_error")
    finally:
        disconnected.cancel()
        if not ended:  # the client left, or this task was cancelled (shutdown)
            service.scheduler.cancel(handle)


async def _disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _stream(service: LlmService, handle: Handle, events: asyncio.Queue[Event],
                  meta: dict[str, Any], chat: bool, usage: bool,
                  counters: tuple[Any, Any]) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per text delta, the finish reason, usage if asked, [DONE].
    A client that goes away (the generator closed) cancels the request."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    finished = False
    try:
        if chat:
            yield _event({**meta, "object": kind, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None}]})
        while True:
            event, value = await events.get()
            if event == "text":
                choice: dict[str, Any] = ({"index": 0, "delta": {"content": value}}
                                          if chat else {"index": 0, "text": value})
                yield _event({**meta, "object": kind, "choices": [
                    {**choice, "logprobs": None, "finish_reason": None}]})
                continue
            finished = True
            if event == "error":
                yield _event({"error": {"message": f"generation failed: {value}",
                                        "type": "server_error", "param": None, "code": None}})
                break
            out: Completion = value
            last: dict[str, Any] = ({"index": 0, "delta": {}} if chat
                                    else {"index": 0, "text": ""})
            yield _event({**meta, "object": kind, "choices": [
                {**last, "logprobs": None, "finish_reason": out.finish_reason}]})
            if usage:
                yield _event({**meta, "object": kind, "choices": [], "usage": _usage(out)})
            break
        yield b"data: [DONE]\n\n"
    finally:
        counters[0 if finished else 1].inc()
        if not finished:
            service.scheduler.cancel(handle)


def _event(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def _usage(out: Completion) -> dict[str, Any]:
    done = len(out.token_ids)
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": done,
            "total_tokens": out.prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


def _final(out: Completion, meta: dict[str, Any], chat: bool, llm: LLM) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                          "content": out.text},
                                  "logprobs": _chat_logprobs(out, llm),
                                  "finish_reason": out.finish_reason}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(out)}
    choice = {"index": 0, "text": out.text, "logprobs": _completion_logprobs(out, llm),
              "finish_reason": out.finish_reason}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": _usage(out)}


def _piece(llm: LLM, token: int) -> str:
    return llm.tokenizer.decode([token])


def _completion_logprobs(out: Completion, llm: LLM) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    tokens = [_piece(llm, t) for t in out.token_ids]
    top = [{_piece(llm, t): lp for t, lp in alts} for alts in (out.top_logprobs or [])]
    return {"tokens": tokens, "token_logprobs": out.logprobs, "top_logprobs": top or None,
            "text_offset": None}


def _chat_logprobs(out: Completion, llm: LLM) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    alts = out.top_logprobs or [[] for _ in out.token_ids]
    content = [{"token": _piece(llm, t), "logprob": lp, "bytes": None,
                "top_logprobs": [{"token": _piece(llm, a), "logprob": alp, "bytes": None}
                                 for a, alp in top]}
               for t, lp, top in zip(out.token_ids, out.logprobs, alts, strict=False)]
    return {"content": content}


# ---- request checking ---------------------------------------------------------------------
def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OpenAIError(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _service(body: dict[str, Any], services: Mapping[str, LlmService]) -> LlmService:
    name = body.get("model")
    if not isinstance(name, str):
        raise OpenAIError("model: expected the name of a served model (a string), got "
                          f"{_brief(name)}", param="model")
    service = services.get(name)
    if service is None:
        served = ", ".join(sorted(services)) or "none"
        raise OpenAIError(f"the model '{name[:64]}' does not exist here; served: {served}",
                          404, param="model", kind="not_found_error")
    return service


def _prompt(body: dict[str, Any], llm: LLM) -> list[int]:
    _known(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = llm.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                          for t in prompt):
        ids = list(prompt)
        vocab = min(llm.vocab_size, llm.tokenizer.vocab_size)  # ids both the model and the
        bad = [t for t in ids if not 0 <= t < vocab]           # tokenizer know
        if bad:
            raise OpenAIError(f"prompt: token id {bad[0]} is out of range [0, {vocab})",
                              param="prompt")
    else:
        raise OpenAIError("prompt: expected a string or a list of token ids (one prompt a "
                          f"request), got {_brief(prompt)}", param="prompt")
    for name, allowed in (("echo", (None, False)), ("best_of", (None, 1)),
                          ("suffix", (None, ""))):
        if body.get(name) not in allowed:
            raise OpenAIError(f"{name}={_brief(body.get(name))} is not supported",
                              param=name)
    return ids


def _chat_prompt(body: dict[str, Any], llm: LLM) -> list[int]:
    _known(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(f"messages: expected a non-empty list, got {_brief(messages)}",
                          param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise OpenAIError(f"messages[{i}]: expected {{\"role\": str, \"content\": str}}, "
                              f"got {_brief(m)}", param="messages")
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise OpenAIError("tools are not supported", param="tools")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise OpenAIError("response_format: only {\"type\": \"text\"} is supported",
                          param="response_format")
    try:
        return llm.chat_prompt([{"role": m["role"], "content": m["content"]}
                                for m in messages])
    except BitsmithError as exc:
        raise OpenAIError(f"messages: {exc}", param="messages") from None


def _params(body: dict[str, Any], llm: LLM, prompt: list[int], chat: bool) -> SamplingParams:
    context = llm.engine.max_seq
    if len(prompt) >= context:
        raise OpenAIError(f"the prompt has {len(prompt)} tokens; this model's context is "
                          f"{context} tokens, prompt and reply together", param="messages"
                          if chat else "prompt", kind="invalid_request_error")
    if body.get("n", 1) != 1:
        raise OpenAIError(f"n={_brief(body.get('n'))}: only n=1 is served", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise OpenAIError(f"{name} is not supported (use repetition_penalty)", param=name)
    if body.get("logit_bias"):
        raise OpenAIError("logit_bias is not supported", param="logit_bias")
    most = context - len(prompt)
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is None:
        limit = most if chat else min(16, most)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise OpenAIError(f"max_tokens: expected an int >= 1, got {_brief(limit)}",
                          param="max_tokens")
    if len(prompt) + limit > context:
        raise OpenAIError(f"the prompt ({len(prompt)} tokens) and max_tokens ({limit}) are "
                          f"over this model's context of {context} tokens; lower max_tokens "
                          f"to at most {most}", param="max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise OpenAIError(f"stop: expected a string or a list of at most {MAX_STOP}, each of "
                          f"1 to {MAX_STOP_CHARS} characters, got {_brief(stop)}", param="stop")
    fields: dict[str, Any] = {
        "max_new_tokens": limit,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.0, 10.0),
        "stop": stops,
        "stop_token_ids": body.get("stop_token_ids") or (),
        "ignore_eos": _flag(body, "ignore_eos"),
    }
    top_k = body.get("top_k", 0)
    fields["top_k"] = 0 if top_k == -1 else top_k  # vLLM's -1: off
    if body.get("seed") is not None:
        fields["seed"] = body["seed"]
    fields["logprobs"] = _logprobs(body, chat)
    try:
        return SamplingParams(**fields)
    except InputError as exc:
        raise OpenAIError(str(exc)) from None


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    value = body.get("logprobs")
    if chat:
        if value in (None, False):
            return None
        if value is not True:
            raise OpenAIError(f"logprobs: expected a bool, got {_brief(value)}",
                              param="logprobs")
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS:
            raise OpenAIError(f"top_logprobs: expected an int in [0, {MAX_LOGPROBS}], got "
                              f"{_brief(top)}", param="top_logprobs")
        return top
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS:
        raise OpenAIError(f"logprobs: expected an int in [0, {MAX_LOGPROBS}], got "
                          f"{_brief(value)}", param="logprobs")
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            low <= value <= high):
        raise OpenAIError(f"{name}: expected a number in [{low:g}, {high:g}], got "
                          f"{_brief(value)}", param=name)
    return float(value)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OpenAIError(f"{name}: expected a bool, got {_brief(value)}", param=name)
    return value


def _known(body: dict[str, Any], fields: set[str]) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise OpenAIError(f"unrecognized request argument(s): {', '.join(unknown[:5])}",
                          param=unknown[0][:64])


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
