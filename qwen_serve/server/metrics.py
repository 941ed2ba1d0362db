"""Prometheus metrics for `/metrics`, in a registry of their own (never the process-global one).

Engine gauges (running / waiting requests, KV blocks, prefix-cache counters) are read from the
engine's latest `EngineStats` snapshot at scrape time; request counters and latency histograms are
updated by the serving code as requests finish; an ASGI middleware counts responses by HTTP status.
Latencies are measured in the server (arrival at the HTTP layer to token delivery), which is what a
client sees, queueing included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_serve.engine.outputs import EngineStats

PREFIX = "qwen_serve"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; values only exist once the model is loaded

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:
            return
        yield GaugeMetricFamily(f"{PREFIX}_num_requests_running", "requests in the running batch", value=s.num_running)
        yield GaugeMetricFamily(f"{PREFIX}_num_requests_waiting", "requests waiting to be scheduled", value=s.num_waiting)
        yield GaugeMetricFamily(f"{PREFIX}_kv_blocks_total", "KV-cache blocks", value=s.num_kv_blocks_total)
        yield GaugeMetricFamily(f"{PREFIX}_kv_blocks_free", "KV-cache blocks free or evictable", value=s.num_kv_blocks_free)
        used = 1.0 - s.num_kv_blocks_free / s.num_kv_blocks_total if s.num_kv_blocks_total else 0.0
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_perc", "fraction of KV-cache blocks in use (0..1)", value=used)
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                  value=s.prefix_cache_queries)
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_hits", "prompt tokens found in the prefix cache",
                                  value=s.prefix_cache_hits)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield GaugeMetricFamily(f"{PREFIX}_prefix_cache_hit_rate", "prefix-cache hits / queries since start", value=rate)
        yield CounterMetricFamily(f"{PREFIX}_num_preemptions", "requests preempted for KV-cache space",
                                  value=s.num_preemptions)
        if s.speculative:  # vLLM's spec_decode counters, and the two figures they give
            yield CounterMetricFamily(f"{PREFIX}_spec_decode_num_drafts", "sequence steps that verified drafts",
                                      value=s.spec_num_drafts)
            yield CounterMetricFamily(f"{PREFIX}_spec_decode_num_draft_tokens", "draft tokens proposed",
                                      value=s.spec_num_draft_tokens)
            yield CounterMetricFamily(f"{PREFIX}_spec_decode_num_accepted_tokens", "draft tokens accepted",
                                      value=s.spec_num_accepted_tokens)
            rate = s.spec_num_accepted_tokens / s.spec_num_draft_tokens if s.spec_num_draft_tokens else 0.0
            yield GaugeMetricFamily(f"{PREFIX}_spec_decode_acceptance_rate", "draft tokens accepted / proposed",
                                    value=rate)
            mean = 1 + s.spec_num_accepted_tokens / s.spec_num_drafts if s.spec_num_drafts else 0.0
            yield GaugeMetricFamily(f"{PREFIX}_spec_decode_mean_acceptance_length",
                                    "tokens a drafted step adds to a sequence, on average (1 + accepted / drafts)",
                                    value=mean)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=r)
        self.requests_finished = Counter(f"{PREFIX}_requests_finished", "finished requests by finish reason",
                                         ["finished_reason"], registry=r)
        self.http_responses = Counter(f"{PREFIX}_http_responses", "HTTP responses by status code", ["status"],
                                      registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "mean time between output tokens, per request",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))

    def observe_finished(
        self, *, finish_reasons: list[str], prompt_tokens: int, generation_tokens: int,
        ttft: float | None, e2e: float,
    ) -> None:
        """One engine request ended (finished, aborted or failed); finish_reasons has one per sample."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        for reason in finish_reasons:
            self.requests_finished.labels(finished_reason=reason).inc()
        if ttft is not None:
            self.ttft.observe(ttft)
            self.e2e.observe(e2e)
            if generation_tokens > 1:
                self.tpot.observe((e2e - ttft) / (generation_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusCounterMiddleware:
    """Counts every HTTP response by status (errors raised before a handler runs included)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_responses.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
