"""Test-wide setup: tuned kernels, the tuning database and cost models go to a temporary cache
directory, never to the user's ~/.cache/bitsmith. Without a GPU, Triton kernels run through
Triton's CPU interpreter: that must be chosen before anything imports triton."""
from __future__ import annotations

import os
import shutil

import pytest

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["BITSMITH_CACHE_DIR"] = str(tmp_path_factory.mktemp("bitsmith-cache"))
