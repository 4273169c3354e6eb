"""bitsmith: a deep-learning compiler and kernel autotuner.

Submodules load lazily so that `bitsmith.runtime` can run an artifact without importing torch
or the compiler.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {"ir", "frontend", "passes", "codegen", "autotune", "runtime", "serving", "models",
               "compiler", "errors", "cli", "llm"}
_FUNCTIONS = {"compile": "compiler", "load": "runtime.model"}  # bitsmith.load needs no torch


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'bitsmith' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_FUNCTIONS))
