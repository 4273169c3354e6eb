"""Next-token sampling on the host: one `Sampler` per request turns a row of logits into a token.

The order of processing is the one of Hugging Face's `generate` and vLLM:

1. repetition penalty over the distinct tokens of the history (prompt and output so far):
   a positive logit is divided by the penalty, a negative one multiplied by it (HF's rule);
2. greedy (`temperature == 0`): the argmax, ties going to the lowest token id;
3. otherwise the logits are divided by the temperature, then filtered by top-k (every token
   whose logit ties the k-th largest is kept, as in HF), top-p (the smallest set of the most
   likely tokens whose probability sums to at least `top_p`, at least one token) and min-p
   (tokens below `min_p` times the largest probability are dropped), and the token is drawn
   from the renormalised distribution with the request's own random generator.

Logprobs are the log-softmax of the logits after the repetition penalty and the temperature
(temperature 1 when greedy) and before top-k, top-p and min-p: they describe the model's
distribution, not the truncated one the token was drawn from.

Logits are processed in float64. A NaN logit is refused (`SamplingError`); `+inf` logits win:
greedy picks the first of them, sampling draws uniformly among them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bitsmith.errors import BitsmithError, InputError

MAX_LOGPROBS = 20


class SamplingError(BitsmithError):
    """Logits or history that cannot be sampled from (NaN logits, a wrong shape, bad ids)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops; every field is checked on creation.

    `stop` (strings) and `stop_token_ids` accept any sequence (a list from JSON) and are stored
    as tuples; a single string is one stop string. `logprobs=n` returns the chosen token's
    logprob and the n most likely alternatives; `None` returns none."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, low=1)
        _check_float("temperature", self.temperature, ">= 0", lambda v: v >= 0.0)
        _check_int("top_k", self.top_k, low=0, hint="0 turns top-k off")
        _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_float("min_p", self.min_p, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, "> 0 (1 turns it off)",
                     lambda v: v > 0.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, hint="or None for a fresh random seed")
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"sampling parameter ignore_eos: expected a bool, "
                             f"got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS,
                       hint="or None to return no logprobs")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_ids(self.stop_token_ids))


def _check_int(name: str, value: object, low: int, high: int | None = None,
               hint: str = "") -> None:
    """Raise InputError unless `value` is an int (not a bool) in [low, high]."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= low and (
            high is None or value <= high):
        return
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    extra = f" ({hint})" if hint else ""
    raise InputError(f"sampling parameter {name}: expected an int {bound}{extra}, got {value!r}")


def _check_float(name: str, value: object, bound: str, accept: Callable[[float], bool]) -> None:
    """Raise InputError unless `value` is a finite real number that `accept` takes."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
            value) and accept(float(value)):
        return
    raise InputError(f"sampling parameter {name}: expected a number {bound}, got {value!r}")


def _stop_strings(stop: object) -> tuple[str, ...]:
    """The stop strings as a tuple of non-empty strings."""
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, Sequence) or not all(isinstance(s, str) and s for s in items):
        raise InputError(f"sampling parameter stop: expected a list of non-empty strings, "
                         f"got {stop!r}")
    return tuple(items)


def _stop_ids(ids: object) -> tuple[int, ...]:
    """The stop token ids as a tuple of non-negative ints."""
    if isinstance(ids, Sequence) and not isinstance(ids, str) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return tuple(ids)
    raise InputError(f"sampling parameter stop_token_ids: expected a list of token ids "
                     f"(ints >= 0), got {ids!r}")


@dataclass(frozen=True, slots=True)
class Sample:
    """One chosen token; `logprob` and `top` (the most likely tokens, best first) when asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Sampler:
    """Picks the tokens of one request; holds the request's random generator."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise InputError(f"Sampler: expected vocab_size an int >= 1, got {vocab_size!r}")
        self.params = params
        self.vocab_size = vocab_size
        self._rng = np.random.Generator(np.random.PCG64(params.seed))

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> Sample:
        """Choose the next token from one row of logits, given the tokens so far."""
        x = self._checked(logits)
        if self.params.repetition_penalty != 1.0 and len(history) > 0:
            self._penalise(x, history)
        t = self.params.temperature
        if t == 0.0:
            token = int(np.argmax(x))
        else:
            with np.errstate(over="ignore"):  # a tiny temperature may overflow to +-inf: fine
                x /= t
            token = self._draw(x)
        if self.params.logprobs is None:
            return Sample(token)
        logprobs = log_softmax(x)
        return Sample(token, float(logprobs[token]), _top(logprobs, self.params.logprobs))

    def _checked(self, logits: np.ndarray) -> np.ndarray:
        """The logits as a fresh float64 vector, refused if misshapen or NaN."""
        if not isinstance(logits, np.ndarray) or logits.shape != (self.vocab_size,):
            got = logits.shape if isinstance(logits, np.ndarray) else type(logits).__name__
            raise SamplingError(f"logits: expected an array of shape ({self.vocab_size},), "
                                f"got {got}; pass one row of the model's output")
        x = logits.astype(np.float64)
        nan = np.isnan(x)
        if nan.any():
            raise SamplingError(
                f"logits: expected no NaN, got {int(nan.sum())} NaN value(s), first at token "
                f"id {int(np.argmax(nan))}; the model's output is broken (an overflow in "
                f"half precision, or bad weights)")
        if np.isneginf(x).all():
            raise SamplingError("logits: expected at least one logit above -inf, got all "
                                "-inf; nothing can be sampled")
        return x

    def _penalise(self, x: np.ndarray, history: Sequence[int]) -> None:
        """Apply HF's repetition penalty in place to every token seen in `history`."""
        seen = np.unique(np.asarray(history, dtype=np.int64))
        if seen[0] < 0 or seen[-1] >= self.vocab_size:
            bad = int(seen[0]) if seen[0] < 0 else int(seen[-1])
            raise SamplingError(f"history: expected token ids in [0, {self.vocab_size}), "
                                f"got {bad}")
        p = self.params.repetition_penalty
        values = x[seen]
        x[seen] = np.where(values > 0, values / p, values * p)

    def _draw(self, x: np.ndarray) -> int:
        """Filter by top-k, top-p and min-p, then draw one token id."""
        inf = np.flatnonzero(np.isposinf(x))
        if inf.size:
            return int(inf[self._rng.integers(inf.size)])
        ids = _top_k(x, self.params.top_k)  # None: every token
        probs = _softmax(x if ids is None else x[ids])
        keep = _top_p(probs, self.params.top_p) if self.params.top_p < 1.0 else None
        if self.params.min_p > 0.0:
            kept = probs if keep is None else probs[keep]
            mask = kept >= self.params.min_p * kept.max()
            keep = np.flatnonzero(mask) if keep is None else keep[mask]
        if keep is not None:
            probs = probs[keep]
        cumulative = np.cumsum(probs)
        u = self._rng.random() * cumulative[-1]
        chosen = min(int(np.searchsorted(cumulative, u, side="right")), probs.size - 1)
        if keep is not None:
            chosen = int(keep[chosen])
        return chosen if ids is None else int(ids[chosen])


def _top_k(x: np.ndarray, k: int) -> np.ndarray | None:
    """Ids (ascending) of the tokens whose logit is at least the k-th largest; None if all."""
    if k == 0 or k >= x.size:
        return None
    kth = np.partition(x, x.size - k)[x.size - k]
    return np.flatnonzero(x >= kth)


# the nucleus is looked for among this many most likely tokens first, then 64x more, ...: real
# distributions are peaked, and a partition is O(V) where a full sort of 150k is not
NUCLEUS_FIRST_TRY = 256


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Positions of the smallest set of most likely tokens holding `top_p` of the probability,
    best first; ties go to the lowest position."""
    candidates = np.arange(probs.size)
    m = NUCLEUS_FIRST_TRY
    while m < probs.size:
        most_likely = np.argpartition(-probs, m)[:m]
        if probs[most_likely].sum() >= top_p:
            candidates = np.sort(most_likely)  # ascending, so that ties go to the lowest
            break
        m *= 64
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    cumulative = np.cumsum(probs[order])
    n = min(int(np.searchsorted(cumulative, top_p, side="left")) + 1, order.size)
    return order[:n]


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax of finite-or-minus-infinity logits with at least one finite one."""
    e = np.exp(x - x.max())
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax in float64; `+inf` logits share all the probability equally."""
    x = np.asarray(x, dtype=np.float64)
    inf = np.isposinf(x)
    if inf.any():
        return np.where(inf, -math.log(int(inf.sum())), -np.inf)
    m = x.max()
    return x - m - math.log(float(np.exp(x - m).sum()))


def _top(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens as (id, logprob), best first, ties to the lowest id."""
    if n == 0:
        return []
    n = min(n, logprobs.size)
    nth = np.partition(logprobs, logprobs.size - n)[logprobs.size - n]
    candidates = np.flatnonzero(logprobs >= nth)  # ascending ids: ties at the edge kept
    ranked = candidates[np.argsort(-logprobs[candidates], kind="stable")[:n]]
    return [(int(i), float(logprobs[i])) for i in ranked]
