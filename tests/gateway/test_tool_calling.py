"""Tool calling and JSON schemas on the embedded engine: the official openai SDK against a live server.

Tiny random Qwen2/Qwen3 fixtures whose template takes ``tools`` (tests/conftest.py TOOLS_CHAT_TEMPLATE) and a
tiny Llama whose template does not (the system-prompt rendering). Random weights: every call is valid only
because the grammar makes it so.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from backends.engine.args import EngineArgs
from gateway.app import create_app
from gateway.engine_server import engine_settings

OPTIONS = EngineArgs(num_kv_blocks=512, block_size=16, max_model_len=2048, max_num_batched_tokens=512, num_threads=1,
                     device="cpu")

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
}, "required": ["city", "unit", "days"]}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def client(request, tiny_model_dir):
    from tests.conftest import start_live_server

    live = start_live_server(create_app(engine_settings(str(tiny_model_dir(request.param)), OPTIONS,
                                                        served_name="tiny")))
    yield openai.OpenAI(base_url=live.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    live.stop()


def _valid(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_named_tool_choice_at_temperature_1_always_yields_a_valid_call(client):
    seen = set()
    for seed in range(20):
        resp = client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        seen.add(json.dumps(_valid(call), sort_keys=True))
    assert len(seen) > 10  # sampled arguments, not one forced string


def test_required_and_auto(client):
    for seed in range(5):
        resp = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                              temperature=1.0, seed=seed, max_tokens=300, parallel_tool_calls=False)
        calls = resp.choices[0].message.tool_calls
        assert resp.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        _valid(calls[0])
    auto = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=1.0, seed=3,
                                          max_tokens=40)
    for call in auto.choices[0].message.tool_calls or []:  # auto: text, or calls that are valid
        _valid(call)
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_stream_and_non_stream_give_the_same_calls(client):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300,
              parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    pieces = 0
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                pieces += 1
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert slot["id"] is None  # id and name come once, first
                    slot["id"], slot["name"] = tc.id, tc.function.name
                slot["arguments"] += tc.function.arguments or ""
    assert finish == "tool_calls" and whole.finish_reason == "tool_calls"
    assert pieces > len(calls)  # arguments arrive in pieces after the call's first chunk
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    with client.chat.completions.stream(**kw) as stream:  # the SDK's own accumulator
        final = stream.get_final_completion()
    assert [(t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls]


def test_agent_loop_with_tool_results_in_the_history(client):
    messages = list(ASK)
    for turn in range(2):
        resp = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                              temperature=1.0, seed=turn, max_tokens=300, parallel_tool_calls=False)
        assert resp.choices[0].finish_reason == "tool_calls"
        message = resp.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            _valid(call)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": turn})})
    final = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=8)
    assert final.choices[0].message.tool_calls is None and final.usage.prompt_tokens > 100


class Person(BaseModel):  # bounded fields: random weights would write an unbounded string forever
    name: str = Field(pattern="^[A-Z][a-z]{1,8}$")
    age: int = Field(ge=0, le=130)
    member: bool


def test_json_schema_and_parse_with_a_pydantic_model(client):
    schema = {"type": "object", "properties": {"title": {"type": "string", "pattern": "^[a-z]{1,10}$"},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                                               "score": {"type": "number"}},
              "required": ["title", "tags", "score"], "additionalProperties": False}
    for seed in range(10):
        resp = client.chat.completions.create(
            model="tiny", messages=ASK, temperature=1.0, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}})
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    obj = client.chat.completions.create(model="tiny", messages=ASK, temperature=1.0, seed=1, max_tokens=200,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    parsed = client.chat.completions.parse(model="tiny", messages=ASK, temperature=0, max_tokens=300,
                                           response_format=Person)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and isinstance(person.age, int)


def test_a_template_without_tools_gets_the_system_prompt_rendering(tiny_model_dir):
    from tests.conftest import start_live_server

    plain = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    live = start_live_server(create_app(engine_settings(str(tiny_model_dir("qwen2")), OPTIONS, served_name="tiny",
                                                        chat_template=plain)))
    try:
        client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        small = [{"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
        resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "time?"}],
                                              tools=small, tool_choice="required", temperature=1.0, seed=0,
                                              max_tokens=100, parallel_tool_calls=False)
        (call,) = resp.choices[0].message.tool_calls
        _valid(call)
        assert resp.usage.prompt_tokens > 100  # the tool list went into the (system) prompt
    finally:
        live.stop()


def test_responses_and_messages_apis_get_the_local_calls(client):
    """The agent APIs over the same local pool: a Responses function_call item and an Anthropic tool_use
    block, arguments valid against the tool's schema."""
    import anthropic

    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER}
    resp = client.responses.create(model="tiny", input="Weather in Paris?", tools=[tool], tool_choice="required",
                                   parallel_tool_calls=False, temperature=1.0, max_output_tokens=200)
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    claude = anthropic.Anthropic(base_url=str(client.base_url).removesuffix("/v1/"), api_key="none", max_retries=0)
    message = claude.messages.create(model="tiny", max_tokens=200, extra_body={"temperature": 1.0},
                                     tools=[{"name": "get_weather", "input_schema": WEATHER}],
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": "Weather in Paris?"}])
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER)
