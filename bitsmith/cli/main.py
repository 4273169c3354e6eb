"""The `bitsmith` command line: one parser, one subcommand group per module of this package.

Any `BitsmithError` a command raises is printed as one line with exit code 2.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from ..errors import BitsmithError
from . import cache, compile, generate, ir, serve
from .console import err


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bitsmith` console script and `python -m bitsmith`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BitsmithError as exc:
        err.print(f"[bold red]error:[/] {one_line(exc)}", highlight=False)
        return 2


def one_line(exc: BitsmithError) -> str:
    """The error's message on one line: its lines joined with '; ' (with a space after a
    line that ends in ':', which introduces the next)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    out = lines[0]
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per verb."""
    parser = argparse.ArgumentParser(prog="bitsmith", description="bitsmith: a deep-learning "
                                     "compiler and kernel autotuner")
    parser.add_argument("--version", action="version", version=f"bitsmith {__version__}")
    sub = parser.add_subparsers(dest="command")
    ir.add_parsers(sub)
    compile.add_parsers(sub)
    cache.add_parsers(sub)
    serve.add_parsers(sub)
    generate.add_parsers(sub)
    return parser
