"""Both /metrics outputs (the gateway, and `engine serve`'s one-pool gateway) follow Prometheus naming, the
checks promtool's `check metrics` makes: `_total` only on counters, base units (seconds, bytes, no ms), and
every metric the chart's alerts and dashboard query exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, fake_settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "switchyard"


def _families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _check_naming(text: str) -> None:
    for name, kind in _families(text).items():
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", name), f"{name}: not a base unit"
        if kind != "counter":
            assert not name.endswith("_total"), f"{name} is a {kind} but ends in _total"
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.split()[3] == "counter":
            assert not line.split()[2].endswith("_total_total")


def engine_metrics_text(*records: tuple) -> str:
    """The Prometheus text after replica ``slm/0``'s stat logger recorded each (SchedulerStats, IterationStats),
    its naming checked."""
    from prometheus_client import CollectorRegistry, generate_latest

    from gateway.metrics import EngineMetrics

    registry = CollectorRegistry()
    logger = EngineMetrics(registry).stat_logger("slm", "slm/0", "tiny")
    for scheduler_stats, iteration_stats in records:
        logger.record(scheduler_stats, iteration_stats)
    text = generate_latest(registry).decode()
    _check_naming(text)
    return text


def replica_values(text: str, replica: str = "slm/0") -> dict[str, float]:
    """Sample name → value of one replica's series in a Prometheus text."""
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("replica") == replica}


def test_gateway_metrics_follow_prometheus_naming_and_cover_the_charts_queries(live_server):
    keys = [{"name": "a", "sha256": hash_api_key("sk-a"), "max_budget_usd": 1.0}]
    server = live_server(create_app(fake_settings(api_keys=keys), backend_factory=FakeFactory()))
    auth = {"authorization": "Bearer sk-a"}
    for model in ("auto", "slm", "nope"):
        httpx.post(server.base_url + "/v1/chat/completions", headers=auth,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    httpx.get(server.base_url + "/readyz")
    text = httpx.get(server.base_url + "/metrics").text
    _check_naming(text)
    exposed = set()  # sample names, also of labelled families that have no sample yet (guard off here)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in text_string_to_metric_families(text):
        exposed |= {s.name for s in family.samples}
        exposed |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    rules = (CHART / "templates" / "gateway-prometheusrule.yaml").read_text()
    dashboard = json.dumps(json.loads((CHART / "dashboards" / "switchyard.json").read_text()))
    queried = set(re.findall(r"switchyard_[a-z_]+", rules + dashboard))
    assert queried and queried <= exposed, sorted(queried - exposed)


def test_per_request_adders_and_observers_export_what_the_public_api_does():
    """Metrics.adder / observer (the per-request path) against prometheus_client's own inc / observe: the
    same exposition for the same calls, bucket edges, the +Inf bucket, NaN and a negative gauge step included."""
    from gateway.metrics import Metrics

    public, fast = Metrics(), Metrics()
    for v in (0.0, 0.0001, 0.004, 0.005, 0.0050001, 0.3, 2.5, 7.0, 1e9, float("nan")):
        public.child(public.latency, "slm").observe(v)
        fast.observer(fast.latency, "slm")(v)
        public.overhead.observe(v)
        fast.observer(fast.overhead)(v)
    for amount in (1, 3, 0.25):
        public.child(public.requests, "slm", "slm", "200").inc(amount)
        fast.adder(fast.requests, "slm", "slm", "200")(amount)
        public.always_llm_cost.inc(amount)
        fast.adder(fast.always_llm_cost)(amount)
        public.saved.inc(-amount)
        fast.adder(fast.saved)(-amount)

    def exposition(m: Metrics) -> list[str]:
        return [line for line in m.render().decode().splitlines() if "_created" not in line]

    assert exposition(fast) == exposition(public)
    assert any(line.startswith('switchyard_request_latency_seconds_bucket{le="+Inf",route="slm"} 9.0')
               for line in exposition(fast))
