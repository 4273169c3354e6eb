"""The CLI's one stderr console (progress, tables and errors go to stderr; results to stdout)."""
from __future__ import annotations

from rich.console import Console

err = Console(stderr=True, soft_wrap=True)
