"""bitsmith's LLM path: a decoder compiled into `prefill` and `decode` entry points over an
explicit paged KV cache, and the host side that drives them (tokenizer, sampler, pages).

Compile side (`compile`) needs the compiler; the runtime side (`load`, generation) needs only
`bitsmith.runtime`, numpy, `tokenizers` and jinja2 (chat templates, sandboxed).
"""
from __future__ import annotations

import importlib
from typing import Any

_FUNCTIONS = {"compile": "build", "load": "artifact", "LLM": "api", "SamplingParams": "sampling"}


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'bitsmith.llm' has no attribute '{name}'")
