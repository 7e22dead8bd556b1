"""Tool calls from a remote pool: a real OpenAIUpstream in front of bench's FakeUpstream, which streams them
as OpenAI does (a call's index, id, type and name with empty arguments first, then the arguments in pieces),
and the official SDKs against a live gateway. Chat stream and non-stream give the same calls, the argument
pieces arrive in order and unchanged, finish_reason is tool_calls; the Responses API and Anthropic Messages
give the same calls; the non-stream body merges streamed pieces by index (``ResponseShaper``)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from backends.types import Delta, Usage
from bench.fake_upstream import FakeBehavior, FakeUpstream
from gateway.protocol import AssistantMessage
from gateway.streaming import ResponseShaper
from tests.gateway.fakes import remote_cloud_app

ARGUMENTS = '{"city": "Paris", "unit": "celsius", "note": "a \\"quoted\\" — ünïcode note"}'
PIECE = 5  # the fake upstream's argument piece, in characters
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"},
                                         "note": {"type": "string"}},
        "required": ["city", "unit", "note"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": CITY, "strict": True}}
         for name in ("get_weather", "get_time")]
ASKED = [{"role": "user", "content": "weather and time in Paris?"}]
EXPECTED = [("get_weather", ARGUMENTS), ("get_time", ARGUMENTS)]  # (name, arguments) of the two calls


@pytest.fixture
def remote(live_server):
    upstream = FakeUpstream(behavior=FakeBehavior(tool_arguments=ARGUMENTS, num_tool_calls=2,
                                                  argument_piece_chars=PIECE))
    return live_server(remote_cloud_app(live_server(upstream).base_url)), upstream


def _openai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def test_chat_stream_and_non_stream_give_the_same_calls(remote):
    server, upstream = remote
    client = _openai(server)
    whole = client.chat.completions.create(model="cloud", messages=ASKED, tools=TOOLS)
    calls = whole.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == EXPECTED
    assert {c.type for c in calls} == {"function"} and len({c.id for c in calls}) == 2
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None

    chunks = list(client.chat.completions.create(model="cloud", messages=ASKED, tools=TOOLS, stream=True))
    pieces = [p for chunk in chunks for choice in chunk.choices for p in choice.delta.tool_calls or ()]
    merged: dict[int, dict] = {}  # accumulated by index, as the SDK docs do
    for p in pieces:
        call = merged.setdefault(p.index, {"id": p.id, "name": p.function.name, "fragments": []})
        call["fragments"].append(p.function.arguments)
    assert [(c["name"], "".join(c["fragments"])) for c in merged.values()] == EXPECTED
    for index, call in merged.items():  # id and name with empty arguments, then the pieces in order, unchanged
        assert call["fragments"] == ["", *(ARGUMENTS[k:k + PIECE] for k in range(0, len(ARGUMENTS), PIECE))]
        ids = [p.id for p in pieces if p.index == index]
        assert call["id"].startswith("call_") and ids == [call["id"]] + [None] * (len(ids) - 1)
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finishes == ["tool_calls"]

    with client.chat.completions.stream(model="cloud", messages=ASKED, tools=TOOLS) as stream:
        deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == EXPECTED
    assert final.choices[0].finish_reason == "tool_calls"
    assert "".join(e.arguments_delta for e in deltas if e.index == 1) == ARGUMENTS
    assert upstream.last_bodies[-1]["tools"] == TOOLS and "parallel_tool_calls" not in upstream.last_bodies[-1]


def test_parallel_tool_calls_reaches_the_upstream(remote):
    server, upstream = remote
    client = _openai(server)
    one = client.chat.completions.create(model="cloud", messages=ASKED, tools=TOOLS, parallel_tool_calls=False)
    assert upstream.last_bodies[-1]["parallel_tool_calls"] is False
    assert [(c.function.name, c.function.arguments) for c in one.choices[0].message.tool_calls] == EXPECTED[:1]
    client.chat.completions.create(model="cloud", messages=ASKED, tools=TOOLS, parallel_tool_calls=True,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    sent = upstream.last_bodies[-1]
    assert sent["parallel_tool_calls"] is True
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    client.responses.create(model="cloud", input="weather?", parallel_tool_calls=False, tools=[
        {"type": "function", "name": "get_weather", "parameters": CITY}])
    assert upstream.last_bodies[-1]["parallel_tool_calls"] is False


def test_responses_api_gives_the_same_calls(remote):
    server, _ = remote
    client = _openai(server)
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": CITY} for t in TOOLS]
    whole = client.responses.create(model="cloud", input="weather and time in Paris?", tools=tools)
    assert [(i.type, i.name, i.arguments) for i in whole.output] == [("function_call", *c) for c in EXPECTED]
    with client.responses.stream(model="cloud", input="weather and time in Paris?", tools=tools) as stream:
        deltas = [e for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert [(i.type, i.name, i.arguments) for i in final.output] == [("function_call", *c) for c in EXPECTED]
    for index in (0, 1):
        assert "".join(e.delta for e in deltas if e.output_index == index) == ARGUMENTS


def test_anthropic_messages_give_the_same_calls_as_tool_use_blocks(remote):
    server, _ = remote
    client = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    tools = [{"name": t["function"]["name"], "input_schema": CITY} for t in TOOLS]
    expected = [("tool_use", name, json.loads(arguments)) for name, arguments in EXPECTED]
    whole = client.messages.create(model="cloud", max_tokens=64, messages=ASKED, tools=tools)
    assert [(b.type, b.name, b.input) for b in whole.content] == expected and whole.stop_reason == "tool_use"
    with client.messages.stream(model="cloud", max_tokens=64, messages=ASKED, tools=tools) as stream:
        partial = [e.delta.partial_json for e in stream
                   if e.type == "content_block_delta" and e.delta.type == "input_json_delta" and e.index == 0]
        final = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in final.content] == expected and final.stop_reason == "tool_use"
    assert "".join(partial) == ARGUMENTS


def test_a_non_stream_body_merges_streamed_pieces_by_index():
    pieces = [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"a"'}},
              {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": ""}},
              {"index": 0, "function": {"arguments": ": 1}"}},  # the calls interleave
              {"index": 1, "function": {"arguments": "{}"}}]
    for finish in ("tool_calls", "stop"):  # finish_reason stays the backend's
        shaper = ResponseShaper(kind="chat", request_id="chatcmpl-x", created=0, model="m")
        for piece in pieces:
            shaper.add(Delta(tool_calls=[piece]))
        shaper.add(Delta(finish_reason=finish, is_final=True))
        choice = shaper.body(Usage(3, 4), {})["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
        assert choice["finish_reason"] == finish
        AssistantMessage.model_validate(choice["message"])  # the documented response shape
