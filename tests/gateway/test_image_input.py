"""Image parts: chat ``image_url``, Responses ``input_image`` and Anthropic ``image`` blocks reach remote pools
that declare ``supports_vision`` as chat ``image_url`` parts (recorded by a live FakeUpstream behind a real
OpenAIUpstream, sent with the official SDKs); every other pool — the embedded engine included — answers a 400
in the endpoint's own error shape naming the field; ``model: "auto"`` sends an image request to the LLM pool
when only it takes images."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from backends.base import BackendError, GenerationRequest
from backends.openai_upstream import OpenAIUpstream
from bench.fake_upstream import FakeUpstream
from gateway.app import create_app
from gateway.settings import settings_from_dict
from tests.gateway.fakes import fake_local_real_remote, fake_settings

PNG = "data:image/png;base64," + "iVBORw0KGgo" * 10_000  # 110,000 characters: far above the prompt-token limit as text
URL = "https://example.com/cat.png"
CHAT_PARTS = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": URL, "detail": "low"}},
              {"type": "text", "text": " and this?"}, {"type": "image_url", "image_url": {"url": PNG}}]


def _gateway(live_server, *, vision_pool: str | None):
    """slm: a fake local pool; llm and cloud: real OpenAIUpstreams in front of one FakeUpstream, ``vision_pool``
    (if any) declaring supports_vision."""
    upstream_app = FakeUpstream()
    url = live_server(upstream_app).base_url + "/v1"
    pools = [{"name": "slm", "model": "fake-slm"},
             {"name": "llm", "kind": "remote", "model": "big", "urls": [url], "supports_vision": vision_pool == "llm"},
             {"name": "cloud", "kind": "remote", "model": "m", "urls": [url], "supports_vision": vision_pool == "cloud"}]
    server = live_server(create_app(fake_settings(pools=pools, routing={}), backend_factory=fake_local_real_remote))
    return server, upstream_app


def test_image_parts_reach_a_vision_pool_from_every_api(live_server):
    server, upstream = _gateway(live_server, vision_pool="cloud")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": CHAT_PARTS}])
    assert upstream.last_bodies[-1]["messages"] == [{"role": "user", "content": CHAT_PARTS}]
    streamed = client.chat.completions.create(model="cloud", stream=True, messages=[
        {"role": "user", "content": CHAT_PARTS}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert upstream.last_bodies[-1]["messages"][0]["content"] == CHAT_PARTS
    # text-only content is still flattened to a string
    client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert upstream.last_bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]

    client.responses.create(model="cloud", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": URL, "detail": "high"}]}])
    assert upstream.last_bodies[-1]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": URL, "detail": "high"}}]}]

    claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    claude.messages.create(model="cloud", max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo"}},
        {"type": "image", "source": {"type": "url", "url": URL}},
        {"type": "text", "text": "compare"}]}])
    assert upstream.last_bodies[-1]["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo"}},
        {"type": "image_url", "image_url": {"url": URL}}, {"type": "text", "text": "compare"}]}]


def test_pools_without_vision_answer_400_in_each_api_shape(live_server):
    server, upstream = _gateway(live_server, vision_pool="cloud")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    num_sent = upstream.num_requests
    for model in ("slm", "llm"):  # the embedded engine's pool, and a remote pool without supports_vision
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT_PARTS}])
        error = info.value.body
        assert error["code"] == "image_input_not_supported" and error["param"] == "messages"
        assert f"Pool {model!r} does not accept image input in messages (pools that take images: cloud)" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="slm", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": URL}]}])
    assert info.value.body["param"] == "input" and info.value.body["code"] == "image_input_not_supported"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="cloud", input=[{"role": "user", "content": [
            {"type": "input_image", "file_id": "file-1"}]}])
    assert "input_image.image_url: Field required" in info.value.body["message"]
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="slm", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": URL}}]}])
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    assert "does not accept image input in messages" in info.value.body["error"]["message"]
    bad = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "cloud", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]})
    assert bad.status_code == 400 and "image_url" in bad.json()["error"]["message"]
    assert upstream.num_requests == num_sent  # nothing reached the upstream


def test_auto_routes_images_to_the_llm_pool_when_only_it_takes_them(live_server):
    server, upstream = _gateway(live_server, vision_pool="llm")
    r = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": CHAT_PARTS}]})
    assert r.status_code == 200 and r.headers["x-switchyard-model"] == "llm"
    assert upstream.last_bodies[-1]["model"] == "big" and upstream.last_bodies[-1]["messages"][0]["content"] == CHAT_PARTS
    text_only = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert text_only.headers["x-switchyard-model"] == "slm"  # no image: the router's choice stands

    server, _ = _gateway(live_server, vision_pool=None)
    r = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": CHAT_PARTS}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_input_not_supported"
    assert "no pool takes images: set supports_vision on a remote pool" in r.json()["error"]["message"]


def test_backends_refuse_images_they_cannot_take():
    request = GenerationRequest(request_id="r", model="m", messages=[{"role": "user", "content": CHAT_PARTS}])
    assert request.has_images
    with pytest.raises(BackendError) as info:
        OpenAIUpstream("u", "http://127.0.0.1:9/v1", "m").build_payload(request, stream=False)
    assert info.value.status_code == 400 and info.value.code == "image_input_not_supported"
    _, body = OpenAIUpstream("u", "http://127.0.0.1:9/v1", "m", supports_vision=True).build_payload(request, stream=False)
    assert body["messages"][0]["content"] == CHAT_PARTS


async def test_the_embedded_engine_refuses_images():
    from backends.local import LocalBackend

    backend = LocalBackend("slm", "unused-model")  # refused before the engine is needed
    request = GenerationRequest(request_id="r", model="m", messages=[{"role": "user", "content": CHAT_PARTS}])
    with pytest.raises(BackendError) as info:
        async for _ in backend.generate(request):
            pass
    assert info.value.status_code == 400 and info.value.code == "image_input_not_supported"


def test_supports_vision_is_a_remote_capability():
    settings = settings_from_dict({"pools": [
        {"name": "slm", "model": "x", "supports_vision": True},  # ignored: the embedded engine is text-only
        {"name": "llm", "kind": "remote", "model": "y", "urls": ["http://127.0.0.1:9/v1"], "supports_vision": True}]})
    assert [p.serves_images for p in settings.pools] == [False, True]
