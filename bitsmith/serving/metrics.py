"""The server's Prometheus metrics, in a registry of its own (several servers may share a process,
as they do in the tests)."""
from __future__ import annotations

from typing import Any

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
        # LLMs (the OpenAI endpoints)
        self.llm_requests = Counter("bitsmith_llm_requests", "LLM requests answered, by HTTP "
                                    "status (499: the client left before the end)",
                                    ["model", "code"], registry=r)
        self.ttft = Histogram("bitsmith_llm_time_to_first_token_seconds", "From a request's "
                              "submission to its first sampled token", ["model"],
                              buckets=_SECONDS, registry=r)
        self.itl = Histogram("bitsmith_llm_inter_token_seconds", "Between a request's "
                             "consecutive sampled tokens", ["model"], buckets=_SECONDS,
                             registry=r)
        self.tokens_in = Counter("bitsmith_llm_prompt_tokens", "Prompt tokens fed to the model",
                                 ["model"], registry=r)
        self.tokens_out = Counter("bitsmith_llm_generated_tokens", "Tokens sampled", ["model"],
                                  registry=r)
        self.running = Gauge("bitsmith_llm_running", "Sequences admitted (holding KV pages)",
                             ["model"], registry=r)
        self.waiting = Gauge("bitsmith_llm_waiting", "Requests waiting for admission",
                             ["model"], registry=r)
        self.kv_used = Gauge("bitsmith_llm_kv_pages_used", "KV cache pages sequences hold",
                             ["model"], registry=r)
        self.kv_free = Gauge("bitsmith_llm_kv_pages_free", "KV cache pages free", ["model"],
                             registry=r)
        self.prefix_hit_rate = Gauge("bitsmith_llm_prefix_cache_hit_rate", "Prompt tokens "
                                     "found in the prefix cache over those it could have held "
                                     "(whole pages before each prompt's last token)", ["model"],
                                     registry=r)
        self.prefix_pages = Gauge("bitsmith_llm_prefix_cache_pages", "KV pages the prefix cache "
                                  "holds (those no sequence holds are evicted as needed)",
                                  ["model"], registry=r)
        self.preemptions = Counter("bitsmith_llm_preemptions", "Sequences preempted (never: "
                                   "admission reserves every page a request may need)",
                                   ["model"], registry=r)

    def answered(self, model: str, code: int, reason: str) -> None:
        """Count one answered infer request."""
        self.requests.labels(model, str(code), reason).inc()


class LlmObserver:
    """The scheduler's reports (`llm.scheduler.Observer`) as one LLM's metrics."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.ttft = metrics.ttft.labels(model)
        self.itl = metrics.itl.labels(model)
        self.tokens_in = metrics.tokens_in.labels(model)
        self.tokens_out = metrics.tokens_out.labels(model)
        self.running = metrics.running.labels(model)
        self.waiting = metrics.waiting.labels(model)
        self.kv_used = metrics.kv_used.labels(model)
        self.kv_free = metrics.kv_free.labels(model)
        self.hit_rate = metrics.prefix_hit_rate.labels(model)
        self.prefix_pages = metrics.prefix_pages.labels(model)
        metrics.preemptions.labels(model)  # exported as 0

    def token(self, first: bool, seconds: float) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def step(self, scheduler: Any, prompt_tokens: int, new_tokens: int) -> None:
        self.tokens_in.inc(prompt_tokens)
        self.tokens_out.inc(new_tokens)
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        blocks = scheduler.engine.blocks
        cache = scheduler.prefix_cache
        idle = cache.evictable() if cache is not None else 0  # cached, no sequence holds them
        self.kv_free.set(blocks.free_pages)
        self.kv_used.set(blocks.num_pages - blocks.free_pages - idle)
        if cache is not None:
            self.prefix_pages.set(len(cache.pages))
            self.hit_rate.set(cache.found / cache.looked_up if cache.looked_up else 0.0)
