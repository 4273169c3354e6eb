"""`bitsmith cache ls | show KEY | clear | prune --older 30d | export FILE | import FILE`.

The cache lives in `$BITSMITH_CACHE_DIR` or `~/.cache/bitsmith`. Tables go to stderr; user
errors are `CliError`s, which the CLI prints as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import time
from typing import Any

from rich.table import Table

from ..autotune.cache import ArtifactCache, LibraryCache, parse_age
from ..autotune.fingerprint import device_fingerprint, fingerprint_hash
from ..codegen.tvm.target import host_target
from ..errors import CacheError, CliError
from .console import err

MIN_PREFIX = 6  # shortest key prefix `show` accepts
SHORT_KEY = 12  # key characters `ls` prints: plenty to be unique, short enough to type


def add_parsers(sub: Any) -> None:
    """Register `cache` and its verbs on the CLI's subparsers."""
    cache = sub.add_parser("cache", help="list, show, prune, export or import tuned kernels "
                                         "($BITSMITH_CACHE_DIR, default ~/.cache/bitsmith)")
    cache.set_defaults(func=functools.partial(_print_help, cache))
    verbs = cache.add_subparsers(dest="cache_command")
    verbs.add_parser("ls", help="one row per cached kernel").set_defaults(func=cmd_ls)
    show = verbs.add_parser("show", help="everything about one entry")
    show.add_argument("key", help=f"a key, or a unique prefix of >= {MIN_PREFIX} characters")
    show.set_defaults(func=cmd_show)
    verbs.add_parser("clear", help="delete every entry").set_defaults(func=cmd_clear)
    prune = verbs.add_parser("prune", help="delete entries older than an age")
    prune.add_argument("--older", required=True, metavar="AGE",
                       help="e.g. 30d, 12h, 45m or 90s")
    prune.set_defaults(func=cmd_prune)
    export = verbs.add_parser("export", help="write every entry to one .tar file")
    export.add_argument("file")
    export.set_defaults(func=cmd_export)
    imp = verbs.add_parser("import", help="add the entries of an exported .tar file")
    imp.add_argument("file")
    imp.add_argument("--fingerprint", metavar="HASH",
                     help="the device fingerprint hash entries must have been tuned on "
                          "(default: this machine's)")
    imp.set_defaults(func=cmd_import)


def _print_help(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser.print_help()
    return 2


def cmd_ls(args: argparse.Namespace) -> int:
    """`bitsmith cache ls`: one row per entry, newest first."""
    cache = ArtifactCache()
    rows = sorted(cache.ls(), key=lambda row: -row["created"])
    if not rows:
        err.print(f"the cache at {cache.root} is empty", highlight=False)
        return 0
    table = Table(title=f"{len(rows)} cached kernels in {cache.root}")
    for col in ("key", "template", "median us", "KiB", "age"):
        table.add_column(col, justify="right" if col in ("median us", "KiB", "age") else "left")
    now = time.time()
    for row in rows:
        median = "-" if row["median"] is None else f"{row['median'] * 1e6:.1f}"
        table.add_row(row["key"][:SHORT_KEY], row["template"], median,
                      f"{row['size'] / 1024:.1f}", _age(now - row["created"]))
    err.print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`bitsmith cache show KEY`: every field of one entry but its library bytes."""
    cache = ArtifactCache()
    info = cache.show(resolve_key(cache, args.key))
    err.print(f"key {info['key']}", highlight=False)
    table = Table(title=info["path"], show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    median = "-" if info["median"] is None else f"{info['median'] * 1e6:.2f} us"
    times = ", ".join(f"{t * 1e6:.2f}" for t in info["times"])
    created = datetime.datetime.fromtimestamp(info["created"]).isoformat(timespec="seconds")
    for name, value in [("template", info["template"]), ("config", info["config"]),
                        ("median", median), ("times us", times or "-"), ("created", created),
                        ("library", f"{info['library_size']} bytes, sha256 "
                                    f"{info['library_sha256'][:16]}")]:
        table.add_row(name, value)
    for name, value in sorted(info["meta"].items()):
        table.add_row(f"meta.{name}", str(value))
    err.print(table)
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    """`bitsmith cache clear`: delete every entry."""
    cache = ArtifactCache()
    err.print(f"removed {cache.clear()} entries from {cache.root} and "
              f"{LibraryCache().prune()} compiled libraries", highlight=False)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """`bitsmith cache prune --older AGE`: delete the entries created before now - AGE."""
    try:
        seconds = parse_age(args.older)
    except CacheError as exc:
        raise CliError(f"--older: {exc}") from None
    cache = ArtifactCache()
    removed = cache.prune(seconds)
    libraries = LibraryCache().prune(seconds)
    err.print(f"pruned {removed} entries and {libraries} compiled libraries older than "
              f"{args.older} from {cache.root}", highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`bitsmith cache export FILE`: every valid entry into one tar file."""
    count = ArtifactCache().export(args.file)
    err.print(f"exported {count} entries to {args.file}", highlight=False)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """`bitsmith cache import FILE`: add the entries of an export, checksums verified."""
    cache = ArtifactCache()
    fingerprint = args.fingerprint or fingerprint_hash(device_fingerprint(host_target()))
    count = cache.import_(args.file, fingerprint_hash=fingerprint)
    err.print(f"imported {count} entries from {args.file} into {cache.root}", highlight=False)
    return 0


def resolve_key(cache: ArtifactCache, prefix: str) -> str:
    """The one key starting with `prefix` (>= 6 characters); CliError otherwise."""
    prefix = prefix.strip().lower()
    if len(prefix) < MIN_PREFIX:
        raise CliError(f"key prefix expected >= {MIN_PREFIX} characters, got {prefix!r}; "
                           "run `bitsmith cache ls` to list the keys")
    # ArtifactCache is not a dict: it has keys() but no __iter__
    matches = [key for key in cache.keys() if key.startswith(prefix)]  # noqa: SIM118
    if not matches:
        raise CliError(f"no cache entry matches {prefix!r} in {cache.root}; run "
                           "`bitsmith cache ls` to list the keys")
    if len(matches) > 1:
        shown = ", ".join(key[:SHORT_KEY] for key in matches[:3])
        raise CliError(f"key prefix {prefix!r} is ambiguous: it matches {len(matches)} "
                           f"entries ({shown}{', ...' if len(matches) > 3 else ''}); give "
                           "more characters")
    return matches[0]


def _age(seconds: float) -> str:
    """A short age: 45s, 12m, 5h, 30d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"
