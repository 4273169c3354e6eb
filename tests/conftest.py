"""Test-wide setup, done when pytest imports this file: before any test module is collected,
so before anything reads these settings.

- Caches: tuned kernels, compiled libraries, the tuning database and cost models, Triton's
  kernels and anything else that honours XDG go to one fresh temporary directory, never to the
  user's ~/.cache. Set in the environment, so the subprocesses tests start inherit it.
- Triton: without a GPU, kernels run through Triton's CPU interpreter; that must be chosen
  before anything imports triton.
- Hypothesis: the `ci` profile (derandomized, no deadline, failing examples printed as blobs)
  when `CI` is set, else `dev`. Tests that pass their own `@settings` override single values.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings

CACHE_ROOT = Path(tempfile.mkdtemp(prefix="bitsmith-tests-"))
atexit.register(shutil.rmtree, CACHE_ROOT, ignore_errors=True)
for variable, folder in [("BITSMITH_CACHE_DIR", "bitsmith"), ("TRITON_CACHE_DIR", "triton"),
                         ("XDG_CACHE_HOME", "xdg")]:
    os.environ[variable] = str(CACHE_ROOT / folder)

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# deadline=None in both: a deadline is a timing assertion, and these machines are shared
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if "CI" in os.environ else "dev")


def pytest_unconfigure(config: object) -> None:
    """Remove the cache directory (atexit does too, where a process ends normally)."""
    shutil.rmtree(CACHE_ROOT, ignore_errors=True)
