"""One SamplingParams: the wire request builds it (to_sampling_params), validated once, the same 400 for a
local pool (the embedded engine) and a remote pool (a fake OpenAI upstream over HTTP); remote pools get
it serialised."""

from __future__ import annotations

import openai
import pytest

from backends.types import SamplingParams, SamplingParamsError
from bench.fake_upstream import FakeBehavior, FakeUpstream
from gateway.app import create_app
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.settings import settings_from_dict
from tests.conftest import start_live_server

ENGINE = {"max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 128, "kv_cache_memory_gb": 0.02,
          "num_threads": 1, "device": "cpu"}
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def gateway(tiny_model_dir):
    upstream = FakeUpstream(name="up", model="up-model", behavior=FakeBehavior(num_tokens=3))
    up_server = start_live_server(upstream)
    settings = settings_from_dict({
        "pools": [{"name": "local", "model": str(tiny_model_dir("llama")), "engine": ENGINE},
                  {"name": "remote", "kind": "remote", "model": "up-model", "urls": [up_server.base_url + "/v1"]}],
        "routing": {"slm_pool": "local", "llm_pool": "remote", "cascade": {"mode": "off"}},
        "example_cache": {"enabled": False},
        "limits": {"default_max_tokens": 7},
    })
    server = start_live_server(create_app(settings))
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0), upstream
    server.stop()
    up_server.stop()


BAD = [
    ({"top_p": 0}, "top_p"),
    ({"extra_body": {"top_k": -5}}, "top_k"),  # -1 and 0 are off
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids[0]"),  # OpenAI's form of a param
]


@pytest.mark.parametrize(("kwargs", "param"), BAD, ids=[p for _, p in BAD])
def test_invalid_sampling_is_the_same_400_for_local_and_remote_pools(gateway, kwargs, param):
    client, upstream = gateway
    num_upstream = upstream.num_requests
    errors = {}
    for pool in ("local", "remote"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=pool, messages=MESSAGES, max_tokens=4, **kwargs)
        errors[pool] = (info.value.status_code, info.value.param, info.value.body["type"], info.value.message)
    assert errors["local"] == errors["remote"]
    assert errors["local"][:3] == (400, param, "invalid_request_error")
    assert upstream.num_requests == num_upstream  # never sent upstream


def test_remote_pool_gets_the_sampling_params_serialised(gateway):
    client, upstream = gateway
    client.chat.completions.create(model="remote", messages=MESSAGES, logprobs=True, top_logprobs=2, seed=3,
                                   extra_body={"top_k": 5, "ignore_eos": True})
    body = upstream.last_bodies[-1]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (1.0, 1.0, 7)  # OpenAI's defaults
    assert (body["logprobs"], body["top_logprobs"], body["seed"]) == (True, 2, 3)
    assert (body["top_k"], body["ignore_eos"]) == (5, True)
    assert "min_p" not in body and "repetition_penalty" not in body  # unset extras are not sent
    client.completions.create(model="remote", prompt="Once", logprobs=0)
    assert upstream.last_bodies[-1]["logprobs"] == 0 and upstream.last_bodies[-1]["max_tokens"] == 16


def test_to_sampling_params_defaults_and_logprobs():
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES})
    assert chat.to_sampling_params(512) == SamplingParams(max_tokens=512)
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "logprobs": True, "n": 2,
                                                 "max_completion_tokens": 9, "max_tokens": 3, "stop": "x"})
    assert chat.to_sampling_params(512) == SamplingParams(max_tokens=9, logprobs=0, n=2, stop=("x",))
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": 3, "temperature": 0})
    params = completion.to_sampling_params(512)
    assert (params.max_tokens, params.logprobs, params.is_greedy) == (16, 3, True)
    with pytest.raises(SamplingParamsError) as info:  # a value the wire type lets through, the engine refuses
        ChatCompletionRequest.model_construct(model="m", messages=[], top_p=0).to_sampling_params(8)
    assert info.value.param == "top_p" and "top_p" in str(info.value)
    with pytest.raises(ValueError, match="top_p"):  # the wire type (and so the served schema) refuses it first
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "top_p": 0})
