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
