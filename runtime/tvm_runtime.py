"""TVM, imported without dragging torch in.

tvm_ffi imports torch eagerly whenever it is installed (for DLPack interop, which bitsmith's
runtime does not use: it hands TVM numpy-backed tensors). A process that only runs artifacts
must not pay for torch, so while TVM is first imported, torch is masked from the import system
(a `None` entry in sys.modules makes `import torch` raise ImportError, which tvm_ffi expects);
the mask is removed right after, so the process can still import torch later.
"""
from __future__ import annotations

import sys

_MASK = "torch" not in sys.modules and "tvm" not in sys.modules
if _MASK:
    sys.modules["torch"] = None  # type: ignore[assignment]
try:
    import tvm  # noqa: E402
finally:
    if _MASK and sys.modules.get("torch", 0) is None:
        del sys.modules["torch"]

__all__ = ["tvm"]
