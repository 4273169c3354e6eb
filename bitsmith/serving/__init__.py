"""Serving compiled artifacts over HTTP: the KServe v2 codec, batching, the Starlette server,
Prometheus metrics and a load generator. It runs on `bitsmith.runtime` alone: no compiler, no
torch."""
