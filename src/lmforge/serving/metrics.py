"""The server's Prometheus metrics (``GET /metrics``), in a registry of the app's own.

Requests by endpoint and outcome, end-to-end latency (streams included), queue length and running
requests (read from the engine when scraped), time to first token, inter-token latency, queue time,
and prompt and generated token counters. Names follow vLLM's, with the ``lmforge_`` prefix.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmforge.inference.engine import Engine, Result

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    """Every metric of one server; :meth:`watch` ties the gauges to its engine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests answered, by endpoint and outcome "
                                "(ok, client_error, server_error, cancelled, timeout)", ["endpoint", "outcome"],
                                registry=r)
        self.latency = Histogram("lmforge_e2e_request_latency_seconds", "Time from a request's arrival to the end "
                                 "of its response (streams included)", ["endpoint"], buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.waiting = Gauge("lmforge_num_requests_waiting", "Generation requests queued for a batch slot",
                             registry=r)
        self.running = Gauge("lmforge_num_requests_running", "Generation requests decoding in the batch", registry=r)
        self.ready = Gauge("lmforge_model_ready", "1 once the model is loaded and the engine runs", registry=r)
        self.queue_time = Histogram("lmforge_request_queue_time_seconds", "Time a generation waited for a slot",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("lmforge_time_to_first_token_seconds", "Time from a generation's "
                                             "submission to its first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("lmforge_inter_token_latency_seconds", "Time between successive "
                                             "tokens of a generation", buckets=_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.cached_prompt_tokens = Counter("lmforge_prefix_cache_hit_tokens", "Prompt tokens of finished "
                                            "generations taken from the prefix cache", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated", registry=r)

    def watch(self, engine: Engine) -> None:
        """Read the queue length and running requests from ``engine`` at every scrape."""
        self.waiting.set_function(lambda: engine.num_waiting)
        self.running.set_function(lambda: engine.num_running)
        self.ready.set(1)

    def observe(self, result: Result) -> None:
        """Account a finished (or cancelled) generation."""
        if result.queue_time is not None:
            self.queue_time.observe(result.queue_time)
        if result.time_to_first_token is not None:
            self.time_to_first_token.observe(result.time_to_first_token)
        for before, after in zip(result.token_times, result.token_times[1:]):
            self.inter_token_latency.observe(after - before)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_prompt_tokens.inc(result.cached_tokens)
        self.generation_tokens.inc(result.completion_tokens)

    def record_request(self, endpoint: str, outcome: str, latency: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(latency)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
