"""The CLI's one stderr console (progress, tables and errors go to stderr; results to stdout),
and the reading of a signing key file (compile, run, serve)."""
from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console

from ..errors import CliError

err = Console(stderr=True, soft_wrap=True)


def read_key(path: str) -> bytes:
    """The signing key held in the file at `path` (its bytes, a trailing newline dropped)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the key file {path}: {exc.strerror}") from None
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    if len(raw) < 16:
        raise CliError(f"the key in {path} is {len(raw)} bytes; a key must be at least 16 "
                       "secret bytes (make one with `head -c 32 /dev/urandom > bitsmith.key`)")
    return raw


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\Z", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '512M', '64K' (powers of 1024) or a bare number of MiB -> bytes."""
    match = _SIZE.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise CliError(f"expected a size such as 512MiB or 2GiB, got {text!r}")
    unit = (match.group(2) or "M").upper()[0]
    return int(float(match.group(1)) * 1024 ** "BKMGT".index(unit))
