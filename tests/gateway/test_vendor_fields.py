"""Fields the gateway used to drop: logit_bias and chat_template_kwargs reach remote pools (the embedded
engine refuses logit_bias with a clear 400); an upstream's reasoning_content reaches the client."""

from __future__ import annotations

import httpx
import openai
import pytest

from backends.openai_upstream import OpenAIUpstream, _StreamParser
from backends.types import Delta, Usage
from bench.fake_upstream import FakeUpstream
from gateway.app import create_app
from gateway.streaming import ResponseShaper
from tests.gateway.fakes import FakeFactory, fake_local_real_remote, fake_settings


def test_logit_bias_and_chat_template_kwargs_reach_a_remote_pool(live_server):
    upstream_app = FakeUpstream()
    upstream = live_server(upstream_app)
    pools = [{"name": "slm", "model": "fake-slm"}, {"name": "llm", "model": "fake-llm"},
             {"name": "cloud", "kind": "remote", "model": "m", "urls": [upstream.base_url + "/v1"]}]

    server = live_server(create_app(fake_settings(pools=pools), backend_factory=fake_local_real_remote))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "hi"}],
                                   logit_bias={"42": -100, "7": 2.5},
                                   extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    sent = upstream_app.last_bodies[-1]
    assert sent["logit_bias"] == {"42": -100, "7": 2.5}
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "hi"}])
    assert "logit_bias" not in upstream_app.last_bodies[-1]  # sent only when set
    bad = httpx.post(server.base_url + "/v1/chat/completions",
                     json={"model": "cloud", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}})
    assert bad.status_code == 400 and "logit_bias" in bad.json()["error"]["message"]


def test_reasoning_content_from_an_upstream_reaches_the_client():
    upstream = OpenAIUpstream("u", "http://127.0.0.1:9/v1", "m")
    whole = upstream._whole_to_deltas({"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "42", "reasoning_content": "6 times 7"}}]}, is_chat=True)
    assert whole[0].reasoning == "6 times 7" and whole[0].text == "42"
    parser = _StreamParser(is_chat=True, n=1, name="u")
    streamed = parser.feed({"choices": [{"index": 0, "delta": {"reasoning_content": "thinking"}}]})
    assert streamed == [Delta(index=0, reasoning="thinking")]
    shaper = ResponseShaper(kind="chat", request_id="chatcmpl-x", created=0, model="m")
    for delta in whole:
        shaper.add(delta)
    assert shaper.body(Usage(1, 1), {})["choices"][0]["message"]["reasoning_content"] == "6 times 7"
    frame = ResponseShaper(kind="chat", request_id="chatcmpl-x", created=0, model="m").frames(streamed[0])
    assert b'"reasoning_content":"thinking"' in frame


@pytest.mark.slow
def test_the_embedded_engine_refuses_logit_bias(live_server, tiny_model_dir):
    pools = [{"name": "slm", "model": str(tiny_model_dir("llama")), "chat_template": "plain_turns"},
             {"name": "llm", "model": "fake-llm"}]

    def factory(cfg, index):
        from backends.pool import default_backend

        return default_backend(cfg, index) if cfg.name == "slm" else FakeFactory()(cfg, index)

    server = live_server(create_app(fake_settings(pools=pools), backend_factory=factory))
    r = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": "slm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logit_bias": {"5": 1}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "logit_bias_not_supported"
