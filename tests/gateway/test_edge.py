"""The HTTP edge against a live uvicorn server: each fault of issue 25 (F1-F7, B1) with the answer it
must get. Raw sockets where a client misbehaves below HTTP (stalls, leaves mid-upload)."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, fake_local_real_remote, fake_settings, requests_total

CHAT = {"model": "slm", "messages": [{"role": "user", "content": "hello"}]}


def _wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _raw(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + body)
    return sock


def _head(path: str, content_length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {content_length}\r\n{extra}\r\n").encode()


def _no_tracebacks(caplog) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_client_leaving_during_upload_is_499_once_without_traceback(live_server, caplog):
    """F1: FastLane did not map Starlette's ClientDisconnect (traceback, counted as 500)."""
    caplog.set_level(logging.INFO)
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    sock = _raw(server.port, _head("/v1/chat/completions", 5000), b'{"model": "slm", "mess')
    sock.close()
    counts = _wait_for(lambda: (c := requests_total(server.base_url)).get(("error", "-", "499")) and c,
                       "the 499 to be counted")
    assert counts == {("error", "-", "499"): 1.0}
    assert any("client left" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    _no_tracebacks(caplog)
    assert httpx.post(server.base_url + "/v1/chat/completions", json=CHAT).status_code == 200


def test_stalled_body_is_timed_out_with_408_and_closed(live_server):
    """F2: headers then a stalled body held the socket forever (slowloris)."""
    settings = fake_settings(limits={"body_read_timeout_s": 0.3})
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    sock = _raw(server.port, _head("/v1/chat/completions", 200), b'{"model": ')
    reply = b""
    while True:  # the server answers and closes: recv returns b"" at the end
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    sock.close()
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"code":"request_timeout"' in rest and b"body_read_timeout_s" in rest
    assert requests_total(server.base_url).get(("error", "-", "408")) == 1.0


def test_readiness_hides_addresses_and_credentials(live_server):
    """F3: /readyz answered every upstream URL, credentials included, to anyone."""
    pools = [{"name": "slm", "model": "fake-slm"}, {"name": "llm", "model": "fake-llm"},
             {"name": "cloud", "kind": "remote", "model": "m",
              "urls": ["http://user:s3cret@127.0.0.1:9/v1?api_key=hunter2"]}]
    keys = [{"name": "ops", "sha256": hash_api_key("sk-ops"), "admin": True},
            {"name": "app", "sha256": hash_api_key("sk-app")}]
    settings = fake_settings(pools=pools, api_keys=keys)
    server = live_server(create_app(settings, backend_factory=fake_local_real_remote))
    for headers in ({}, {"authorization": "Bearer sk-app"}, {"authorization": "Bearer sk-wrong"}):
        body = httpx.get(server.base_url + "/readyz", headers=headers).text
        assert "127.0.0.1" not in body and "s3cret" not in body and "hunter2" not in body, body
        assert '"slm":{"healthy_replicas":1,"replicas":1}' in body.replace(" ", "")
    admin = httpx.get(server.base_url + "/readyz", headers={"authorization": "Bearer sk-ops"}).json()
    assert list(admin["replicas"]["cloud"]) == ["http://127.0.0.1:9/v1"]


def test_upstream_failure_body_names_the_pool_not_the_address(live_server, caplog):
    """F3: 502/504 bodies carried the upstream address and the exception's text."""
    pools = [{"name": "slm", "model": "fake-slm"}, {"name": "llm", "model": "fake-llm"},
             {"name": "cloud", "kind": "remote", "model": "m", "urls": ["http://127.0.0.1:9/v1"],
              "max_retries": 0}]
    server = live_server(create_app(fake_settings(pools=pools), backend_factory=fake_local_real_remote))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code in (502, 503)
    message = e.value.response.json()["error"]["message"]
    assert "'cloud'" in message and "127.0.0.1" not in message and "Error" not in message, message


def test_client_leaving_a_stream_is_counted_499(live_server, caplog):
    """F4: a client that left a stream mid-way was counted as status 200."""
    caplog.set_level(logging.INFO)
    factory = FakeFactory()
    server = live_server(create_app(fake_settings(), backend_factory=factory))
    with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                      json={**CHAT, "messages": [{"role": "user", "content": "slow"}], "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    counts = _wait_for(lambda: (c := requests_total(server.base_url)).get(("explicit", "slm", "499")) and c,
                       "the stream's 499")
    assert counts == {("explicit", "slm", "499"): 1.0}
    _wait_for(lambda: factory.backends["slm"][0].num_aborted == 1, "the backend request to be aborted")
    _no_tracebacks(caplog)


@pytest.mark.parametrize(("field", "value"), [
    ("stream", "yes"), ("n", "2"), ("temperature", "0.5"), ("max_tokens", 4.5), ("logprobs", 1),
    ("top_logprobs", "3"), ("stop", ""), ("stop", ["a", "b", "c", "d", "e"]), ("seed", "7"), ("user", 5),
])
def test_loose_json_types_are_400(live_server, field, value):
    """F5: "stream": "yes", "n": "2", "temperature": "0.5" were coerced and answered 200."""
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    r = httpx.post(server.base_url + "/v1/chat/completions", json={**CHAT, **extra, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and field in r.json()["error"]["message"]


def test_completion_echo_must_be_false_not_zero(live_server):
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    body = {"model": "slm", "prompt": "Once", "max_tokens": 4}
    assert httpx.post(server.base_url + "/v1/completions", json={**body, "echo": 0}).status_code == 400
    assert httpx.post(server.base_url + "/v1/completions", json={**body, "echo": False}).status_code == 200
    assert httpx.post(server.base_url + "/v1/completions", json={**body, "prompt": ["a", "b"]}).status_code == 400


def test_trailing_slash_is_404_not_a_redirect(live_server):
    """F6: POST /v1/chat/completions/ was a 307 built from the Host header."""
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    for path in ("/v1/chat/completions/", "/v1/completions/", "/v1/models/"):
        r = httpx.post(server.base_url + path, json=CHAT, headers={"host": "evil.example"})
        assert r.status_code in (404, 405) and "location" not in r.headers, (path, r.status_code)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_key_checked_before_the_body(live_server):
    """F7: an anonymous caller with a bad body got a 400 describing the schema instead of a 401."""
    keys = [{"name": "app", "sha256": hash_api_key("sk-app")}]
    server = live_server(create_app(fake_settings(api_keys=keys), backend_factory=FakeFactory()))
    for body in (b"{not json", b'{"model": 5}', b""):
        r = httpx.post(server.base_url + "/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json", "authorization": "Bearer sk-app"})
    assert r.status_code == 400


def test_max_strong_share_body_hint_is_accepted_and_applied(live_server):
    """B1: the documented {"switchyard": {"max_strong_share": 0.2}} was rejected with 400."""
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    auto = {**CHAT, "model": "auto"}
    plain = httpx.post(server.base_url + "/v1/chat/completions", json=auto)
    assert plain.headers["x-switchyard-route"] == "slm_then_escalate"  # no router: cascade on confidence
    capped = httpx.post(server.base_url + "/v1/chat/completions", json={**auto, "switchyard": {"max_strong_share": 0}})
    assert capped.status_code == 200 and capped.headers["x-switchyard-route"] == "slm"
    assert "max_strong_share=0" in capped.json()["switchyard"]["reason"]
    bad = httpx.post(server.base_url + "/v1/chat/completions", json={**auto, "switchyard": {"max_strong_share": 2}})
    assert bad.status_code == 400 and "max_strong_share" in bad.json()["error"]["message"]
