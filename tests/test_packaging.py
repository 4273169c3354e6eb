"""The package is `bitsmith/` alone: a checkout imports it from its root, an install from
anywhere, and neither the tests, the benchmarks nor CI files ship in the wheel."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_imports_from_the_root_and_from_elsewhere_but_not_the_tests(tmp_path: Path) -> None:
    for cwd in (ROOT, tmp_path):
        proc = python("import bitsmith, bitsmith.errors; print(bitsmith.__file__)", cwd)
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.strip()).parent == ROOT / "bitsmith"
    for name in ("bitsmith.tests", "bitsmith.bench"):
        proc = python(f"import {name}", tmp_path)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, proc.stderr


def test_the_wheel_holds_the_package_only(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("bitsmith-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bitsmith/__init__.py" in names and "bitsmith/cli/main.py" in names
    stray = [n for n in names if not n.startswith(("bitsmith/", "bitsmith-"))]
    assert stray == []
    assert not [n for n in names if n.startswith(("bitsmith/tests", "bitsmith/bench"))]
