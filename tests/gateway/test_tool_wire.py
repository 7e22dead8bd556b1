"""Tools and JSON-schema output on the wire (issue 19): typed fields, and each rule across fields a 400
``invalid_request_error`` whose ``param`` names the field as OpenAI does, before any backend runs (official
``openai`` / ``anthropic`` clients against a live gateway over fake replicas); valid tool conversations reach
the pool as OpenAI's dicts, ``parallel_tool_calls`` included."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.protocol import ChatCompletionRequest
from tests.gateway.fakes import FakeFactory, fake_settings

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ASKED = [{"role": "user", "content": "weather in Paris?"}]
ANSWERED = [*ASKED, {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _function(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, **({"parameters": parameters} if parameters else {})}}


# (request fields, the 400's param, its code)
REFUSED = [
    ({"tools": [_function("f", {"type": "object", "properties": {"a": {"type": 5}}})]},
     "tools[0].function.parameters", "invalid_function_parameters"),
    ({"tools": [WEATHER, _function("g", {"type": "object", "required": "a"})]},
     "tools[1].function.parameters", "invalid_function_parameters"),
    ({"tools": [_function("get weather")]}, "tools[0].function.name", None),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice", None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"tool_choice": NAMED}, "tool_choice", None),
    ({"messages": [*ASKED, {"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id", None),
    ({"messages": [*ANSWERED[:2], {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]},
     "messages[2].tool_call_id", None),
    ({"messages": [*ASKED, ANSWERED[2], ANSWERED[1]]}, "messages[1].tool_call_id", None),  # answer before the call
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
     "response_format.json_schema.name", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"properties": []}}}},
     "response_format.json_schema.schema", None),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", None),
]


@pytest.fixture
def gateway(live_server):
    factory = FakeFactory()
    return live_server(create_app(fake_settings(), backend_factory=factory)), factory


def _num_backend_requests(factory: FakeFactory) -> int:
    return sum(len(b.requests) for backends in factory.backends.values() for b in backends)


def _openai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def test_each_tool_rule_is_a_400_naming_its_param_and_no_backend_runs(gateway):
    server, factory = gateway
    client = _openai(server)
    for fields, param, code in REFUSED:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="cloud", **{"messages": ASKED, **fields}, stream=stream)
            err = e.value
            assert (err.param, err.code, err.type) == (param, code, "invalid_request_error"), (fields, err.message)
            assert f"{param}: " in err.message, err.message
    assert _num_backend_requests(factory) == 0
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="cloud", messages=ASKED, tools=REFUSED[0][0]["tools"])
    assert e.value.body["message"] == ("Invalid request: tools[0].function.parameters: invalid JSON Schema for "
                                       "function 'f': 5 is not valid under any of the given schemas "
                                       "(at $.properties.a.type)")
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "cloud", "messages": [{"role": "robot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"  # pydantic's, same form
    assert _num_backend_requests(factory) == 0


def test_a_valid_tool_conversation_reaches_the_pool_as_openai_dicts(gateway):
    server, factory = gateway
    client = _openai(server)
    client.chat.completions.create(model="cloud", messages=ANSWERED, tools=[WEATHER], tool_choice=NAMED,
                                   parallel_tool_calls=False)
    sent = factory.requests("cloud")[-1]
    assert sent.tools == [WEATHER] and sent.tool_choice == NAMED and sent.parallel_tool_calls is False
    assert sent.messages[1]["tool_calls"] == [CALL] and sent.messages[2]["tool_call_id"] == "call_1"
    r = httpx.post(server.base_url + "/v1/chat/completions",
                   json={"model": "cloud", "messages": ASKED, "tools": [_function("get_weather")], "tool_choice": "auto"})
    assert r.json()["choices"][0]["message"]["tool_calls"] == [  # the fake's one whole call, OpenAI's shape
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    sent = factory.requests("cloud")[-1]
    assert sent.tools == [{"type": "function", "function": {"name": "get_weather"}}]  # unset fields left out
    assert sent.tool_choice == "auto" and sent.parallel_tool_calls is None
    schema = {"type": "object", "properties": {"answer": {"type": "string", "default": None}}}
    client.chat.completions.create(model="cloud", messages=ASKED, tool_choice="none", response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert factory.requests("cloud")[-1].response_format == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_responses_and_messages_name_their_own_fields(gateway):
    server, factory = gateway
    client = _openai(server)
    bad_schema = {"type": "object", "properties": {"city": {"type": "text"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="cloud", input="x", tools=[
            {"type": "function", "name": "get_weather", "parameters": bad_schema}])
    assert (e.value.param, e.value.code) == ("tools[0].parameters", "invalid_function_parameters")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="cloud", input="x", text={"format": {
            "type": "json_schema", "name": "answer", "schema": bad_schema}})
    assert e.value.param == "text.format.schema"
    with pytest.raises(openai.BadRequestError) as e:  # answers no call of this conversation
        client.responses.create(model="cloud", input=[{"type": "function_call_output", "call_id": "call_9",
                                                       "output": "sunny"}])
    assert e.value.param == "messages[0].tool_call_id" and "'call_9'" in e.value.message
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="cloud", max_tokens=8, messages=ASKED,
                               tools=[{"name": "get_weather", "input_schema": bad_schema}])
    assert "tools.0.input_schema: invalid JSON Schema for tool 'get_weather'" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="cloud", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_9", "content": "sunny"}]}])
    assert "'toolu_9' answers no tool call" in e.value.message
    assert _num_backend_requests(factory) == 0

    client.responses.create(model="cloud", input="weather?", parallel_tool_calls=False, tools=[
        {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}])
    assert factory.requests("cloud")[-1].parallel_tool_calls is False
    claude.messages.create(model="cloud", max_tokens=8, messages=ASKED, tool_choice={
        "type": "any", "disable_parallel_tool_use": True}, tools=[{"name": "get_weather", "input_schema": {}}])
    sent = factory.requests("cloud")[-1]
    assert sent.parallel_tool_calls is False and sent.tool_choice == "required"


def test_parameters_are_checked_under_their_own_draft():
    def request(parameters: dict) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"model": "m", "messages": ASKED,
                                                     "tools": [_function("f", parameters)]})

    draft4 = "http://json-schema.org/draft-04/schema#"
    request({"$schema": draft4, "type": "integer", "maximum": 5, "exclusiveMaximum": True})
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.parameters: .* True is not of type 'number'"):
        request({"type": "integer", "maximum": 5, "exclusiveMaximum": True})  # 2020-12: a number
    request({"type": "integer", "maximum": 2**70})  # beyond orjson's 64 bits: still checked, no 500
