"""Prometheus metrics of one gateway (own registry per app: several apps in one process stay apart).

Names (all prefixed ``switchyard_``):
  requests_total{route,model,status}         requests by routing decision, answering pool, HTTP status
  request_latency_seconds{route}             end-to-end latency as the gateway saw it
  overhead_seconds                           gateway time not spent waiting on backends
  tokens_total{model,kind}                   kind = prompt | completion
  cost_usd_total{model}                      what the answered requests cost at the configured prices
  always_llm_cost_usd_total                  what the same tokens would have cost on the LLM pool
  saved_vs_always_llm_usd_total              the difference (can be negative if escalations waste tokens)
  guard_verdicts_total{label}                domain | ood | unsafe
  cascade_judged_total / cascade_escalations_total
  example_cache_lookups_total{result}        hit | miss
  example_cache_admits_total
  redis_failures_total{component}            rate_limiter | example_cache (read at scrape time)
  example_cache_events_total{event}          the example store's own counters (lookups, timeouts, evicted, ...)
  rate_limited_total
  pool_healthy_replicas{pool}                read at scrape time
  pool_events_total{pool,event}              requests | failures | retries | failovers | ejections | no_replica
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class _Callbacks:
    """Values read from other components at scrape time (no background polling)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self):  # noqa: ANN201 - prometheus_client collector protocol
        values = self._read()
        failures = CounterMetricFamily("switchyard_redis_failures", "Redis calls that failed or timed out",
                                       labels=["component"])
        for component, n in values.get("redis_failures", {}).items():
            failures.add_metric([component], float(n))
        yield failures
        healthy = GaugeMetricFamily("switchyard_pool_healthy_replicas", "healthy replicas per pool",
                                    labels=["pool"])
        for pool, n in values.get("healthy_replicas", {}).items():
            healthy.add_metric([pool], float(n))
        yield healthy
        pool_events = CounterMetricFamily("switchyard_pool_events", "pool counters: requests, failures, retries, "
                                          "failovers, ejections, no_replica", labels=["pool", "event"])
        for pool, events in values.get("pool_events", {}).items():
            for event, n in events.items():
                pool_events.add_metric([pool, event], float(n))
        yield pool_events
        cache = CounterMetricFamily("switchyard_example_cache_events", "example-store counters (store.stats)",
                                    labels=["event"])
        for event, n in values.get("example_cache", {}).items():
            cache.add_metric([event], float(n))
        yield cache


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("switchyard_requests", "requests", ["route", "model", "status"], registry=r)
        self.latency = Histogram("switchyard_request_latency_seconds", "end-to-end latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("switchyard_overhead_seconds", "gateway time not spent waiting on backends",
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.tokens = Counter("switchyard_tokens", "tokens", ["model", "kind"], registry=r)
        self.cost = Counter("switchyard_cost_usd", "cost of answered requests", ["model"], registry=r)
        self.always_llm_cost = Counter("switchyard_always_llm_cost_usd", "cost if every request went to the LLM",
                                       registry=r)
        self.saved = Gauge("switchyard_saved_vs_always_llm_usd_total", "always-LLM cost minus actual cost",
                           registry=r)
        self.guard = Counter("switchyard_guard_verdicts", "guard verdicts", ["label"], registry=r)
        self.cascade_judged = Counter("switchyard_cascade_judged", "SLM answers judged by the cascade",
                                      registry=r)
        self.escalations = Counter("switchyard_cascade_escalations", "SLM answers escalated to the LLM",
                                   registry=r)
        self.cache_lookups = Counter("switchyard_example_cache_lookups", "example-cache lookups", ["result"],
                                     registry=r)
        self.cache_admits = Counter("switchyard_example_cache_admits", "LLM answers admitted", registry=r)
        self.rate_limited = Counter("switchyard_rate_limited", "requests refused by rate limits", registry=r)
        self.budget_exceeded = Counter("switchyard_budget_exceeded", "requests refused by key budgets", registry=r)
        self.key_spend = Counter("switchyard_key_spend_usd", "cost of answered requests per API key name",
                                 ["key"], registry=r)
        self.key_tokens = Counter("switchyard_key_tokens", "tokens per API key name", ["key", "kind"], registry=r)
        self.degraded = Gauge("switchyard_degraded", "1 while Redis is unreachable and the gateway serves without "
                              "it (limiter and example cache fail open), as of the last /readyz", registry=r)
        self._callbacks: _Callbacks | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # labels() looked up once per label set

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (prometheus_client validates and locks on every call)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def read_at_scrape(self, read: Callable[[], dict[str, Any]]) -> None:
        """Register ``read() -> {"redis_failures": {component: n}, "healthy_replicas": {pool: n}}``."""
        if self._callbacks is None:
            self._callbacks = _Callbacks(read)
            self.registry.register(self._callbacks)

    def record_request(self, *, route: str, model: str, status: int, latency_s: float,
                       overhead_s: float | None) -> None:
        self.child(self.requests, route, model, str(status)).inc()
        self.child(self.latency, route).observe(latency_s)
        if overhead_s is not None:
            self.overhead.observe(max(0.0, overhead_s))

    def record_usage(self, *, model: str, num_prompt_tokens: int, num_completion_tokens: int,
                     cost_usd: float, always_llm_cost_usd: float) -> None:
        self.child(self.tokens, model, "prompt").inc(num_prompt_tokens)
        self.child(self.tokens, model, "completion").inc(num_completion_tokens)
        self.child(self.cost, model).inc(cost_usd)
        self.always_llm_cost.inc(always_llm_cost_usd)
        self.saved.inc(always_llm_cost_usd - cost_usd)

    def render(self) -> bytes:
        return generate_latest(self.registry)
