"""Dialects: `func` (the function), `graph` (imported models), `kernel` (fused kernels),
`quant` (quantized weights)."""
from . import func, graph, kernel, quant  # noqa: F401 - importing registers the ops
