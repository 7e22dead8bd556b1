"""`switchyard engine serve` = the gateway app with one local pool: a live uvicorn, the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.engine.args import EngineArgs
from gateway.app import create_app
from gateway.engine_server import engine_settings

OPTIONS = EngineArgs(num_kv_blocks=128, block_size=4, max_model_len=128, max_num_batched_tokens=64, num_threads=1,
                     device="cpu")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from tests.conftest import start_live_server

    app = create_app(engine_settings(str(tiny_model_dir("llama")), OPTIONS, served_name="tiny"))
    live = start_live_server(app)
    backend = app.state.pipeline.pools.get("tiny").replicas[0].backend
    yield live, backend
    live.stop()


def test_engine_settings_turn_guard_router_cascade_and_cache_off(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    settings = engine_settings(folder, OPTIONS)
    (pool,) = settings.pools
    assert (pool.kind, pool.model, pool.engine) == ("local", folder, OPTIONS)
    assert pool.name == tiny_model_dir("llama").name  # a path is not a pool name: the folder's name is
    assert settings.routing.slm_pool == settings.routing.llm_pool == pool.name
    assert settings.routing.router_artifact is None and settings.guard.artifact is None
    assert settings.routing.cascade.mode == "off" and not settings.example_cache.enabled
    assert engine_settings("smollm2-135m", OPTIONS).pools[0].name == "smollm2-135m"


@pytest.fixture
def client(server):
    live, _ = server
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key="none", max_retries=0)


MESSAGES = [{"role": "user", "content": "Hello world! How are you?"}]


def test_chat_stream_equals_non_stream_with_usage(client, server):
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    assert full.object == "chat.completion"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the second identical prompt hits the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    _, backend = server
    assert backend.llm_engine.block_manager.num_used_blocks == 0


def test_completions_stream_equals_non_stream_and_logprobs(client):
    kwargs = dict(model="tiny", prompt="The quick brown fox", temperature=0, max_tokens=8, logprobs=2,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert full.choices[0].finish_reason == "length"
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == 8 and len(lp.top_logprobs[0]) == 2
    assert all(v <= 0 for v in lp.token_logprobs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_n_choices_and_stop(client):
    res = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6, n=2,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in res.choices] == [0, 1]
    assert res.choices[0].message.content == res.choices[1].message.content
    text = res.choices[0].message.content
    if len(text) > 2:
        stop = text[1:3]
        cut = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6,
                                             stop=[stop], extra_body={"ignore_eos": True})
        assert cut.choices[0].message.content == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_vllm_extra_fields_priority_and_min_p(client):
    res = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=4,
                                         extra_body={"priority": -1, "min_p": 0.1, "ignore_eos": True})
    assert res.usage.completion_tokens == 4


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=1.0, max_tokens=10, seed=123,
                  extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_too_long_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello " * 400}])
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hello " * 400, stream=True)


def test_bad_params_and_tools_are_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"top_k": -5})  # 0, -1: off
    assert info.value.param == "top_k"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tool_choice={
            "type": "function", "function": {"name": "g"}}, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert info.value.param == "tool_choice"


def _samples(text: str) -> dict[str, float]:
    """{name: value} of the samples labelled with the one replica (pool tiny)."""
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.labels.get("pool") == "tiny" and s.labels.get("replica") == "tiny/0" and "le" not in s.labels}


def test_models_health_metrics(client, server):
    live, _ = server
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(live.base_url + "/healthz").status_code == 200
    assert httpx.get(live.base_url + "/readyz").json()["pools"] == {"tiny": {"healthy_replicas": 1, "replicas": 1}}
    client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=3)
    client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=3)
    metrics = httpx.get(live.base_url + "/metrics").text
    from tests.gateway.test_metrics_naming import _check_naming

    _check_naming(metrics)  # the engine's histograms and counters follow Prometheus naming too
    assert "switchyard_engine_" not in metrics  # the hand-written text output is gone
    values = _samples(metrics)
    assert 0 <= values["switchyard_kv_cache_usage_perc"] <= 1
    assert values["switchyard_generation_tokens_total"] >= 6
    assert values["switchyard_time_to_first_token_seconds_count"] >= 2
    assert values["switchyard_time_to_first_token_seconds_sum"] > 0
    assert values["switchyard_inter_token_latency_seconds_count"] >= 4
    assert values["switchyard_e2e_request_latency_seconds_count"] >= 2
    assert values["switchyard_request_queue_time_seconds_count"] >= 2
    # the second identical prompt hit the prefix cache
    assert values["switchyard_prefix_cache_hits_total"] > 0
    assert values["switchyard_prefix_cache_queries_total"] >= values["switchyard_prefix_cache_hits_total"]


def test_client_disconnect_aborts_and_frees_blocks(server):
    import time

    live, backend = server
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 100, "stream": True, "ignore_eos": True}
    before = backend.llm_engine.stats().num_generation_tokens_total
    with httpx.Client(timeout=30) as http, http.stream("POST", live.base_url + "/v1/chat/completions",
                                                       json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    engine = backend.llm_engine
    deadline = time.monotonic() + 15
    while (engine.block_manager.num_used_blocks or engine.requests) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests
    assert engine.stats().num_generation_tokens_total - before < 100  # aborted, not run to max_tokens
