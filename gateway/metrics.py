"""Prometheus metrics of one gateway (own registry per app: several apps in one process stay apart).

Names (all prefixed ``switchyard_``):
  requests_total{route,model,status}         requests by routing decision, answering pool, HTTP status
  request_latency_seconds{route}             end-to-end latency as the gateway saw it
  overhead_seconds                           gateway time not spent waiting on backends
  tokens_total{model,kind}                   kind = prompt | completion
  cost_usd_total{model}                      what the answered requests cost at the configured prices
  always_llm_cost_usd_total                  what the same tokens would have cost on the LLM pool
  saved_vs_always_llm_usd (gauge)            the difference (can be negative if escalations waste tokens)
  key_spend_usd_total{key}                   cost of answered requests per API key name (never the key)
  key_always_llm_cost_usd_total{key}         what the same key's tokens would have cost on the LLM pool
  key_tokens_total{key,kind}                 kind = prompt | completion
  guard_verdicts_total{label}                domain | ood | unsafe
  cascade_judged_total / cascade_escalations_total
  example_cache_lookups_total{result}        hit | miss
  example_cache_admits_total
  redis_failures_total{component}            rate_limiter | example_cache (read at scrape time)
  example_cache_events_total{event}          the example store's own counters (lookups, timeouts, evicted, ...)
  rate_limited_total
  artifact_reloads_total{result}             ok | failed (SIGHUP or POST /admin/reload)
  traffic_log_lines_total                    prompts recorded by the traffic log (opt-in)
  pool_healthy_replicas{pool}                read at scrape time
  pool_events_total{pool,event}              requests | failures | retries | failovers | ejections | no_replica
  classifier_batches_total{classifier}       guard | router: calls of the batch entry point (read at scrape time)
  classifier_requests_total{classifier}      requests they scored (requests / batches = mean batch size)

The embedded engine of each local replica (vLLM's metric names behind the ``switchyard_`` prefix; labels
``pool``, ``replica``, ``model_name``), recorded from the numbers the engine reports after every step
(``backends/engine/stats.py``) by ``EngineStatLogger``:
  time_to_first_token_seconds                histogram, arrival in the engine → first token
  inter_token_latency_seconds                histogram, between two tokens of one choice
  e2e_request_latency_seconds                histogram, arrival → last token (finished choices)
  request_queue_time_seconds                 histogram, arrival → first scheduled
  kv_cache_usage_perc                        gauge, fraction of KV blocks in use (0..1, as vLLM)
  num_requests_running / num_requests_waiting gauges
  prefix_cache_queries_total / prefix_cache_hits_total   prompt tokens looked up / found in the prefix cache
  num_preemptions_total, prompt_tokens_total, generation_tokens_total
  kv_retained_blocks                         gauge, KV blocks pinned for agent sessions paused on a tool
  kv_retained_hits_total                     prompt tokens a session's next request found in its retained blocks
  kv_retained_evicted_blocks_total           pinned blocks let go early because memory was short
  kv_offload_used_blocks                     gauge, KV blocks held in the host tier (kv_offload_gb)
  kv_offload_saved_blocks_total              blocks copied to the host tier when LRU evicted them from the pool
  external_prefix_cache_hits_total           prompt tokens found in blocks loaded back from the host tier (vLLM's
                                             name for hits served by its KV offloading connector; they are also
                                             in prefix_cache_hits_total)
  spec_decode_num_drafts_total               speculative drafts verified (one per sequence and step that drafted)
  spec_decode_num_draft_tokens_total         their tokens (n-gram speculation)
  spec_decode_num_accepted_tokens_total      of those, accepted (acceptance rate = accepted / draft tokens;
                                             mean acceptance length = 1 + accepted / drafts, as vLLM's)
  spec_decode_draft_tokens_by_source_total   the draft tokens again, label source = own (the sequence's prompt
  spec_decode_accepted_tokens_by_source_total  and output) | shared (the namespace's shared draft table)
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from backends.engine.stats import IterationStats, SchedulerStats

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
ENGINE_LABELS = ("pool", "replica", "model_name")
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
        batches = CounterMetricFamily("switchyard_classifier_batches", "batch calls of each classifier's "
                                      "batcher (classifiers.batching)", labels=["classifier"])
        scored = CounterMetricFamily("switchyard_classifier_requests", "requests scored by each classifier's "
                                     "batcher", labels=["classifier"])
        for name, (num_batches, num_items) in values.get("classifier_batches", {}).items():
            batches.add_metric([name], float(num_batches))
            scored.add_metric([name], float(num_items))
        yield batches
        yield scored
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
        self.saved = Gauge("switchyard_saved_vs_always_llm_usd", "always-LLM cost minus actual cost",
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
        self.artifact_reloads = Counter("switchyard_artifact_reloads", "artifact reloads (SIGHUP or POST "
                                        "/admin/reload)", ["result"], registry=r)
        self.traffic_logged = Counter("switchyard_traffic_log_lines", "prompts recorded by the traffic log",
                                      registry=r)
        self.budget_exceeded = Counter("switchyard_budget_exceeded", "requests refused by key budgets", registry=r)
        self.key_spend = Counter("switchyard_key_spend_usd", "cost of answered requests per API key name",
                                 ["key"], registry=r)
        self.key_always_llm_cost = Counter("switchyard_key_always_llm_cost_usd", "cost per API key name if every "
                                           "request went to the LLM", ["key"], registry=r)
        self.key_tokens = Counter("switchyard_key_tokens", "tokens per API key name", ["key", "kind"], registry=r)
        self.degraded = Gauge("switchyard_degraded", "1 while Redis is unreachable and the gateway serves without "
                              "it (limiter and example cache fail open), as of the last /readyz", registry=r)
        self.engine = EngineMetrics(r)
        self._callbacks: _Callbacks | None = None
        self._children: dict[tuple, Any] = {}  # labels() looked up once per label set (and adder / observer)
        self._per_request: dict[Any, tuple] = {}  # record_request's / record_usage's recorders by labels

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

    def adder(self, metric: Any, *labels: str) -> Callable[[float], None]:
        """``metric.labels(*labels).inc`` for the per-request counters, cached and without the public
        ``inc``'s per-call checks (that the child is a labelled child, that a Counter's amount is not
        negative: callers add only counts and costs). It is the value's own locked ``inc``, which the
        public one ends in (prometheus_client is pinned in pyproject.toml; tests compare both paths)."""
        key = (id(metric), labels, "inc")
        add = self._children.get(key)
        if add is None:
            child = metric.labels(*labels) if labels else metric
            child._raise_if_not_observable()
            add = self._children[key] = child._value.inc
        return add

    def observer(self, metric: Any, *labels: str) -> Callable[[float], None]:
        """``metric.labels(*labels).observe`` for a Histogram, cached: the bucket found by bisection, not
        by the public ``observe``'s loop over the bounds (same bucket: the first bound >= the amount)."""
        key = (id(metric), labels, "observe")
        observe = self._children.get(key)
        if observe is None:
            child = metric.labels(*labels) if labels else metric
            child._raise_if_not_observable()
            bounds, buckets, add_sum = list(child._upper_bounds), child._buckets, child._sum.inc

            def observe(amount: float) -> None:
                add_sum(amount)
                i = bisect_left(bounds, amount)
                if i < len(buckets) and amount <= bounds[i]:  # NaN lands in no bucket, as in observe()
                    buckets[i].inc(1)

            self._children[key] = observe
        return observe

    def record_request(self, *, route: str, model: str, status: int, latency_s: float,
                       overhead_s: float | None) -> None:
        recorders = self._per_request.get((route, model, status))
        if recorders is None:
            recorders = self._per_request[(route, model, status)] = (
                self.adder(self.requests, route, model, str(status)), self.observer(self.latency, route),
                self.observer(self.overhead))
        count, latency, overhead = recorders
        count(1)
        latency(latency_s)
        if overhead_s is not None:
            overhead(max(0.0, overhead_s))

    def record_usage(self, *, model: str, num_prompt_tokens: int, num_completion_tokens: int,
                     cost_usd: float, always_llm_cost_usd: float) -> None:
        adders = self._per_request.get(model)
        if adders is None:
            adders = self._per_request[model] = (
                self.adder(self.tokens, model, "prompt"), self.adder(self.tokens, model, "completion"),
                self.adder(self.cost, model), self.adder(self.always_llm_cost), self.adder(self.saved))
        prompt, completion, cost, always, saved = adders
        prompt(num_prompt_tokens)
        completion(num_completion_tokens)
        cost(cost_usd)
        always(always_llm_cost_usd)
        saved(always_llm_cost_usd - cost_usd)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineMetrics:
    """The embedded engines' metrics in one registry; ``stat_logger`` gives each replica its recorder."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r, labels = registry, ENGINE_LABELS
        self.ttft = Histogram("switchyard_time_to_first_token_seconds", "time to first token (engine)", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("switchyard_inter_token_latency_seconds", "inter-token latency (engine)", labels,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("switchyard_e2e_request_latency_seconds", "end-to-end latency of finished choices "
                             "(engine)", labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("switchyard_request_queue_time_seconds", "time waiting before first scheduled",
                               labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.kv_usage = Gauge("switchyard_kv_cache_usage_perc", "KV cache usage (1 = 100 percent)", labels,
                              registry=r)
        self.running = Gauge("switchyard_num_requests_running", "sequences running in the engine", labels,
                             registry=r)
        self.waiting = Gauge("switchyard_num_requests_waiting", "sequences waiting in the engine", labels,
                             registry=r)
        self.prefix_queries = Counter("switchyard_prefix_cache_queries", "prompt tokens looked up in the prefix "
                                      "cache", labels, registry=r)
        self.prefix_hits = Counter("switchyard_prefix_cache_hits", "prompt tokens found in the prefix cache",
                                   labels, registry=r)
        self.preemptions = Counter("switchyard_num_preemptions", "sequences preempted", labels, registry=r)
        self.prompt_tokens = Counter("switchyard_prompt_tokens", "prompt tokens prefilled (engine)", labels,
                                     registry=r)
        self.generation_tokens = Counter("switchyard_generation_tokens", "tokens generated (engine)", labels,
                                         registry=r)
        self.retained_blocks = Gauge("switchyard_kv_retained_blocks", "KV blocks pinned for paused agent "
                                     "sessions", labels, registry=r)
        self.retained_hits = Counter("switchyard_kv_retained_hits", "prompt tokens a session's next request "
                                     "found in the KV blocks it retained", labels, registry=r)
        self.retained_evicted = Counter("switchyard_kv_retained_evicted_blocks", "pinned KV blocks let go "
                                        "before expiry because memory was short", labels, registry=r)
        self.offload_blocks = Gauge("switchyard_kv_offload_used_blocks", "KV blocks held in the host tier",
                                    labels, registry=r)
        self.offload_saved = Counter("switchyard_kv_offload_saved_blocks", "KV blocks copied to the host tier "
                                     "when evicted from the pool", labels, registry=r)
        self.offload_hits = Counter("switchyard_external_prefix_cache_hits", "prompt tokens found in KV blocks "
                                    "loaded from the host tier", labels, registry=r)
        self.drafts = Counter("switchyard_spec_decode_num_drafts", "speculative drafts verified (sequences x steps)",
                              labels, registry=r)
        self.draft_tokens = Counter("switchyard_spec_decode_num_draft_tokens", "speculative draft tokens "
                                    "verified", labels, registry=r)
        self.accepted_tokens = Counter("switchyard_spec_decode_num_accepted_tokens", "speculative draft tokens "
                                       "accepted", labels, registry=r)
        self.draft_tokens_by_source = Counter("switchyard_spec_decode_draft_tokens_by_source", "speculative draft "
                                              "tokens verified, by where they were drafted from (own | shared)",
                                              [*labels, "source"], registry=r)
        self.accepted_tokens_by_source = Counter("switchyard_spec_decode_accepted_tokens_by_source", "speculative "
                                                 "draft tokens accepted, by where they were drafted from "
                                                 "(own | shared)", [*labels, "source"], registry=r)

    def stat_logger(self, pool: str, replica: str, model_name: str) -> EngineStatLogger:
        """The recorder of one replica (a ``backends.engine.stats.StatLogger``)."""
        return EngineStatLogger(self, (pool, replica, model_name))


class EngineStatLogger:
    """Records one engine's SchedulerStats / IterationStats (called on the engine thread after each step;
    prometheus_client's metrics are thread-safe). The labelled children are looked up once."""

    def __init__(self, metrics: EngineMetrics, labels: tuple[str, str, str]) -> None:
        m = metrics
        self.ttft, self.itl = m.ttft.labels(*labels), m.itl.labels(*labels)
        self.e2e, self.queue = m.e2e.labels(*labels), m.queue.labels(*labels)
        self.kv_usage, self.running, self.waiting = (m.kv_usage.labels(*labels), m.running.labels(*labels),
                                                     m.waiting.labels(*labels))
        self.prefix_queries, self.prefix_hits = m.prefix_queries.labels(*labels), m.prefix_hits.labels(*labels)
        self.preemptions = m.preemptions.labels(*labels)
        self.prompt_tokens, self.generation_tokens = (m.prompt_tokens.labels(*labels),
                                                      m.generation_tokens.labels(*labels))
        self.retained_blocks, self.retained_hits, self.retained_evicted = (
            m.retained_blocks.labels(*labels), m.retained_hits.labels(*labels), m.retained_evicted.labels(*labels))
        self.offload_blocks, self.offload_saved, self.offload_hits = (
            m.offload_blocks.labels(*labels), m.offload_saved.labels(*labels), m.offload_hits.labels(*labels))
        self.drafts, self.draft_tokens, self.accepted_tokens = (
            m.drafts.labels(*labels), m.draft_tokens.labels(*labels), m.accepted_tokens.labels(*labels))
        self.by_source = {source: (m.draft_tokens_by_source.labels(*labels, source),
                                   m.accepted_tokens_by_source.labels(*labels, source))
                          for source in ("own", "shared")}

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        s, it = scheduler_stats, iteration_stats
        self.kv_usage.set(s.kv_cache_usage)
        self.running.set(s.num_running_reqs)
        self.waiting.set(s.num_waiting_reqs)
        if s.prefix_cache_queries:
            self.prefix_queries.inc(s.prefix_cache_queries)
            self.prefix_hits.inc(s.prefix_cache_hits)
        if s.num_preemptions:
            self.preemptions.inc(s.num_preemptions)
        self.retained_blocks.set(s.num_retained_blocks)
        if s.retained_hits:
            self.retained_hits.inc(s.retained_hits)
        if s.num_retained_evicted_blocks:
            self.retained_evicted.inc(s.num_retained_evicted_blocks)
        self.offload_blocks.set(s.num_offload_blocks)
        if s.offload_saved_blocks:
            self.offload_saved.inc(s.offload_saved_blocks)
        if s.offload_hits:
            self.offload_hits.inc(s.offload_hits)
        if it.num_prompt_tokens:
            self.prompt_tokens.inc(it.num_prompt_tokens)
        if it.num_generation_tokens:
            self.generation_tokens.inc(it.num_generation_tokens)
        if it.num_draft_tokens:
            self.drafts.inc(it.num_drafts)
            self.draft_tokens.inc(it.num_draft_tokens)
            self.accepted_tokens.inc(it.num_accepted_tokens)
            for source, drafted, accepted in (
                    ("own", it.num_draft_tokens - it.num_shared_draft_tokens,
                     it.num_accepted_tokens - it.num_shared_accepted_tokens),
                    ("shared", it.num_shared_draft_tokens, it.num_shared_accepted_tokens)):
                self.by_source[source][0].inc(drafted)
                self.by_source[source][1].inc(accepted)
        for value in it.time_to_first_tokens_s:
            self.ttft.observe(value)
        for value in it.inter_token_latencies_s:
            self.itl.observe(value)
        for finished in it.finished_requests:
            self.e2e.observe(finished.e2e_latency_s)
            self.queue.observe(finished.queue_time_s)
