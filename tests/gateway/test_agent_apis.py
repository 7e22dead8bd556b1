"""The APIs agents speak, with the official SDKs against a live gateway: OpenAI's Responses API
(``client.responses``) and Anthropic's Messages (``anthropic.Anthropic().messages``). Fake replicas for
local pools; a real OpenAIUpstream in front of bench's FakeUpstream for the tool round trips."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from bench.fake_upstream import FakeUpstream
from gateway.app import create_app
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, fake_settings, remote_cloud_app

TOOLS_RESPONSES = [{"type": "function", "name": "get_weather", "description": "weather of a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
TOOLS_ANTHROPIC = [{"name": "get_weather", "description": "weather of a city",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def _openai(server, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def _anthropic(server, key: str = "x") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0)


@pytest.fixture
def gateway(live_server):
    factory = FakeFactory()
    return live_server(create_app(fake_settings(), backend_factory=factory)), factory


@pytest.fixture
def remote(live_server):
    """A gateway whose 'cloud' pool is a real OpenAIUpstream in front of a FakeUpstream (which answers any
    request that carries tools with a tool call, and records every body it gets)."""
    upstream_app = FakeUpstream()
    return live_server(remote_cloud_app(live_server(upstream_app).base_url)), upstream_app


# ----------------------------------------------------------------------------------- Responses


def test_responses_text_stream_equals_non_stream(gateway):
    server, factory = gateway
    client = _openai(server)
    whole = client.responses.create(model="slm", input="hello there", instructions="Be brief.")
    assert whole.object == "response" and whole.status == "completed"
    assert whole.output_text == "slm: echo hello there done."
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens == 5
    assert factory.requests("slm")[-1].messages[0] == {"role": "system", "content": "Be brief."}
    with client.responses.stream(model="slm", input="hello there", instructions="Be brief.") as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert streamed.output_text == whole.output_text and streamed.status == "completed"
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5
    raw = httpx.post(server.base_url + "/v1/responses", json={"model": "slm", "input": "hi", "stream": True})
    numbers = [json.loads(line[6:])["sequence_number"] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert numbers == list(range(len(numbers)))


def test_responses_previous_response_id_continues_the_conversation(gateway):
    server, factory = gateway
    client = _openai(server)
    first = client.responses.create(model="slm", input="my name is Ada", instructions="Be brief.")
    second = client.responses.create(model="slm", input="what is my name", previous_response_id=first.id)
    sent = factory.requests("slm")[-1].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]  # instructions are not carried over
    assert sent[1]["content"] == first.output_text and sent[2]["content"] == "what is my name"
    third = client.responses.create(model="slm", input="and now", previous_response_id=second.id, store=False)
    assert len(factory.requests("slm")[-1].messages) == 5
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="slm", input="x", previous_response_id=third.id)  # store: false
    assert e.value.code == "previous_response_not_found"


def test_responses_function_call_round_trip_on_a_remote_pool(remote):
    server, upstream = remote
    client = _openai(server)
    call = client.responses.create(model="cloud", input="weather in Paris?", tools=TOOLS_RESPONSES,
                                   tool_choice="required")
    assert [item.type for item in call.output] == ["function_call"]
    fc = call.output[0]
    assert fc.name == "get_weather" and fc.call_id.startswith("call_") and json.loads(fc.arguments) == {}
    sent = upstream.last_bodies[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["tool_choice"] == "required"
    client.responses.create(model="cloud", previous_response_id=call.id, tools=TOOLS_RESPONSES,
                            input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}])
    history = upstream.last_bodies[-1]["messages"]
    assert history[-2]["tool_calls"][0]["id"] == fc.call_id
    assert history[-1] == {"role": "tool", "tool_call_id": fc.call_id, "content": "sunny"}
    with client.responses.stream(model="cloud", input="weather?", tools=TOOLS_RESPONSES) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and final.output[0].type == "function_call"


def test_responses_text_format_json_schema_reaches_the_pool(remote):
    server, upstream = remote
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    _openai(server).responses.create(model="cloud", input="answer in JSON", text={"format": {
        "type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert upstream.last_bodies[-1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_responses_errors_are_the_sdk_exceptions(live_server):
    keys = [{"name": "a", "sha256": hash_api_key("sk-a"), "requests_per_minute": 1}]
    server = live_server(create_app(fake_settings(api_keys=keys), backend_factory=FakeFactory(
        fail_load=frozenset({"llm"}))))
    client = _openai(server, "sk-a")  # admitted requests count: only the 503 below
    with pytest.raises(openai.AuthenticationError):
        _openai(server, "sk-wrong").responses.create(model="slm", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="slm", input="x", tools=[{"type": "web_search"}])
    assert "'web_search'" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-9", input="x")
    with pytest.raises(openai.InternalServerError) as e:
        client.responses.create(model="llm", input="x")
    assert e.value.status_code == 503
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="slm", input="x")


def test_responses_stored_in_redis_are_seen_by_another_gateway(live_server, redis_url):
    a = live_server(create_app(fake_settings(redis_url=redis_url), backend_factory=FakeFactory()))
    factory_b = FakeFactory()
    b = live_server(create_app(fake_settings(redis_url=redis_url), backend_factory=factory_b))
    first = _openai(a).responses.create(model="slm", input="remember 42")
    _openai(b).responses.create(model="slm", input="what number", previous_response_id=first.id)
    assert factory_b.requests("slm")[-1].messages[0] == {"role": "user", "content": "remember 42"}


# ------------------------------------------------------------------------------------ Messages


def test_messages_text_stream_and_non_stream(gateway):
    server, factory = gateway
    client = _anthropic(server)
    message = client.messages.create(model="slm", max_tokens=32, system="Be brief.",
                                     messages=[{"role": "user", "content": "hello there"}])
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "end_turn"
    assert message.content[0].text == "slm: echo hello there done." and message.usage.output_tokens == 5
    assert factory.requests("slm")[-1].messages[0] == {"role": "system", "content": "Be brief."}
    with client.messages.stream(model="slm", max_tokens=32, system="Be brief.",
                                messages=[{"role": "user", "content": "hello there"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == message.content[0].text and final.content[0].text == message.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5
    short = client.messages.create(model="slm", max_tokens=2, messages=[{"role": "user", "content": "a b c"}])
    assert short.stop_reason == "max_tokens"


def test_messages_tool_use_round_trip_on_a_remote_pool(remote):
    server, upstream = remote
    client = _anthropic(server)
    first = client.messages.create(model="cloud", max_tokens=64, tools=TOOLS_ANTHROPIC,
                                   tool_choice={"type": "any"},
                                   messages=[{"role": "user", "content": "weather in Paris?"}])
    assert first.stop_reason == "tool_use" and first.content[-1].type == "tool_use"
    use = first.content[-1]
    assert use.name == "get_weather" and use.input == {}
    assert upstream.last_bodies[-1]["tool_choice"] == "required"
    client.messages.create(model="cloud", max_tokens=64, tools=TOOLS_ANTHROPIC, messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    history = upstream.last_bodies[-1]["messages"]
    assert history[1]["tool_calls"][0] == {"id": use.id, "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Paris"}'}}
    assert history[2] == {"role": "tool", "tool_call_id": use.id, "content": "sunny"}
    with client.messages.stream(model="cloud", max_tokens=64, tools=TOOLS_ANTHROPIC,
                                messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use"


def test_messages_errors_are_anthropic_exceptions_in_anthropic_envelope(live_server):
    keys = [{"name": "a", "sha256": hash_api_key("sk-a"), "requests_per_minute": 1}]
    server = live_server(create_app(fake_settings(api_keys=keys), backend_factory=FakeFactory(
        fail_load=frozenset({"llm"}))))
    client = _anthropic(server, "sk-a")  # sent as x-api-key; admitted requests count: only the 503 below
    user = [{"role": "user", "content": "x"}]
    with pytest.raises(anthropic.AuthenticationError) as e:
        _anthropic(server, "sk-wrong").messages.create(model="slm", max_tokens=8, messages=user)
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                       "message": "Incorrect API key provided."}}
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="slm", max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "x",
                                                                         "media_type": "text/plain"}}]}])
    assert "'document'" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-9", max_tokens=8, messages=user)
    with pytest.raises(anthropic.InternalServerError) as e:
        client.messages.create(model="llm", max_tokens=8, messages=user)
    assert e.value.status_code == 503 and e.value.body["error"]["type"] == "api_error"
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="slm", max_tokens=8, messages=user)
    bad = httpx.post(server.base_url + "/v1/messages", headers={"x-api-key": "sk-a"},
                     json={"model": "slm", "messages": user})  # max_tokens is required
    assert bad.status_code in (400, 429) and bad.json()["type"] == "error"


# ---------------------------------------------------------------------------------- embeddings


@pytest.mark.slow
def test_embeddings_are_minilm_vectors_equal_to_the_library_own(live_server):
    """A local embed pool serves the bundled MiniLM: equal (cosine > 0.999) to transformers' BertModel with
    the model card's mean pooling; float and base64 (the SDK's default) alike."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from backends.models import prepare

    pools = [{"name": "slm", "model": "fake-slm"}, {"name": "llm", "model": "fake-llm"},
             {"name": "emb", "model": "minilm", "task": "embed"}]
    server = live_server(create_app(fake_settings(pools=pools), backend_factory=FakeFactory()))
    client = _openai(server)
    texts = ["The court ruled on the contract dispute.", "How do I bake sourdough bread?", "x"]
    answer = client.embeddings.create(model="emb", input=texts)  # the SDK asks for base64
    ours = np.array([d.embedding for d in answer.data])
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert np.allclose(np.array([d.embedding for d in floats.data]), ours, atol=1e-6)
    folder = prepare("minilm")
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert ours.shape == (3, 384) and np.all((ours * ref).sum(axis=1) > 0.999)
    assert answer.usage.prompt_tokens == int(batch["attention_mask"].sum())
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "wrong_endpoint"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="slm", input="x")  # a generation pool
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="emb", input=[[1, 2, 3]])  # token ids: remote pools only


def test_embeddings_pass_through_to_a_remote_pool(live_server):
    upstream_app = FakeUpstream()
    upstream = live_server(upstream_app)
    pools = [{"name": "slm", "model": "fake-slm"}, {"name": "llm", "model": "fake-llm"},
             {"name": "cloud-emb", "kind": "remote", "task": "embed", "model": "text-embedding-x",
              "urls": [upstream.base_url + "/v1"]}]
    server = live_server(create_app(fake_settings(pools=pools), backend_factory=FakeFactory()))
    answer = _openai(server).embeddings.create(model="cloud-emb", input=["ab", "abcd"], dimensions=3)
    assert [d.embedding for d in answer.data] == [[2.0, 0.5, 0.5], [4.0, 0.5, 0.5]]
    assert upstream_app.last_bodies[-1] == {"model": "text-embedding-x", "input": ["ab", "abcd"], "dimensions": 3,
                                            "encoding_format": "float"}


def test_get_one_model(gateway):
    server, _ = gateway
    client = _openai(server)
    assert client.models.retrieve("auto").id == "auto" and client.models.retrieve("slm").owned_by == "switchyard"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
