"""`LLM`: text in, text out, over an `Engine` of compiled steps (runtime side).

Generation here runs one group of requests to completion (prompts past `max_batch` wait for
the next group); the serving layer schedules continuously on the same `Engine.step`.
"""
from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .engine import Engine
from .sampling import Sampler, SamplingParams
from .text import ChatTemplate, Detokenizer, StopMatcher, Tokenizer


@dataclass
class Completion:
    """One request's result: the text, its token ids, why it ended, per-token logprobs."""

    prompt_tokens: int
    text: str = ""
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Request:
    """A sequence being generated: its ids, sampler, text state."""

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams,
                 llm: LLM) -> None:
        self.id = seq_id
        self.prompt = prompt
        self.params = params
        self.sampler = Sampler(params, llm.vocab_size)
        self.detok = Detokenizer(llm.tokenizer, prompt_ids=prompt)
        self.stops = StopMatcher(params.stop)
        self.out = Completion(len(prompt), logprobs=[] if params.logprobs is not None else None,
                              top_logprobs=[] if params.logprobs else None)
        self.fed = 0  # prompt tokens already in the cache
        self.eos = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else llm.tokenizer.eos_ids)

    @property
    def history(self) -> list[int]:
        return self.prompt + self.out.token_ids

    def accept(self, logits: np.ndarray, max_seq: int) -> str:
        """Sample the next token from `logits`; returns the text it adds (possibly "")."""
        # the history (prompt + output, a new list) only where the penalty reads it
        penalised = self.params.repetition_penalty != 1.0
        sample = self.sampler.sample(logits, self.history if penalised else ())
        out = self.out
        out.token_ids.append(sample.token)
        if out.logprobs is not None and sample.logprob is not None:
            out.logprobs.append(sample.logprob)
        if out.top_logprobs is not None and sample.top is not None:
            out.top_logprobs.append(sample.top)
        if sample.token in self.eos:
            out.finish_reason = "stop"
            return self._finish()
        text, stopped = self.stops.push(self.detok.push(sample.token))
        out.text += text
        if stopped:
            out.finish_reason = "stop"
            return text
        if len(out.token_ids) >= self.params.max_new_tokens or \
                len(self.prompt) + len(out.token_ids) >= max_seq:
            out.finish_reason = "length"
            return text + self._finish()
        return text

    def _finish(self) -> str:
        text, stopped = self.stops.push(self.detok.flush())
        tail = text if stopped else text + self.stops.flush()
        self.out.text += tail
        return tail


class LLM:
    """A compiled decoder with its tokenizer: `generate`, `stream`, `chat`, `perplexity`."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *,
                 chat_template: str | None = None, defaults: Mapping[str, Any] | None = None,
                 name: str = "llm", prefill_chunk: int | None = None,
                 info: Mapping[str, Any] | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = ChatTemplate(chat_template) if chat_template else None
        self.template_source = chat_template
        self.defaults = dict(defaults or {})
        self.name = name
        self.prefill_chunk = prefill_chunk or engine.max_tokens()
        self.info = dict(info or {})
        self._ids = itertools.count()

    def save(self, path: str | os.PathLike[str], *, key: bytes | str | None = None) -> None:
        """Write the LLM as one `.bsm` file (`bitsmith.llm.load` reads it back with the runtime
        alone); with `key`, signed."""
        from .artifact import save  # noqa: PLC0415 - artifact imports this module

        save(self, path, key=key)

    @property
    def vocab_size(self) -> int:
        """Rows of the logits."""
        return int(self.info.get("vocab", self.tokenizer.vocab_size))

    def params(self, **overrides: Any) -> SamplingParams:
        """Sampling parameters: the artifact's defaults, then `overrides`."""
        return SamplingParams(**{**self.defaults, **overrides})

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 **params: Any) -> list[str]:
        """Continue each prompt; returns the generated texts (`complete` gives ids, finish
        reasons and logprobs). `params` are `SamplingParams` fields."""
        return [c.text for c in self.complete(prompts, **params)]

    def complete(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 **params: Any) -> list[Completion]:
        """Like `generate`, with everything about each result; prompts may be token ids."""
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        if items and all(isinstance(p, int) for p in items):
            raise InputError("prompts: expected a list of prompts (texts, or lists of token "
                             f"ids), got a flat list of {len(items)} ints; wrap it: "
                             "[[1, 2, 3]]")
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
                   for p in items]
        sampling = self.params(**params)
        done: list[Completion] = []
        for first in range(0, len(encoded), self.engine.max_batch):
            group = encoded[first:first + self.engine.max_batch]
            done.extend(self._run(group, sampling))
        return done

    def stream(self, prompt: str | Sequence[int], **params: Any) -> Iterator[str]:
        """Text deltas of one prompt's continuation, as they are generated."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        yield from self._generate([ids], self.params(**params), stream=True)

    def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> str:
        """The assistant's reply to a conversation, through the model's chat template."""
        return self.generate([self.chat_prompt(messages)], **params)[0]

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """A conversation rendered by the chat template and tokenized (no BOS added: the
        template writes its own special tokens)."""
        if self.template is None:
            raise InputError(f"{self.name} has no chat template; use generate() with a plain "
                             "prompt")
        text = self.template.render([dict(m) for m in messages], add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special=False)

    def perplexity(self, text: str | Sequence[int], window: int = 512) -> float:
        """exp(mean negative log-likelihood) of `text`'s tokens, scored in independent windows
        of `window` tokens (each window's first token is context only)."""
        ids = self.tokenizer.encode(text) if isinstance(text, str) else list(text)
        if len(ids) < 2:
            raise InputError(f"perplexity needs at least 2 tokens, got {len(ids)}")
        if not 2 <= window <= self.engine.max_seq:
            raise InputError(f"window must be 2..max_seq={self.engine.max_seq}, got {window}")
        nll, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window]
            if len(chunk) < 2:
                break
            logits = self._score(chunk)
            logp = _log_softmax(logits[:-1])
            nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
            count += len(chunk) - 1
        return math.exp(nll / count)

    def _score(self, ids: Sequence[int]) -> np.ndarray:
        """Logits after every token of `ids` (one fresh sequence)."""
        seq = next(self._ids)
        blocks = self.engine.blocks
        blocks.add(seq)
        rows = []
        try:
            step = max((e.tokens for e in self.engine.entries if e.scores_all), default=0)
            if not step:
                raise InputError(f"{self.name} was compiled without a scoring step "
                                 "(score_chunk=0): it cannot compute perplexity")
            for at in range(0, len(ids), step):
                rows.append(self.engine.step([(seq, ids[at:at + step])], scores_all=True))
        finally:
            blocks.free(seq)
        return np.concatenate(rows)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        requests: list[Request] = []
        for _ in self._generate(prompts, params, stream=False, collect=requests.append):
            pass
        return [r.out for r in requests]

    def _generate(self, prompts: list[list[int]], params: SamplingParams, *, stream: bool,
                  collect: Callable[[Request], None] | None = None) -> Iterator[str]:
        for p in prompts:
            if not p:
                raise InputError("a prompt is empty: give at least one token")
            if len(p) >= self.engine.max_seq:
                raise InputError(f"a prompt of {len(p)} tokens leaves no room under "
                                 f"max_seq={self.engine.max_seq}")
        requests = [Request(next(self._ids), p, params, self) for p in prompts]
        for r in requests:
            if collect is not None:
                collect(r)
            self.engine.blocks.add(r.id)
        try:
            yield from self._prefill(requests, stream)
            live = [r for r in requests if r.out.finish_reason is None]
            while live:
                logits = self.engine.step([(r.id, r.out.token_ids[-1:]) for r in live])
                for r, row in zip(live, logits, strict=True):
                    text = r.accept(row, self.engine.max_seq)
                    if stream and text:
                        yield text
                live = [r for r in live if r.out.finish_reason is None]
        finally:
            for r in requests:
                self.engine.blocks.free(r.id)

    def _prefill(self, requests: list[Request], stream: bool) -> Iterator[str]:
        """Feed every prompt, packing chunks of several prompts into one step; each prompt's
        last chunk gives its first generated token."""
        while any(r.fed < len(r.prompt) for r in requests):
            budget = self.prefill_chunk
            work: list[tuple[Request, list[int]]] = []
            for r in requests:
                if r.fed < len(r.prompt) and budget > 0:
                    take = r.prompt[r.fed:r.fed + budget]
                    work.append((r, take))
                    budget -= len(take)
            logits = self.engine.step([(r.id, take) for r, take in work])
            for (r, take), row in zip(work, logits, strict=True):
                r.fed += len(take)
                if r.fed == len(r.prompt):
                    text = r.accept(row, self.engine.max_seq)
                    if stream and text:
                        yield text


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
