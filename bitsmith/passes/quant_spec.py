"""Quantization spec strings (`w4g128`, `w3g128:gptq`, `f6e3m2g64`) <-> the `quantize` pass.

    spec    := format [ "g" GROUP ] ( ":" option )*
    format  := "w" BITS               integer weights of 1..8 bits (asymmetric unless :sym)
             | "f" B "e" E "m" M      a low-bit float (symmetric), e.g. f4e2m1, f6e3m2, f8e4m3
    option  := "rtn" | "gptq"         method (default rtn; gptq needs calibration data)
             | "sym" | "asym"         zero point (integers only)
             | "act-order" | "no-act-order"        GPTQ column order (default act-order)
             | "axis=" ("out" | "in" | "auto")     scale grouping (auto: per layer, AdaDim)
             | "scale=" ("f16" | "bf16" | "f32")   scale dtype (default f16)
             | "keep=" PATTERN ("|" PATTERN)*      layers (weight names, fnmatch) kept in f32
             | "promote=" FRACTION                 the most sensitive fraction of the layers
                                                   gets 2 more bits (FlexQ-style mixed bits)
             | "damp=" FRACTION                    GPTQ's dampening of the Hessian diagonal,
                                                   a fraction of its mean (default 0.1)
             | "rot" | "rot=" BLOCK                quantize W R and run on x R, R a randomized
                                                   Hadamard rotation in blocks of BLOCK (a power
                                                   of two; "rot" means 128; QuaRot-style)

No `g` (or `g0`) means one group per channel. Example: `w3g128:gptq:axis=auto:keep=*pooler*`.
The same settings spelled as a pipeline entry: `quantize{bits=3,group=128,method=gptq,
axis=auto,keep=*pooler*}`.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import PipelineError
from ..ir.dtypes import DTypeError, parse_dtype

_FORMAT = re.compile(r"(w(?P<bits>\d+)|(?P<float>f\d+e\d+m\d+))(g(?P<group>\d+))?")
DEFAULT_ROTATION = 128
"""The Hadamard block of a bare `:rot`."""
EXAMPLES = "w4g128, w3g128:gptq, w8, f6e3m2g64, w4g128:gptq:axis=auto:keep=*pooler*"


class QuantSpecError(PipelineError):
    """A quantization spec string is malformed; the message says what was expected."""


def _fail(text: str, why: str) -> QuantSpecError:
    return QuantSpecError(f"bad quantization spec {text!r}: {why}; expected e.g. {EXAMPLES}")


def _number(value: str) -> float:
    """A setting's value as a float; NaN (which fails every range check) if it is not one."""
    try:
        return float(value)
    except ValueError:
        return float("nan")


def parse_quant_spec(text: str) -> dict[str, Any]:
    """The `quantize` pass options a spec string sets (option name -> typed value)."""
    if not isinstance(text, str) or not text.strip():
        raise _fail(str(text), "it is empty")
    head, *options = text.strip().split(":")
    out = _parse_format(text, head)
    for option in options:
        key, eq, value = option.partition("=")
        name, setting = _parse_setting(text, key, value) if eq else _parse_flag(text, option)
        out[name] = setting
    if out.get("sym") is not None and "format" in out:
        raise _fail(text, "low-bit float weights are always symmetric; drop :sym/:asym")
    return out


_FLAGS: dict[str, tuple[str, Any]] = {
    "rtn": ("method", "rtn"), "gptq": ("method", "gptq"),
    "sym": ("sym", True), "asym": ("sym", False),
    "act-order": ("act_order", True), "no-act-order": ("act_order", False),
    "rot": ("rotate", DEFAULT_ROTATION)}
"""Options without a value: flag -> (option name, value)."""
_SETTINGS = "axis=, scale=, keep=, promote=, damp=, rot="


def _parse_format(text: str, head: str) -> dict[str, Any]:
    """The options the format part (`w4g128`, `f6e3m2g64`) of spec `text` sets."""
    m = _FORMAT.fullmatch(head)
    if m is None:
        raise _fail(text, f"the format {head!r} should be wBITS[gGROUP] or fBeEmM[gGROUP]")
    out: dict[str, Any] = {}
    if m["bits"] is not None:
        bits = int(m["bits"])
        if not 1 <= bits <= 8:
            raise _fail(text, f"integer weights take 1..8 bits, got {bits}")
        out["bits"] = bits
    else:
        try:
            fmt = parse_dtype(m["float"])
        except DTypeError as exc:
            raise _fail(text, str(exc)) from None
        out["format"] = fmt.name
    out["group"] = int(m["group"]) if m["group"] is not None else 0
    return out


def _parse_flag(text: str, option: str) -> tuple[str, Any]:
    """The option a flag (`gptq`, `sym`, ...) of spec `text` sets, and its value."""
    if option not in _FLAGS:
        raise _fail(text, f"unknown option {option!r} (flags: {', '.join(_FLAGS)}; "
                          f"settings: {_SETTINGS})")
    return _FLAGS[option]


def _parse_setting(text: str, key: str, value: str) -> tuple[str, Any]:
    """The option a `key=value` setting of spec `text` sets, and its checked value."""
    if key == "axis":
        if value not in ("out", "in", "auto"):
            raise _fail(text, f"axis must be out, in or auto, got {value!r}")
        return "axis", value
    if key == "scale":
        if value not in ("f16", "bf16", "f32"):
            raise _fail(text, f"scale must be f16, bf16 or f32, got {value!r}")
        return "scale", value
    if key == "keep":
        if not value:
            raise _fail(text, "keep= needs at least one layer pattern")
        return "keep", value
    if key == "promote":
        fraction = _number(value)
        if not 0.0 <= fraction <= 1.0:
            raise _fail(text, f"promote= takes a fraction in 0..1, got {value!r}")
        return "promote", fraction
    if key == "damp":
        damp = _number(value)
        if not 0.0 < damp <= 1.0:
            raise _fail(text, f"damp= takes a fraction in (0, 1], got {value!r}")
        return "damp", damp
    if key == "rot":
        block = int(value) if value.isdigit() else 0
        if block < 2 or block & (block - 1):
            raise _fail(text, f"rot= takes a power of two >= 2 (the Hadamard block), "
                              f"got {value!r}")
        return "rotate", block
    raise _fail(text, f"unknown setting {key!r} (settings: {_SETTINGS})")


def quant_pipeline_entry(text: str) -> str:
    """The `quantize{...}` pipeline entry of a spec string."""
    from .pipeline import format_option  # noqa: PLC0415 - small, avoids a cycle at import

    opts = parse_quant_spec(text)
    body = ",".join(f"{k.replace('_', '-')}={format_option(v)}" for k, v in opts.items())
    return f"quantize{{{body}}}" if body else "quantize"
