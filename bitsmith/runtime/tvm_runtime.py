"""TVM, imported without dragging torch in.

tvm_ffi imports torch eagerly whenever it is installed (for DLPack interop, which bitsmith's
runtime does not use: it hands TVM numpy-backed tensors). A process that only runs artifacts
must not pay for torch, so while TVM is first imported, torch is masked from the import system
(a `None` entry in sys.modules makes `import torch` raise ImportError, which tvm_ffi expects);
the mask is removed right after, so the process can still import torch later.

TVM's CPU thread pool sizes itself once, at its first parallel call, to half the logical CPUs
unless `TVM_NUM_THREADS` says otherwise (it assumes two hardware threads per core); on a machine
whose CPUs are all real cores that halves the speed of every parallel kernel. So the number of
CPUs this process may run on is set here, before TVM loads, unless the user has set it.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))
                                             if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

_MASK = "torch" not in sys.modules and "tvm" not in sys.modules
if _MASK:
    sys.modules["torch"] = None  # type: ignore[assignment]
try:
    import tvm  # noqa: E402
finally:
    if _MASK and sys.modules.get("torch", 0) is None:
        del sys.modules["torch"]

__all__ = ["tvm"]
