"""The decision log: one JSON line per request, whatever its outcome; x-request-id accepted or made, echoed."""

from __future__ import annotations

import json
import time

import httpx

from gateway.app import create_app
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, fake_local_real_remote, fake_settings

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello there"}]}


def _lines(path, expected: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= expected or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_one_line_per_request_with_the_decision(live_server, tmp_path):
    log = tmp_path / "decisions.jsonl"
    keys = [{"name": "team-a", "sha256": hash_api_key("sk-a")}]
    server = live_server(create_app(fake_settings(api_keys=keys, decision_log={"path": str(log)}),
                                    backend_factory=FakeFactory()))
    auth = {"authorization": "Bearer sk-a"}
    ok = httpx.post(server.base_url + "/v1/chat/completions", json=CHAT, headers={**auth, "x-request-id": "abc-123"})
    assert ok.headers["x-request-id"] == "abc-123"
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**CHAT, "stream": True},
                      headers=auth) as r:
        streamed_id = r.headers["x-request-id"]
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    denied = httpx.post(server.base_url + "/v1/chat/completions", json=CHAT)  # no key
    bad = httpx.post(server.base_url + "/v1/chat/completions", json={"model": 5}, headers=auth)
    msg = httpx.post(server.base_url + "/v1/messages", headers={"x-api-key": "sk-a"},
                     json={"model": "slm", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert (denied.status_code, bad.status_code, msg.status_code) == (401, 400, 200)
    assert len(denied.headers["x-request-id"]) == 24  # made by the gateway (per-process prefix + counter)
    lines = _lines(log, 5)
    assert len(lines) == 5
    by_id = {line["request_id"]: line for line in lines}
    first = by_id["abc-123"]
    assert first["key"] == "team-a" and first["endpoint"] == "/v1/chat/completions" and first["status"] == 200
    assert first["route"] == "slm_then_escalate" and first["pool"] == "slm" and first["guard"] == "off"
    assert first["escalated"] is False and first["completion_tokens"] == 5 and first["cost_usd"] > 0
    assert first["latency_ms"] > 0 and first["overhead_ms"] is not None
    assert by_id[streamed_id]["status"] == 200 and by_id[streamed_id]["completion_tokens"] == 5
    assert by_id[denied.headers["x-request-id"]]["status"] == 401
    assert by_id[bad.headers["x-request-id"]]["status"] == 400
    assert by_id[msg.headers["x-request-id"]]["endpoint"] == "/v1/messages"
    assert "sk-a" not in log.read_text()


def test_sample_zero_logs_nothing(live_server, tmp_path):
    log = tmp_path / "decisions.jsonl"
    server = live_server(create_app(fake_settings(decision_log={"path": str(log), "sample": 0.0}),
                                    backend_factory=FakeFactory()))
    assert httpx.post(server.base_url + "/v1/chat/completions", json=CHAT).status_code == 200
    assert not log.exists() or log.read_text() == ""


def test_request_id_and_traceparent_reach_a_remote_pool(live_server):
    import re

    from bench.fake_upstream import FakeUpstream

    upstream_app = FakeUpstream()
    upstream = live_server(upstream_app)
    pools = [{"name": "slm", "model": "fake-slm"}, {"name": "llm", "model": "fake-llm"},
             {"name": "cloud", "kind": "remote", "model": "m", "urls": [upstream.base_url + "/v1"]}]

    server = live_server(create_app(fake_settings(pools=pools), backend_factory=fake_local_real_remote))
    parent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    body = {**CHAT, "model": "cloud"}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body,
                   headers={"x-request-id": "req-42", "traceparent": parent})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    sent = upstream_app.last_headers
    assert sent["x-request-id"] == "req-42"
    assert re.fullmatch("00-" + "a" * 32 + "-[0-9a-f]{16}-01", sent["traceparent"])  # same trace, this hop
    assert sent["traceparent"] != parent
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers={"traceparent": "garbage"})
    assert upstream_app.last_headers["x-request-id"] == r.headers["x-request-id"]
    assert re.fullmatch("00-[0-9a-f]{32}-[0-9a-f]{16}-01", upstream_app.last_headers["traceparent"])  # a new trace
