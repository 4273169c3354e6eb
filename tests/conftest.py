"""Test-wide setup: tuned kernels, the tuning database and cost models go to a temporary cache
directory, never to the user's ~/.cache/bitsmith."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["BITSMITH_CACHE_DIR"] = str(tmp_path_factory.mktemp("bitsmith-cache"))
