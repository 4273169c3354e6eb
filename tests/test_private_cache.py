"""The tests' caches live in a temporary directory that tests/conftest.py sets before anything
is collected: a compile in the test process, or in a process a test starts, leaves the user's
~/.cache alone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bitsmith import ir, passes
from bitsmith.autotune.cache import cache_dir
from bitsmith.compiler import build_artifact
from bitsmith.runtime.model import CompiledModel

from .support import assert_matches_interpreter, random_inputs

TINY = """module @tiny {
  func.func @main(%x: tensor<3x5xf32>, %b: tensor<5xf32>) -> (tensor<3x5xf32>) {
    %0 = "graph.add"(%x, %b) : (tensor<3x5xf32>, tensor<5xf32>) -> tensor<3x5xf32>
    %1 = "graph.relu"(%0) : (tensor<3x5xf32>) -> tensor<3x5xf32>
    "func.return"(%1) : (tensor<3x5xf32>) -> ()
  }
}
"""


def listing(root: Path) -> list[str] | None:
    """Every path under root, relative and sorted; None when root does not exist."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else None


def test_the_cache_directories_are_private_to_the_test_session() -> None:
    user_cache = Path.home() / ".cache"
    for variable in ("BITSMITH_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        path = Path(os.environ[variable])
        assert not path.is_relative_to(user_cache), f"{variable}={path}"
    assert cache_dir() == Path(os.environ["BITSMITH_CACHE_DIR"])
    code = "from bitsmith.autotune.cache import cache_dir; print(cache_dir())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(cache_dir())  # subprocesses inherit it


def test_a_compile_in_the_test_process_leaves_the_users_cache_alone() -> None:
    user_cache = Path.home() / ".cache" / "bitsmith"
    before = listing(user_cache)
    module = ir.parse(TINY)
    fused = ir.parse(TINY)
    passes.run(fused, passes.default_pipeline("cpu"))
    compiled = CompiledModel(build_artifact(fused))
    assert_matches_interpreter(module, compiled, random_inputs(module))
    assert listing(user_cache) == before, f"the compile wrote to {user_cache}"
    assert list((cache_dir() / "libraries").iterdir()), "the library went to no cache at all"
