"""Fields the gateway used to drop: logit_bias and chat_template_kwargs reach remote pools and the embedded
engine honours logit_bias; an upstream's reasoning_content reaches the client."""

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
def test_the_embedded_engine_honours_logit_bias(live_server, tiny_model_dir):
    from backends.engine.sampling_params import SamplingParams
    from tests.engine.helpers import prompts, tiny_engine

    folder = tiny_model_dir("llama")
    pools = [{"name": "slm", "model": str(folder), "chat_template": "plain_turns"},
             {"name": "llm", "model": "fake-llm"}]

    def factory(cfg, index):
        from backends.pool import default_backend

        return default_backend(cfg, index) if cfg.name == "slm" else FakeFactory()(cfg, index)

    engine = tiny_engine(folder)
    tok = engine.tokenizer
    [prompt] = prompts(1, [8], seed=5)
    greedy = dict(temperature=0, max_tokens=5, ignore_eos=True)
    [free] = engine.generate([prompt], SamplingParams(**greedy))
    first = free.token_ids[0]
    [banned] = engine.generate([prompt], SamplingParams(**greedy, logit_bias=((first, -100.0),)))
    assert banned.token_ids[0] != first
    [forced_id] = tok.encode("Hello")
    assert forced_id not in free.token_ids

    server = live_server(create_app(fake_settings(pools=pools), backend_factory=factory))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)

    def complete(**extra):
        return client.completions.create(model="slm", prompt=prompt, max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True}, **extra).choices[0].text

    assert complete() == tok.decode(free.token_ids)
    assert complete(logit_bias={str(forced_id): 100}) == "Hello" * 5  # +100: greedy picks it every step
    assert complete(logit_bias={str(first): -100}) == tok.decode(banned.token_ids)  # -100: never picked
    chat = client.chat.completions.create(model="slm", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logit_bias={str(forced_id): 100})
    assert chat.choices[0].message.content == "Hello" * 3
    with pytest.raises(openai.BadRequestError) as info:
        complete(logit_bias={"100000": 1})  # outside the vocabulary
    assert info.value.body["param"] == "logit_bias" and "logit_bias" in info.value.body["message"]
