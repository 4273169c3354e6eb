"""Text on the host: the tokenizer, streaming detokenization, stop strings and chat templates.

- `Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` built from tokenizer.json text (kept,
  so an artifact can save it) and knows the model's BOS and end-of-sequence ids.
- `Detokenizer` turns tokens into text deltas as they come, like vLLM and TGI: it decodes a
  short window of ids, from a prefix offset (context for the decoder) past a read offset (where
  the text already emitted ends), and emits what the new ids added. While the window's text
  ends with U+FFFD, an incomplete UTF-8 sequence from byte tokens, it emits nothing and waits.
  The deltas, `flush()` included, concatenate to `tokenizer.decode(ids)`.
- `StopMatcher` cuts a stream of text at the first stop string, holding back any tail that may
  be the start of one.
- `ChatTemplate` renders a Hugging Face chat template as transformers does (a sandboxed,
  immutable jinja2 environment, `trim_blocks`, `lstrip_blocks`, `raise_exception`,
  `strftime_now`), a stricter sandbox: an unsafe attribute access raises instead of rendering
  as undefined. Every failure is a `TextError`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
import tokenizers

from bitsmith.errors import BitsmithError, InputError

# prompt ids the detokenizer decodes before the first generated token, for decoders whose
# output depends on what precedes a token (SentencePiece's leading space); as in vLLM
PROMPT_CONTEXT = 5
REPLACEMENT_CHAR = "\ufffd"


class TextError(BitsmithError):
    """A tokenizer, chat template or conversation that cannot be used; says why."""


class Tokenizer:
    """A `tokenizers` tokenizer plus the model's BOS and end-of-sequence ids."""

    def __init__(self, json_text: str, *, bos_id: int | None, eos_ids: Iterable[int],
                 add_bos: bool) -> None:
        try:
            self._backend = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or schema
            raise TextError(f"tokenizer.json: expected a Hugging Face tokenizer definition, "
                            f"got text it cannot load: {e}") from e
        self._json_text = json_text
        self._vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        if bos_id is not None:
            self._check_id("bos_id", bos_id)
        eos = frozenset(eos_ids)
        if not eos:
            raise TextError("tokenizer: expected at least one end-of-sequence id, got none; "
                            "pass the model's eos_token_id")
        for i in eos:
            self._check_id("eos_ids", i)
        if add_bos and bos_id is None:
            raise TextError("tokenizer: add_bos=True expected a bos_id, got None; pass the "
                            "model's bos_token_id or set add_bos=False")
        self._bos_id, self._eos_ids, self._add_bos = bos_id, eos, bool(add_bos)

    @classmethod
    def from_json_text(cls, text: str, *, bos_id: int | None, eos_ids: Iterable[int],
                       add_bos: bool) -> Tokenizer:
        """Build from the text of a tokenizer.json file."""
        return cls(text, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos)

    def to_json_text(self) -> str:
        """The tokenizer.json text this tokenizer was built from."""
        return self._json_text

    @property
    def vocab_size(self) -> int:
        """Token ids in [0, vocab_size), added tokens included."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, if the model has one."""
        return self._bos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end generation (eos, and e.g. <|im_end|> or <|eot_id|>)."""
        return self._eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether `encode` makes sure the ids start with BOS."""
        return self._add_bos

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special`, the post-processor's tokens and BOS once."""
        if not isinstance(text, str):
            raise InputError(f"encode: expected text as a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=add_special).ids
        bos = self._bos_id  # the post-processor, or the text itself, may already start with it
        if self._add_bos and add_special and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text of `ids`; special tokens left out with `skip_special`."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise InputError(f"decode: expected token ids in [0, {self._vocab_size}), got "
                             f"{bad}; is the model's vocabulary larger than the tokenizer's?")
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str:
        """The token string of an id (byte-level tokens as the tokenizer spells them)."""
        self._check_id("token_id", token_id)
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise InputError(f"id_to_token: expected an id of the vocabulary, got {token_id}, "
                             f"which has no token")
        return token

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None when the vocabulary lacks it."""
        return self._backend.token_to_id(token)

    def _check_id(self, name: str, token_id: object) -> None:
        """Raise InputError unless `token_id` is an id of this vocabulary."""
        if not (isinstance(token_id, int) and not isinstance(token_id, bool)
                and 0 <= token_id < self._vocab_size):
            raise InputError(f"tokenizer {name}: expected a token id in "
                             f"[0, {self._vocab_size}), got {token_id!r}")


class Detokenizer:
    """Incremental detokenization of one generated stream (see the module docstring).

    With `prompt_ids`, the last few prompt ids give the decoder its context; their own text is
    not emitted."""

    def __init__(self, tokenizer: Tokenizer, *, prompt_ids: Sequence[int] = (),
                 skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids = [int(i) for i in prompt_ids[-PROMPT_CONTEXT:]] if len(prompt_ids) else []
        self._prefix = 0  # where the decoded window starts
        self._read = len(self._ids)  # where the text already emitted ends

    def push(self, token_id: int) -> str:
        """Add one token; the text it completes (maybe "" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back at the end of the stream (an incomplete character: U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        """Emit the window's new text unless it ends mid-character (always when `final`)."""
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], self._skip_special)
        text = decode(self._ids[self._prefix:], self._skip_special)
        if len(text) <= len(before) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]


class StopMatcher:
    """Cuts streamed text at the first of some stop strings, which is not emitted."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
            raise InputError(f"StopMatcher: expected a list of non-empty strings, got {stops!r}")
        self._stops = tuple(stops)
        self._pending = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit, whether a stop string has appeared)."""
        if self.stopped:
            return "", True
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending, self.stopped = "", True
            return text[:min(hits)], True
        hold = self._held_tail(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """The held-back text, at the end of a stream that did not stop."""
        text, self._pending = self._pending, ""
        return text

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        longest = max((len(s) for s in self._stops), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[len(text) - n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0


class _StrictSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute raises rather than being undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` refusing underscore attributes, as transformers' chat templates do."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # self in args: jinja's own trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: object) -> None:
    """Refuse underscore names, the way to dunder attributes."""
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"namespace attribute: expected a name without a leading underscore, got {name!r}")


def _raise_exception(message: object) -> NoReturn:
    """The templates' `raise_exception(message)`: they refuse a conversation with it."""
    raise TextError(f"chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson` filter (jinja's own escapes HTML characters)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """The templates' `strftime_now(format)`: today's date in a system prompt."""
    return datetime.now().strftime(fmt)


def _plain_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    """The templates' `dict(...)`: a call only, not the type with its class attributes."""
    return dict(*args, **kwargs)


# errors a template's own expressions may raise ('a' + 1, a missing key, 1 / 0)
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError,
                  RecursionError)


class ChatTemplate:
    """A Hugging Face chat template, rendered in a sandbox like transformers renders it."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        if not isinstance(source, str):
            raise TextError(f"chat template: expected jinja source text, got "
                            f"{type(source).__name__}")
        env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                             extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                           namespace=_Namespace, dict=_plain_dict)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TextError(f"chat template line {e.lineno}: {e.message}; expected valid "
                            f"jinja2 (check the model's tokenizer_config.json)") from e
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation; with `add_generation_prompt`, the assistant's
        turn is opened."""
        plain = _checked_messages(messages)
        try:
            return self._template.render(
                messages=plain, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except _RENDER_ERRORS as e:
            raise TextError(f"chat template failed to render: {type(e).__name__}: {e}; "
                            f"expected messages this template accepts (or fix the "
                            f"template)") from e


def _checked_messages(messages: object) -> list[dict[str, Any]]:
    """Plain copies of the messages, or TextError naming the first bad one."""
    if not isinstance(messages, list):
        raise TextError(f"messages: expected a list of {{'role': str, 'content': str}} dicts, "
                        f"got {type(messages).__name__}")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TextError(f"messages[{i}]: expected a dict with 'role' and 'content', got "
                            f"{type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise TextError(f"messages[{i}]['role']: expected a str such as 'user', got "
                            f"{role!r}")
        if content is not None and not isinstance(content, str | list):
            raise TextError(f"messages[{i}]['content']: expected a str (or a list of parts, "
                            f"or None with tool calls), got {type(content).__name__}")
        plain.append(_plain(message, f"messages[{i}]"))
    return plain


def _plain(value: Any, where: str) -> Any:
    """A copy made of JSON types only: the template never sees an object with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{j}]") for j, v in enumerate(value)]
    raise TextError(f"{where}: expected JSON data (str, number, bool, None, list, dict), got "
                    f"{type(value).__name__}")
