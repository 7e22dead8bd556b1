"""backends/tool_calls.py: formats, rendering, the grammar a tool_choice asks for, the incremental parser."""

from __future__ import annotations

import json
import random

import pytest

from backends.tool_calls import (
    HERMES,
    LLAMA3_JSON,
    Tool,
    ToolCallParser,
    detect_format,
    invalid_call_reason,
    parse_output,
    render_messages,
    resolve_format,
    structural_tag,
    template_takes_tools,
)

TOOLS = [Tool("get_weather", "Weather for a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]}),
         Tool("get_time", "", {"type": "object", "properties": {}})]
TWO_CALLS = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}", "n": [1, {"b": 2}]}}'
             '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def _stream(fmt, text: str, rng: random.Random) -> tuple[str, list[dict], ToolCallParser]:
    parser, content, pieces, i = ToolCallParser(fmt), "", [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        c, p = parser.feed(text[i:i + k])
        content, pieces, i = content + c, pieces + p, i + k
    return content + parser.finish(), pieces, parser


def test_any_split_of_the_text_gives_the_same_content_and_calls():
    whole = parse_output(HERMES, TWO_CALLS)
    assert whole.content == "Sure.\n"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls] == [
        ("get_weather", '{"city": "Pa\\"ris {x}", "n": [1, {"b": 2}]}'), ("get_time", "{}")]
    rng = random.Random(0)
    for _ in range(200):
        content, pieces, _ = _stream(HERMES, TWO_CALLS, rng)
        assert content == whole.content
        firsts = [p for p in pieces if "id" in p]
        assert [p["function"]["name"] for p in firsts] == ["get_weather", "get_time"]
        assert all(p["function"]["arguments"] == "" and p["id"].startswith("call_") for p in firsts)
        args: dict[int, str] = {}
        for p in pieces:
            args[p["index"]] = args.get(p["index"], "") + p["function"]["arguments"]
        assert [args[0], args[1]] == [c["function"]["arguments"] for c in whole.tool_calls]


def test_llama3_json_and_text_that_only_looks_like_a_call():
    out = parse_output(LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Rome"}}; '
                                    '{"name": "get_time", "parameters": {}}')
    assert out.content == "" and [json.loads(c["function"]["arguments"]) for c in out.tool_calls] == [
        {"city": "Rome"}, {}]
    assert parse_output(HERMES, "a <tool_call> b").content == "a <tool_call> b"
    long_text = "I mention <tool_call> in prose " + "and go on " * 30
    assert parse_output(HERMES, long_text) == parse_output(HERMES, long_text)  # deterministic
    assert parse_output(HERMES, long_text).content == long_text and not parse_output(HERMES, long_text).tool_calls


def test_formats_are_detected_from_the_template():
    assert detect_format("...<tool_call>...") is HERMES
    assert detect_format('{{ "<|python_tag|>" }} ipython "parameters"') is LLAMA3_JSON
    assert detect_format(None) is HERMES
    assert resolve_format("llama3_json", "<tool_call>") is LLAMA3_JSON
    with pytest.raises(ValueError):
        resolve_format("mistral", None)
    assert template_takes_tools("{% if tools %}x{% endif %}") and not template_takes_tools("{{ messages }}")


def test_system_prompt_rendering_for_templates_without_tools():
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
               {"role": "tool", "tool_call_id": "call_2", "content": "noon"}]
    out = render_messages(history, TOOLS, HERMES, template_has_tools=False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\nrain\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    no_list = render_messages(history, [], HERMES, template_has_tools=False)  # tool_choice none
    assert "<tools>" not in no_list[0]["content"]
    native = render_messages(history, TOOLS, HERMES, template_has_tools=True)  # the template renders tools
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_the_grammar_each_tool_choice_asks_for():
    assert structural_tag(HERMES, TOOLS, "none", True) is None
    named = structural_tag(HERMES, TOOLS, {"type": "function", "function": {"name": "get_time"}}, True)
    assert named["format"]["type"] == "tag" and named["format"]["begin"].endswith('"get_time", "arguments": ')
    required = structural_tag(HERMES, TOOLS, "required", False)["format"]
    assert required["type"] == "tags_with_separator" and required["at_least_one"] and required["stop_after_first"]
    auto = structural_tag(HERMES, TOOLS, None, True)["format"]
    assert auto["type"] == "triggered_tags" and auto["triggers"] == ["<tool_call>"] and not auto["at_least_one"]
    with pytest.raises(ValueError, match="not in tools"):
        structural_tag(HERMES, TOOLS, {"type": "function", "function": {"name": "nope"}}, True)


def test_invalid_call_reasons():
    assert invalid_call_reason({"name": "get_weather", "arguments": '{"city": "x"}'}, TOOLS) is None
    assert "unknown" in invalid_call_reason({"name": "x", "arguments": "{}"}, TOOLS)
    assert "not JSON" in invalid_call_reason({"name": "get_weather", "arguments": "{"}, TOOLS)
    assert "schema" in invalid_call_reason({"function": {"name": "get_weather", "arguments": "{}"}}, TOOLS)
