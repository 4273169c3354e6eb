"""Dialects: `func` (the function), `graph` (imported models), `kernel` (fused kernels);
`quant` follows."""
from . import func, graph, kernel  # noqa: F401 - importing registers the ops
