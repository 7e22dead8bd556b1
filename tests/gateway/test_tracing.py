"""OpenTelemetry spans of the request path (`opentelemetry: true`, gateway/tracing.py), caught by the SDK's
in-memory exporter: one request → the request span with its admission, guard, routing, cache and backend
spans, under the client's `traceparent`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, FakeGuard, bow_embed, fake_settings, wait_until

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID, PARENT_ID = "a" * 32, "b" * 16
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STAGES = ("switchyard.admission", "switchyard.guard", "switchyard.routing", "switchyard.cache", "switchyard.backend")


def _memory_provider():
    """A TracerProvider whose spans land in an InMemorySpanExporter (skips without the otel extra)."""
    pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed (pip install -e '.[otel]')")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _traced_gateway(live_server, **overrides):
    from gateway.wiring import build_pipeline

    provider, exporter = _memory_provider()

    def build(settings):
        pipeline = build_pipeline(settings, backend_factory=FakeFactory(), embed=bow_embed)
        pipeline.guard = FakeGuard()
        return pipeline

    settings = fake_settings(opentelemetry=True, api_keys=[{"name": "team-a", "sha256": hash_api_key("sk-a")}],
                             example_cache={"enabled": True, "backend": "memory", "top_k": 2}, **overrides)
    server = live_server(create_app(settings, pipeline_factory=build, tracer_provider=provider))
    return server, exporter


def _chat(server, text: str, **extra):
    return httpx.post(server.base_url + "/v1/chat/completions",
                      headers={"authorization": "Bearer sk-a", "traceparent": TRACEPARENT},
                      json={"model": "auto", "messages": [{"role": "user", "content": text}], **extra})


def _switchyard_spans(exporter, expected: int) -> list:
    def finished():
        spans = [s for s in exporter.get_finished_spans() if s.name.startswith("switchyard.")]
        return spans if len(spans) >= expected else None

    return wait_until(finished, f"{expected} switchyard spans")


def test_one_request_has_the_stage_spans_under_a_request_span_in_the_clients_trace(live_server):
    server, exporter = _traced_gateway(live_server)
    r = _chat(server, "unsure about this one")  # slm_then_escalate: the SLM's answer is judged and escalated
    assert r.status_code == 200 and r.headers["x-switchyard-model"] == "llm"
    spans = _switchyard_spans(exporter, 7)
    by_name: dict[str, list] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert sorted(by_name) == sorted(["switchyard.request", *STAGES])
    (request,) = by_name["switchyard.request"]
    assert len(by_name["switchyard.backend"]) == 2  # the SLM's call, then the LLM's
    stages = [s for s in spans if s is not request]
    assert all(s.parent.span_id == request.context.span_id for s in stages)
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}  # the client's trace id, honoured
    # request span → FastAPI's HTTP server span → the client's span (the traceparent's parent id)
    server_span = wait_until(lambda: next((s for s in exporter.get_finished_spans()
                                           if s.context.span_id == request.parent.span_id), None),
                             "FastAPI's server span")  # it ends once the response is sent
    assert server_span.parent.span_id == int(PARENT_ID, 16) and server_span.parent.is_remote
    # the stages in request order
    firsts = [min(by_name[name], key=lambda s: s.start_time).start_time for name in STAGES]
    assert firsts == sorted(firsts)
    slm, llm = sorted(by_name["switchyard.backend"], key=lambda s: s.start_time)
    assert (slm.attributes["switchyard.pool"], llm.attributes["switchyard.pool"]) == ("slm", "llm")
    assert slm.attributes["gen_ai.usage.output_tokens"] == llm.attributes["gen_ai.usage.output_tokens"] == 7
    attrs = request.attributes
    assert (attrs["switchyard.route"], attrs["switchyard.pool"], attrs["switchyard.guard"],
            attrs["switchyard.escalated"], attrs["switchyard.key"]) == ("slm_then_escalate", "llm", "domain", True,
                                                                       "team-a")
    assert attrs["gen_ai.usage.input_tokens"] == 5 and attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["http.response.status_code"] == 200 and attrs["switchyard.request_id"] == r.headers["x-request-id"]
    assert by_name["switchyard.guard"][0].attributes["switchyard.guard"] == "domain"
    routing = by_name["switchyard.routing"][0].attributes
    assert (routing["switchyard.route"], routing["switchyard.pool"]) == ("slm_then_escalate", "slm")
    assert by_name["switchyard.cache"][0].attributes["switchyard.num_examples"] == 0
    assert by_name["switchyard.admission"][0].attributes["switchyard.key"] == "team-a"
    assert "sk-a" not in json.dumps([dict(s.attributes) for s in exporter.get_finished_spans()])


def test_refused_and_streamed_requests_end_their_spans(live_server):
    server, exporter = _traced_gateway(live_server)
    assert _chat(server, "how to build a bomb").status_code == 400  # the guard's verdict: unsafe → reject
    spans = _switchyard_spans(exporter, 3)
    assert sorted(s.name for s in spans) == ["switchyard.admission", "switchyard.guard", "switchyard.request"]
    request = next(s for s in spans if s.name == "switchyard.request")
    assert request.attributes["http.response.status_code"] == 400 and request.attributes["switchyard.guard"] == "unsafe"
    exporter.clear()
    with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                      headers={"authorization": "Bearer sk-a", "traceparent": TRACEPARENT},
                      json={"model": "llm", "stream": True, "messages": [{"role": "user", "content": "hi there"}],
                            "stream_options": {"include_usage": True}}) as r:
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    spans = _switchyard_spans(exporter, 5)  # an explicit pool: no cache lookup (only the SLM gets examples)
    assert sorted(s.name for s in spans) == ["switchyard.admission", "switchyard.backend", "switchyard.guard",
                                             "switchyard.request", "switchyard.routing"]
    request = next(s for s in spans if s.name == "switchyard.request")
    backend = next(s for s in spans if s.name == "switchyard.backend")
    assert request.attributes["gen_ai.usage.output_tokens"] == 5 and request.attributes["switchyard.route"] == "explicit"
    assert backend.end_time <= request.end_time and backend.attributes["gen_ai.usage.output_tokens"] == 5


def test_without_a_current_span_the_request_span_continues_the_traceparent():
    from gateway.pipeline import Job
    from gateway.settings import settings_from_dict
    from gateway.tracing import Tracing

    provider, exporter = _memory_provider()
    settings = settings_from_dict({"pools": [{"name": "slm", "model": "m"}, {"name": "llm", "model": "m"}],
                                   "opentelemetry": True})
    tracing = Tracing.from_settings(settings, provider)
    job = Job(kind="chat", model="auto", messages=[], prompt=None, sampling=None, traceparent=TRACEPARENT)
    spans = tracing.begin(job)
    spans.end(spans.start("admission"), key="k")
    open_stage = spans.start("guard")
    spans.error(ValueError("boom"))
    spans.finish(429, {"route": "error", "pool": "-"})
    request, admission, guard = (next(s for s in exporter.get_finished_spans() if s.name == f"switchyard.{n}")
                                 for n in ("request", "admission", "guard"))
    assert request.parent.span_id == int(PARENT_ID, 16) and request.context.trace_id == int(TRACE_ID, 16)
    assert admission.parent.span_id == guard.parent.span_id == request.context.span_id
    assert guard.status.status_code.name == "ERROR" and guard.end_time is not None and open_stage.end_time
    assert request.attributes["switchyard.route"] == "error" and "switchyard.guard" not in request.attributes
    job = Job(kind="chat", model="auto", messages=[], prompt=None, sampling=None)
    tracing.begin(job).finish(200, {})
    fresh = exporter.get_finished_spans()[-1]
    assert fresh.parent is None and fresh.context.trace_id != int(TRACE_ID, 16)  # a new trace


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps the span names of every ExportTraceServiceRequest it is sent."""

    names: list[str] = []
    paths: list[str] = []

    def do_POST(self):  # noqa: N802
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        self.paths.append(self.path)
        self.names.extend(span.name for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_spans_are_exported_over_otlp_http_to_the_configured_endpoint(live_server, monkeypatch):
    """No provider given and none configured globally: the gateway's own, exporting to OTEL_EXPORTER_OTLP_ENDPOINT."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter", reason="the otel extra")
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    _Collector.names, _Collector.paths = [], []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the batch processor's export period (ms)
    try:
        server = live_server(create_app(fake_settings(opentelemetry=True), backend_factory=FakeFactory()))
        assert httpx.post(server.base_url + "/v1/chat/completions", headers={"traceparent": TRACEPARENT},
                          json={"model": "slm", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        wait_until(lambda: {"switchyard.request", "switchyard.backend"} <= set(_Collector.names), "exported spans")
    finally:
        collector.shutdown()
        collector.server_close()
    assert set(_Collector.paths) == {"/v1/traces"}
    assert {"switchyard.admission", "switchyard.routing"} <= set(_Collector.names)


MISSING = ("opentelemetry.sdk", "opentelemetry.sdk.trace", "opentelemetry.sdk.trace.export", "opentelemetry.sdk.resources",
           "opentelemetry.exporter", "opentelemetry.exporter.otlp.proto.http.trace_exporter")
SERVE = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # the otel extra is not installed, as far as imports can tell
from training.cli import main
sys.exit(main(["serve", "--config", sys.argv[2]]))
"""


def test_flag_on_without_the_extra_fails_at_start_in_one_line(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("pools:\n  - {name: slm, kind: remote, model: s, urls: ['http://127.0.0.1:9/v1']}\n"
                      "  - {name: llm, kind: remote, model: l, urls: ['http://127.0.0.1:9/v1']}\n"
                      "example_cache: {enabled: false}\nopentelemetry: true\n")
    proc = subprocess.run([sys.executable, "-c", SERVE, ",".join(MISSING), str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "switchyard: error: opentelemetry: true needs the OpenTelemetry SDK and OTLP exporter: "
        "pip install 'switchyard[otel]'"]


def test_flag_off_builds_no_tracing(live_server):
    app = create_app(fake_settings(), backend_factory=FakeFactory())
    server = live_server(app)
    assert httpx.post(server.base_url + "/v1/chat/completions",
                      json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert app.state.pipeline.tracing is None
    assert app._telemetry["tracing"] is False  # FastAPI's own per-request check is off too
