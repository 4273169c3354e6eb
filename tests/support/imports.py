"""Module boundaries seen from outside: what importing (and running) something pulls in."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

REPORT = ("\nimport sys as _sys\n_loaded = sorted(_sys.modules)\n"  # before json is imported
          "import json as _json\nprint(_json.dumps(_loaded))\n")


def assert_imports_without(modules: Sequence[str], forbidden: Sequence[str], *,
                           then: str = "", timeout: float = 300) -> None:
    """In a fresh interpreter, `import <modules>` (then run the statements `then`, e.g. a CLI
    call) and assert that none of `forbidden`, nor any submodule of them, got imported."""
    code = "".join(f"import {m}\n" for m in modules) + then + REPORT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    bad = sorted({m for m in loaded for f in forbidden if m == f or m.startswith(f + ".")})
    assert not bad, f"importing {', '.join(modules)} imported {', '.join(bad)}"
