"""The gateway over real local pools: the embedded engine on tiny random models (official openai client)."""

from __future__ import annotations

import openai
import pytest

from gateway.app import create_app
from gateway.settings import settings_from_dict
from tests.conftest import start_live_server

ENGINE = {"max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 256, "kv_cache_memory_gb": 0.05,
          "num_threads": 1}


@pytest.fixture(scope="module")
def local_gateway(tiny_model_dir):
    settings = settings_from_dict({
        "pools": [
            {"name": "slm", "model": str(tiny_model_dir("llama")), "engine": ENGINE,
             "price": {"input_per_1m": 1, "output_per_1m": 2}},
            {"name": "llm", "model": str(tiny_model_dir("qwen2")), "engine": ENGINE,
             "price": {"input_per_1m": 10, "output_per_1m": 20}},
        ],
        # a random model is never confident: every auto request escalates
        "routing": {"cascade": {"mode": "slm_then_escalate", "stream_mode": "buffer", "min_mean_logprob": -0.01}},
        "example_cache": {"enabled": False},
        "limits": {"default_max_tokens": 16},
    })
    server = start_live_server(create_app(settings))
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    server.stop()


MESSAGES = [{"role": "user", "content": "Hello world! How are you today?"}]


def test_stream_equals_non_stream_at_temperature_zero(local_gateway):
    client = local_gateway
    whole = client.chat.completions.create(model="slm", messages=MESSAGES, temperature=0, max_tokens=12,
                                           logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(model="slm", messages=MESSAGES, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True},
                                                 logprobs=True, top_logprobs=2))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == len(whole.choices[0].logprobs.content)
    assert all(len(t.top_logprobs) == 2 for t in whole.choices[0].logprobs.content)


def test_n_and_completions_on_the_engine(local_gateway):
    client = local_gateway
    resp = client.chat.completions.create(model="llm", messages=MESSAGES, temperature=0, max_tokens=8, n=2)
    assert len(resp.choices) == 2 and resp.choices[0].message.content == resp.choices[1].message.content
    done = client.completions.create(model="slm", prompt="The quick brown fox", temperature=0, max_tokens=6)
    streamed = list(client.completions.create(model="slm", prompt="The quick brown fox", temperature=0,
                                              max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text


def test_auto_cascade_escalates_unsure_tiny_model(local_gateway):
    raw = local_gateway.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, max_tokens=8,
                                                                  temperature=0)
    assert raw.headers["x-switchyard-route"] == "slm_then_escalate"
    assert raw.headers["x-switchyard-model"] == "llm"
    info = raw.parse().model_extra["switchyard"]
    assert info["escalated"] is True and info["cost_usd"] > 0


def test_prompt_longer_than_the_engine_context_is_400(local_gateway):
    with pytest.raises(openai.BadRequestError) as e:
        local_gateway.chat.completions.create(model="slm", messages=[{"role": "user", "content": "fox " * 400}])
    assert e.value.code == "context_length_exceeded"


def test_odd_but_valid_messages_never_500(local_gateway):
    odd = [[{"role": "system", "content": "be brief"}, {"role": "developer", "content": "really"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]}],
           [{"role": "assistant", "content": None}, {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "user", "content": ""}],
           [{"role": "assistant", "content": "only an assistant turn"}]]
    for messages in odd:
        try:
            resp = local_gateway.chat.completions.create(model="slm", messages=messages, max_tokens=4)
            assert resp.choices[0].finish_reason in ("stop", "length")
        except openai.BadRequestError:
            pass
