"""The `bitsmith` command line (`bitsmith.cli:main` is the console script)."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
