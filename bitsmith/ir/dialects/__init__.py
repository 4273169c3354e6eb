"""Dialects: `func` (the function), `graph` (imported models), `kernel` (fused kernels),
`quant` (quantized weights), `kv` (the paged KV cache)."""
from . import func, graph, kernel, kv, quant  # noqa: F401 - importing registers the ops
