"""The gateway's OpenAI surface with the official client against a live uvicorn server (fake replicas)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from gateway.app import create_app
from tests.gateway.fakes import FakeFactory, fake_settings


@pytest.fixture
def gateway(live_server):
    """(client, factory, base_url) for a gateway over fake replicas, open (no keys)."""
    factory = FakeFactory()
    server = live_server(create_app(fake_settings(), backend_factory=factory))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    return client, factory, server.base_url


def _chat(client, content="hello there", **kw):
    kw.setdefault("model", "slm")
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


def test_models_lists_auto_and_pools(gateway):
    client, _, _ = gateway
    ids = [m.id for m in client.models.list()]
    assert ids == ["auto", "slm", "llm", "cloud"]


def test_chat_non_stream_has_answer_headers_and_switchyard_field(gateway):
    client, _, _ = gateway
    raw = client.chat.completions.with_raw_response.create(
        model="slm", messages=[{"role": "user", "content": "hello there"}], temperature=0)
    resp = raw.parse()
    assert resp.choices[0].message.content == "slm: echo hello there done."
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "fake-slm"
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 5
    assert raw.headers["x-switchyard-route"] == "explicit"
    assert raw.headers["x-switchyard-model"] == "slm"
    assert raw.headers["x-switchyard-guard"] == "off"
    assert float(raw.headers["x-switchyard-overhead-ms"]) >= 0
    # price slm: 1 $/1M in, 2 $/1M out
    assert float(raw.headers["x-switchyard-cost-usd"]) == pytest.approx((3 * 1 + 5 * 2) / 1e6)
    info = resp.model_extra["switchyard"]
    assert info["route"] == "explicit" and info["model"] == "slm" and info["cost_usd"] == pytest.approx(13e-6)


def test_model_name_of_a_pool_is_accepted(gateway):
    client, _, _ = gateway
    assert _chat(client, model="fake-llm").choices[0].message.content.startswith("llm:")


@pytest.mark.parametrize("model", ["slm", "auto"])
def test_stream_equals_non_stream_with_one_finish_reason_and_usage_chunk(gateway, model):
    client, _, _ = gateway
    whole = _chat(client, "one two three", model=model, temperature=0)
    chunks = list(_chat(client, "one two three", model=model, temperature=0, stream=True,
                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].model_extra["switchyard"]["model"] == whole.model_extra["switchyard"]["model"]


def test_stream_without_usage_puts_switchyard_on_last_choice_chunk(gateway):
    client, _, _ = gateway
    chunks = list(_chat(client, "a b", stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["switchyard"]["route"] == "explicit"


def test_logprobs_shape(gateway):
    client, _, _ = gateway
    resp = _chat(client, "x y", logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    chunks = list(_chat(client, "x y", logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks for t in (c.choices[0].logprobs.content or [] if c.choices[0].logprobs else [])]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert _chat(client, "x y").choices[0].logprobs is None


def test_n_choices_and_stop(gateway):
    client, _, _ = gateway
    resp = _chat(client, "alpha beta gamma", n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 1
    chunks = list(_chat(client, "alpha beta gamma", n=2, stream=True))
    for index in (0, 1):
        assert sum(1 for c in chunks for ch in c.choices if ch.index == index and ch.finish_reason) == 1
    stopped = _chat(client, "alpha beta gamma", stop=[" gamma"])
    assert stopped.choices[0].message.content == "slm: echo alpha beta"
    assert stopped.choices[0].finish_reason == "stop"
    short = _chat(client, "alpha beta gamma", max_completion_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_completions_stream_and_non_stream(gateway):
    client, _, _ = gateway
    whole = client.completions.create(model="llm", prompt="red green", max_tokens=10, temperature=0, logprobs=2)
    assert whole.choices[0].text == "llm: echo red green done."
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs)
    chunks = list(client.completions.create(model="llm", prompt="red green", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5
    assert client.completions.create(model="llm", prompt="red green", max_tokens=3).choices[0].finish_reason \
        == "length"


def test_bad_requests_are_400_in_openai_envelope(gateway):
    client, _, base = gateway
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, temperature=5)
    assert e.value.code is None and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="slm", messages=[])
    with pytest.raises(openai.BadRequestError):
        _chat(client, top_logprobs=2)  # without logprobs
    with pytest.raises(openai.BadRequestError):
        _chat(client, n=100)  # above limits.max_n
    with pytest.raises(openai.BadRequestError):
        _chat(client, extra_body={"switchyard": {"quality": "ultra"}})
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model="auto", extra_headers={"x-switchyard-quality": "ultra"})
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(base + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_unknown_model_is_404(gateway):
    client, _, _ = gateway
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, model="gpt-17")
    assert e.value.code == "model_not_found"


def test_tools_rejected_by_a_pool_that_cannot_and_passed_to_one_that_can(live_server):
    """Local pools declare tools and JSON mode; a remote pool serves them only when configured to."""
    from gateway.settings import settings_from_dict

    base = fake_settings().model_dump(mode="json")
    base["pools"].append({"name": "plain", "kind": "remote", "model": "fake-plain", "urls": ["http://127.0.0.1:9/v1"]})
    factory = FakeFactory()
    server = live_server(create_app(settings_from_dict(base), backend_factory=factory))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model="plain", tools=tools)
    assert e.value.code == "tools_not_supported" and not factory.requests("plain")
    resp = _chat(client, model="cloud", tools=tools, tool_choice="auto")
    assert resp.choices[0].finish_reason == "tool_calls"
    assert resp.choices[0].message.tool_calls[0].function.name == "get_time"
    assert factory.requests("cloud")[-1].tool_choice == "auto"
    _chat(client, model="slm", tools=tools, tool_choice="auto")  # a local pool: reaches its backend
    assert factory.requests("slm")[-1].tools[0]["function"]["name"] == "get_time"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model="plain", response_format={"type": "json_object"})
    assert e.value.code == "response_format_not_supported"
    _chat(client, model="cloud", response_format={"type": "json_object"})
    assert factory.requests("cloud")[-1].response_format == {"type": "json_object"}


def test_request_fields_reach_the_backend(gateway):
    client, factory, _ = gateway
    _chat(client, model="llm", temperature=0.3, top_p=0.9, seed=7, max_tokens=9, stop="zz", user="u1",
          presence_penalty=0.5, frequency_penalty=0.25)
    req = factory.requests("llm")[-1]
    s = req.sampling
    assert (s.temperature, s.top_p, s.seed, s.max_tokens, s.stop) == (0.3, 0.9, 7, 9, ("zz",))
    assert (s.presence_penalty, s.frequency_penalty, req.user) == (0.5, 0.25, "u1")
    assert req.deadline is not None and req.deadline > time.monotonic()


def test_cascade_escalates_unsure_slm_answer(gateway):
    client, factory, _ = gateway
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "i am unsure"}])
    resp = raw.parse()
    assert raw.headers["x-switchyard-route"] == "slm_then_escalate"
    assert raw.headers["x-switchyard-model"] == "llm"
    assert resp.choices[0].message.content.startswith("llm:")
    assert resp.model_extra["switchyard"]["escalated"] is True
    assert resp.choices[0].logprobs is None  # the judge's logprobs are not leaked
    sure = _chat(client, "i am certain", model="auto")
    assert sure.choices[0].message.content.startswith("slm:")
    assert sure.model_extra["switchyard"]["escalated"] is False
    # streamed escalation: headers already name the LLM
    with client.chat.completions.with_streaming_response.create(
            model="auto", messages=[{"role": "user", "content": "unsure again"}], stream=True) as r:
        assert r.headers["x-switchyard-model"] == "llm"
        text = "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)
    assert text.startswith("llm:")


def test_quality_hint_routes(gateway):
    client, _, _ = gateway
    low = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "unsure"}], extra_body={"switchyard": {"quality": "low"}})
    assert low.headers["x-switchyard-route"] == "slm" and low.headers["x-switchyard-model"] == "llm"
    high = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-switchyard-quality": "high"})
    assert high.headers["x-switchyard-route"] == "llm" and high.headers["x-switchyard-model"] == "llm"


def test_error_after_first_token_ends_stream_with_error_event(gateway):
    client, _, _ = gateway
    stream = _chat(client, "please explode now", stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_client_disconnect_aborts_backend_request(gateway):
    _, factory, base = gateway
    body = {"model": "slm", "stream": True, "messages": [{"role": "user", "content": "slow please"}]}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    backend = factory.backends["slm"][0]
    deadline = time.monotonic() + 5
    while backend.num_aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.num_aborted == 1 and backend.num_active == 0
    # non-stream: the backend is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    deadline = time.monotonic() + 5
    while backend.num_aborted < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.num_aborted == 2


def test_health_ready_metrics(gateway):
    client, _, base = gateway
    _chat(client)
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    text = httpx.get(base + "/metrics").text
    assert 'switchyard_requests_total{model="slm",route="explicit",status="200"} 1.0' in text
    # one SLM answer: 3 prompt + 5 completion tokens at 1/2 $ per 1M (SLM) vs 10/20 $ per 1M (LLM)
    assert 'switchyard_cost_usd_total{model="slm"} 1.3e-05' in text
    assert "switchyard_always_llm_cost_usd_total 0.00013" in text
    saved = next(line for line in text.splitlines() if line.startswith("switchyard_saved_vs_always_llm_usd "))
    assert float(saved.split()[1]) == pytest.approx(117e-6)
    assert 'switchyard_tokens_total{kind="completion",model="slm"} 5.0' in text
    assert 'switchyard_pool_healthy_replicas{pool="slm"} 1.0' in text
    assert 'switchyard_pool_events_total{event="requests",pool="slm"} 1.0' in text
    assert 'switchyard_pool_events_total{event="retries",pool="slm"} 0.0' in text
