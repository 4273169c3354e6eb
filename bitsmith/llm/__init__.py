"""bitsmith's LLM path: a decoder compiled into `prefill` and `decode` entry points over an
explicit paged KV cache, and the host side that drives them (tokenizer, sampler, pages).

Compile side (`compile`) needs the compiler; the runtime side (`load`, generation) needs only
`bitsmith.runtime`, numpy, `tokenizers` and jinja2 (chat templates, sandboxed).
"""
from __future__ import annotations
