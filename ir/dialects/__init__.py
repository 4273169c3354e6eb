"""Dialects: `func` (the function), `graph` (imported models); `kernel` and `quant` follow."""
from . import func, graph  # noqa: F401 - importing registers the ops
