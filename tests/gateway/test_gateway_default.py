"""`switchyard serve` with no config: the embedded default answers with the real bundled models."""

from __future__ import annotations

import openai
import pytest

from gateway.app import create_app
from gateway.settings import load_settings


@pytest.mark.slow
def test_embedded_default_answers_chat_with_real_models(live_server, bundled_model_dir):
    bundled_model_dir("smollm2-135m")
    bundled_model_dir("gemma3-270m")
    settings = load_settings(None, environ={})
    assert [p.model for p in settings.pools] == ["smollm2-135m", "gemma3-270m"]
    server = live_server(create_app(settings))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
        temperature=0)
    resp = raw.parse()
    assert raw.headers["x-switchyard-route"] == "slm_then_escalate"
    assert raw.headers["x-switchyard-model"] in ("slm", "llm")
    assert resp.choices[0].message.content.strip()
    if raw.headers["x-switchyard-model"] == "slm":
        assert "Paris" in resp.choices[0].message.content
    llm = client.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    assert llm.model == "gemma3-270m" and llm.usage.completion_tokens <= 16
    # plain_turns: the base model answers instead of echoing, and stops before inventing the next turn
    assert "Paris" in llm.choices[0].message.content and "User:" not in llm.choices[0].message.content


@pytest.mark.slow
def test_embedded_default_answers_responses_and_messages(live_server, bundled_model_dir):
    """The agent APIs on the real bundled models: Responses (stream == non-stream at temperature 0, a stored
    conversation continued) and Anthropic Messages."""
    import anthropic

    bundled_model_dir("smollm2-135m")
    bundled_model_dir("gemma3-270m")
    server = live_server(create_app(load_settings(None, environ={})))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    first = client.responses.create(model="slm", input="What is the capital of France?", max_output_tokens=8,
                                    temperature=0)
    assert first.status in ("completed", "incomplete") and "Paris" in first.output_text
    with client.responses.stream(model="slm", input="What is the capital of France?", max_output_tokens=8,
                                 temperature=0) as stream:
        streamed = stream.get_final_response()
    assert streamed.output_text == first.output_text
    follow = client.responses.create(model="slm", input="And of Italy?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    assert follow.output_text.strip()
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
    message = claude.messages.create(model="slm", max_tokens=8, extra_body={"temperature": 0},
                                     messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert message.content[0].text == first.output_text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens <= 8


@pytest.mark.slow
def test_bundled_slm_runs_an_agent_loop_with_valid_calls(live_server, bundled_model_dir):
    """`make serve`'s SLM (SmolLM2, a template without tools: the system-prompt rendering) drives the README's
    agent loop through the SDK: call → tool result → call → tool result → final answer; every call
    validates against its tool's schema."""
    import json

    import jsonschema

    bundled_model_dir("smollm2-135m")
    bundled_model_dir("gemma3-270m")
    server = live_server(create_app(load_settings(None, environ={})))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                               "parameters": weather}}]
    messages = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
    for turn in range(2):
        resp = client.chat.completions.create(model="slm", messages=messages, tools=tools, tool_choice="required",
                                              parallel_tool_calls=False, temperature=0, max_tokens=64)
        assert resp.choices[0].finish_reason == "tool_calls"
        (call,) = resp.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), weather)
        messages += [resp.choices[0].message,
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18 + turn})}]
    final = client.chat.completions.create(model="slm", messages=messages, tools=tools, tool_choice="none",
                                           temperature=0, max_tokens=32)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content.strip()
