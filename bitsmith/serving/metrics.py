"""The server's Prometheus metrics, in a registry of its own (several servers may share a process,
as they do in the tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0, 10.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Requests by outcome and reason; queue, compute and end-to-end seconds; batch sizes;
    padding; queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bitsmith_requests", "Infer requests answered, by HTTP status "
                                "and reason: 200 ok; 400 invalid; 404 unknown_model; 408 "
                                "body_timeout; 413 too_large (request body) or "
                                "response_too_large; 499 disconnected (the client left before "
                                "its body arrived); 500 failed; 503 queue_full, standing_queue "
                                "(overloaded: it would likely time out), warming (not ready), "
                                "draining or body_budget (the bodies being read would be over "
                                "--max-pending-body-mb); 504 timeout",
                                ["model", "code", "reason"], registry=r)
        self.latency = Histogram("bitsmith_request_seconds", "Infer request latency, from "
                                 "queuing to the answer", ["model"], buckets=_SECONDS,
                                 registry=r)
        self.queue_seconds = Histogram("bitsmith_queue_seconds", "Time a request waited in the "
                                       "queue before its batch started", ["model"],
                                       buckets=_SECONDS, registry=r)
        self.compute_seconds = Histogram("bitsmith_compute_seconds", "Time to run one batch",
                                         ["model"], buckets=_SECONDS, registry=r)
        self.batch_rows = Histogram("bitsmith_batch_rows", "Real rows (requests' batch rows) per "
                                    "batch run", ["model"], buckets=_ROWS, registry=r)
        self.padded_rows = Counter("bitsmith_padded_rows", "Rows of padding run to reach a "
                                   "batch size the model runs at (waste)", ["model"], registry=r)
        self.retried_batches = Counter("bitsmith_retried_batches", "Batches that failed and "
                                       "were re-run one request at a time", ["model"],
                                       registry=r)
        self.queue_depth = Gauge("bitsmith_queue_depth", "Requests waiting in the queue",
                                 ["model"], registry=r)

    def answered(self, model: str, code: int, reason: str) -> None:
        """Count one answered infer request."""
        self.requests.labels(model, str(code), reason).inc()
