"""Prometheus metrics of one server. Each app owns its CollectorRegistry, so two apps in one process
(tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.request import GenerationStats

# Seconds to the first token: from a small model on a GPU (ms) to a cold-cache prefill on disk (minutes).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Tokens per second: an offloaded 30B model decodes at ~0.1-50 tok/s; prefill runs 10-1000x faster.
_SPEED_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2500, 10000, 50000)


class ServerMetrics:
    """Request-level metrics (outcomes, TTFT, speeds) recorded by the app; engine-level ones
    (tokens, queue, running, expert store) recorded by the engine worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tiermoe_requests",
            "Requests by endpoint and outcome (success, error, aborted: the client left)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("tiermoe_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter(
            "tiermoe_completion_tokens", "Tokens generated, including those of aborted requests", registry=r
        )
        self.ttft = Histogram(
            "tiermoe_time_to_first_token_seconds", "Time to first token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.prefill_speed = Histogram(
            "tiermoe_prefill_tokens_per_second",
            "Prefill speed per request",
            buckets=_SPEED_BUCKETS,
            registry=r,
        )
        self.decode_speed = Histogram(
            "tiermoe_decode_tokens_per_second", "Decode speed per request", buckets=_SPEED_BUCKETS, registry=r
        )
        self.queued = Gauge("tiermoe_requests_queued", "Requests waiting for the engine", registry=r)
        self.running = Gauge("tiermoe_requests_running", "Requests the engine is generating", registry=r)
        self.expert_store = Gauge(
            "tiermoe_expert_store",
            "Cumulative expert-store statistics (hits and misses per tier, hit_rate)",
            ["stat"],
            registry=r,
        )

    def finished(self, endpoint: str, stats: GenerationStats) -> None:
        self.requests.labels(endpoint, "success").inc()
        self.ttft.observe(stats.ttft_s)
        self.prefill_speed.observe(stats.prefill_tok_s)
        if stats.completion_tokens > 1:  # one token has no decode step, so no speed
            self.decode_speed.observe(stats.decode_tok_s)

    def set_store_stats(self, stats: dict) -> None:
        for name, value in stats.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.expert_store.labels(name).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
