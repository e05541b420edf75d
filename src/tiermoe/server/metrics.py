"""Prometheus metrics of one server. Each app owns its CollectorRegistry, so two apps in one process
(tests) never share counters."""

from __future__ import annotations

from dataclasses import fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from ..engine.request import GenerationStats
from ..offload.store import StoreStats

# The store's counts (hits, misses, bytes, seconds): each engine step's are added up here.
_STORE_COUNTS = tuple(f.name for f in fields(StoreStats))

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
        ProcessCollector(registry=r)  # process_resident_memory_bytes and the like: a load test watches it
        self.requests = Counter(
            "tiermoe_requests",
            "Requests by endpoint and outcome (success, error, aborted: the client left)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tiermoe_prompt_tokens",
            "Prompt tokens prefilled, including those of aborted requests",
            registry=r,
        )
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
        self.queued = Gauge(
            "tiermoe_requests_queued", "Requests received and not yet handed to the engine", registry=r
        )
        self.waiting = Gauge(
            "tiermoe_requests_waiting",
            "Requests the engine holds back: no free sequence or KV blocks yet, or preempted",
            registry=r,
        )
        self.running = Gauge("tiermoe_requests_running", "Requests the engine is generating", registry=r)
        self.kv_usage = Gauge("tiermoe_kv_cache_usage", "Share of the KV cache's blocks in use", registry=r)
        self.step_batch = Histogram(
            "tiermoe_step_batch_size",
            "Sequences in each engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.expert_counts = Counter(
            "tiermoe_expert_store",
            "Expert-store counts summed over engine steps: hits and misses per tier, prefetches, bytes, seconds",
            ["stat"],
            registry=r,
        )
        self.expert_rates = Gauge(
            "tiermoe_expert_store_rate",
            "Expert-store rates since the server started: GPU and host hit rates, prefetch precision and recall",
            ["rate"],
            registry=r,
        )
        self._store_totals = StoreStats()

    def finished(self, endpoint: str, stats: GenerationStats) -> None:
        self.requests.labels(endpoint, "success").inc()
        self.ttft.observe(stats.ttft_s)
        self.prefill_speed.observe(stats.prefill_tok_s)
        if stats.completion_tokens > 1:  # one token has no decode step, so no speed
            self.decode_speed.observe(stats.decode_tok_s)

    def add_store_stats(self, step: StoreStats) -> None:
        """Add the expert store's counts of one engine step (all zero without the tiered store)."""
        self._store_totals = self._store_totals.plus(step)
        for name in _STORE_COUNTS:
            self.expert_counts.labels(name).inc(getattr(step, name))
        for name, value in self._store_totals.to_dict().items():
            if name not in _STORE_COUNTS and value is not None:  # the derived rates
                self.expert_rates.labels(name).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
