"""Every error class → the official SDK's exception (live uvicorn, fake replicas)."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, fake_settings

KEYS = [
    {"name": "alice", "sha256": hash_api_key("sk-alice"), "requests_per_minute": 3},
    {"name": "bob", "sha256": hash_api_key("sk-bob"), "models": ["slm"], "tokens_per_minute": 10},
]


def _client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def _chat(client, model="slm", content="hello"):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}])


def test_missing_wrong_key_forbidden_model(live_server):
    server = live_server(create_app(fake_settings(api_keys=KEYS), backend_factory=FakeFactory()))
    with pytest.raises(openai.AuthenticationError) as e:
        _chat(_client(server, "sk-wrong"))
    assert e.value.code == "invalid_api_key"
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "slm", "messages": [
        {"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.PermissionDeniedError):
        _chat(_client(server, "sk-bob"), model="llm")
    assert [m.id for m in _client(server, "sk-bob").models.list()] == ["slm"]
    with pytest.raises(openai.AuthenticationError):
        _client(server, "sk-nope").models.list()


def test_requests_per_minute_in_process(live_server):
    server = live_server(create_app(fake_settings(api_keys=KEYS), backend_factory=FakeFactory()))
    alice = _client(server, "sk-alice")
    for _ in range(3):
        _chat(alice)
    with pytest.raises(openai.RateLimitError) as e:
        _chat(alice)
    assert e.value.code == "rate_limit_requests"
    assert int(e.value.response.headers["retry-after"]) >= 1
    _chat(_client(server, "sk-bob"))  # other keys are not affected
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "switchyard_rate_limited_total 1.0" in metrics
    assert 'switchyard_requests_total{model="-",route="error",status="429"} 1.0' in metrics


def test_tokens_per_minute_with_redis_counters(live_server, redis_url):
    settings = fake_settings(api_keys=KEYS, redis_url=redis_url)
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    bob = _client(server, "sk-bob")
    _chat(bob, content="one two three four")  # 5 prompt + 7 completion tokens >= 10
    import time

    deadline = time.monotonic() + 5
    with pytest.raises(openai.RateLimitError) as e:  # noqa: PT012 - counters are recorded after the response
        while time.monotonic() < deadline:
            _chat(bob)
            time.sleep(0.05)
    assert e.value.code == "rate_limit_tokens"
    import redis

    keys = redis.Redis.from_url(redis_url).keys("sy:rl:bob:*")
    assert keys, "counters live in Redis"


def test_rate_limiter_fails_open_when_redis_is_down(live_server, redis_server):
    settings = fake_settings(api_keys=KEYS, redis_url=redis_server.url)
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    redis_server.stop()
    try:
        assert _chat(_client(server, "sk-alice")).choices[0].message.content
        ready = httpx.get(server.base_url + "/readyz")  # degraded, still ready: the limiter fails open
        assert ready.status_code == 200 and ready.json()["status"] == "degraded" and ready.json()["redis"] is False
        text = httpx.get(server.base_url + "/metrics").text
        assert 'switchyard_redis_failures_total{component="rate_limiter"} 1.0' in text
        assert "switchyard_degraded 1.0" in text
    finally:
        redis_server.start()


def test_body_too_large_is_413(live_server):
    settings = fake_settings(limits={"max_body_bytes": 2048})
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    client = _client(server, "x")
    with pytest.raises(openai.APIStatusError) as e:
        _chat(client, content="word " * 1000)
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    # a chunked body without content-length is cut off too
    big = b'{"model":"slm","messages":[{"role":"user","content":"' + b"a" * 5000 + b'"}]}'
    r = httpx.post(server.base_url + "/v1/chat/completions", content=iter([big[:1000], big[1000:]]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_prompt_and_completion_limits_are_400(live_server):
    settings = fake_settings(limits={"max_prompt_tokens": 50, "max_completion_tokens": 100})
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    client = _client(server, "x")
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, content="word " * 200)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="slm", messages=[{"role": "user", "content": "hi"}], max_tokens=101)
    assert _chat(client).choices[0].message.content  # default max_tokens is capped to the limit


def test_no_healthy_replica_is_503(live_server):
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory(fail_load=frozenset({"llm"}))))
    client = _client(server, "x")
    with pytest.raises(openai.InternalServerError) as e:
        _chat(client, model="llm")
    assert e.value.status_code == 503 and e.value.code == "no_healthy_replica"
    ready = httpx.get(server.base_url + "/readyz")
    assert ready.status_code == 503 and ready.json()["pools"]["llm"] == {"healthy_replicas": 0, "replicas": 1}
    assert "replicas" not in ready.json()  # replica names only for an admin key


def test_request_deadline(live_server):
    settings = fake_settings(limits={"request_timeout_s": 0.5})
    factory = FakeFactory()
    server = live_server(create_app(settings, backend_factory=factory))
    client = _client(server, "x")
    with pytest.raises(openai.InternalServerError) as e:
        _chat(client, content="slow please")
    assert e.value.status_code == 504 and e.value.code == "deadline_exceeded"
    stream = client.chat.completions.create(model="slm", messages=[{"role": "user", "content": "slow"}], stream=True)
    with pytest.raises(openai.APIError):  # tokens were sent: the stream ends with an error event
        for _ in stream:
            pass
    import time

    deadline = time.monotonic() + 5
    while factory.backends["slm"][0].num_active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert factory.backends["slm"][0].num_active == 0


def test_auto_falls_back_to_the_llm_when_the_slm_pool_is_down(live_server):
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory(fail_load=frozenset({"slm"}))))
    resp = _chat(_client(server, "x"), model="auto", content="hello")
    assert resp.choices[0].message.content.startswith("llm:")
    info = resp.model_extra["switchyard"]
    assert info["escalated"] is True and "SLM failed" in info["reason"]


def test_key_allowed_a_pool_may_name_its_model(live_server):
    """Model names resolve once, before admission: a key allowed pool 'slm' may send 'fake-slm', the model that
    pool serves (it got 403 when admission checked the raw name), and the allow list may name either."""
    keys = [{"name": "carol", "sha256": hash_api_key("sk-carol"), "models": ["slm", "fake-llm"]}]
    server = live_server(create_app(fake_settings(api_keys=keys), backend_factory=FakeFactory()))
    carol = _client(server, "sk-carol")
    assert _chat(carol, model="fake-slm").model_extra["switchyard"]["model"] == "slm"
    assert _chat(carol, model="llm").model_extra["switchyard"]["model"] == "llm"
    with pytest.raises(openai.PermissionDeniedError):
        _chat(carol, model="cloud")
    assert sorted(m.id for m in carol.models.list()) == ["llm", "slm"]
