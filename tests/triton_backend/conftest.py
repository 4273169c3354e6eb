"""Triton tests run on a GPU when there is one, else through Triton's CPU interpreter
(`TRITON_INTERPRET=1`, set by the top-level conftest before triton is imported)."""
import pytest

pytest.importorskip("triton")
