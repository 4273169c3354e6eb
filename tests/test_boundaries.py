"""Module boundaries of ARCHITECTURE.md, checked by import-linter contracts in pyproject."""
import shutil
import subprocess
from pathlib import Path

import pytest

from .support import assert_imports_without

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports not found: pip install -e '.[test]'")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


def test_runtime_imports_without_torch() -> None:
    assert_imports_without(["bitsmith.runtime", "bitsmith.ir", "bitsmith.runtime.model",
                            "bitsmith.serving.server", "bitsmith.serving.loadtest"],
                           ["torch", "bitsmith.frontend", "bitsmith.passes", "bitsmith.autotune"])


def test_llm_runtime_imports_without_the_compiler() -> None:
    assert_imports_without(["bitsmith.llm.artifact", "bitsmith.llm.api"],
                           ["torch", "transformers", "gguf", "bitsmith.frontend",
                            "bitsmith.passes", "bitsmith.autotune", "bitsmith.codegen",
                            "bitsmith.llm.build"])


def test_the_single_machine_path_never_imports_ray() -> None:
    """Ray (the `cluster` extra) loads only when a RayRunner or a Ray deployment is made."""
    assert_imports_without(["bitsmith", "bitsmith.compiler", "bitsmith.autotune",
                            "bitsmith.autotune.tuner", "bitsmith.autotune.ray_runner",
                            "bitsmith.cli", "bitsmith.serving.server", "bitsmith.serving.ray_serve",
                            "bitsmith.runtime.ray_cluster"], ["ray"])
