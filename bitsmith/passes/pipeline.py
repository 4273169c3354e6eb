"""Pipeline strings: `canonicalize,cse,layout{conv=nhwc},fuse{max-ops=64}` <-> pass objects.

A pass is a frozen dataclass whose fields are its options; the field `max_ops` is spelled
`max-ops` in a pipeline. Option values are typed by the field's annotation (int, float, bool,
str, or a Literal of choices).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import PipelineError

_ENTRY = re.compile(r"\s*([A-Za-z][\w-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")
_PARTIAL = re.compile(r"\s*(?:[A-Za-z][\w-]*\s*(?:\{[^{}]*\}\s*)?)?")  # how far it parses


@dataclass(frozen=True, slots=True)
class PipelineEntry:
    """One pass of a pipeline with the options the user spelled out."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = ",".join(f"{key}={format_option(value)}" for key, value in self.options)
        return f"{self.name}{{{body}}}"


def format_option(value: Any) -> str:
    """Text of an option value as a pipeline string spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def split_pipeline(text: str) -> list[PipelineEntry]:
    """Split a pipeline string into entries with raw (string) option values."""
    entries: list[PipelineEntry] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _ENTRY.match(text, pos)
        if match is None or match.end() == pos:
            partial = _PARTIAL.match(text, pos)
            bad = partial.end() if partial else pos
            raise PipelineError(f"bad pipeline syntax at column {bad + 1} of {text!r}: "
                                f"expected `name` or `name{{opt=value,...}}` with commas "
                                f"between passes, got {text[bad:bad + 12]!r}")
        name, body = match.group(1), match.group(2)
        options: list[tuple[str, Any]] = []
        for item in filter(None, (s.strip() for s in (body or "").split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise PipelineError(f"pass '{name}': option {item!r} should be `key=value`")
            if any(key.strip() == k for k, _ in options):
                raise PipelineError(f"pass '{name}': option '{key.strip()}' is given twice")
            options.append((key.strip(), value.strip()))
        entries.append(PipelineEntry(name, tuple(options)))
        pos = match.end()
    return entries


def option_fields(cls: type) -> dict[str, dataclasses.Field]:
    """A pass class's options by pipeline spelling (`max-ops`)."""
    return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}


def convert_option(pass_name: str, key: str, raw: str, annotation: Any) -> Any:
    """Turn the text of an option into a value of the field's type, or explain why not."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if raw == format_option(choice):
                return choice
        raise PipelineError(f"pass '{pass_name}': option '{key}' expected one of "
                            f"{', '.join(map(format_option, choices))}; got {raw!r}")
    try:
        if annotation is bool:
            if raw not in ("true", "false"):
                raise ValueError
            return raw == "true"
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
    except ValueError:
        raise PipelineError(f"pass '{pass_name}': option '{key}' expected "
                            f"{annotation.__name__}, got {raw!r}") from None
    return raw


def format_pipeline(entries: list[PipelineEntry]) -> str:
    """The canonical text of a pipeline."""
    return ",".join(str(e) for e in entries)
