"""Errors and warnings of the autotuner, its tuning database and its artifact cache."""
from __future__ import annotations


class TuningError(Exception):
    """A tuning or caching failure; the message says what failed, where, and the fix if known."""


class CacheError(TuningError):
    """The artifact cache cannot do what was asked (missing key, bad export file, ...)."""


class CacheCorruptWarning(UserWarning):
    """A cache entry failed its checksum: it was deleted and will be rebuilt."""
