"""Through the gateway: remote pools on fake upstreams (real uvicorn), a 200-request burst, one replica killed."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai

from bench.fake_upstream import FakeBehavior, FakeUpstream
from gateway.app import create_app
from gateway.settings import settings_from_dict
from tests.conftest import start_live_server

EXPECTED = "".join(f"tok{i} " for i in range(8))


def test_burst_with_one_replica_killed_loses_nothing(live_server):
    upstreams = [FakeUpstream(name=f"u{i}", model="fake-model",
                              behavior=FakeBehavior(num_tokens=8, token_delay_s=0.01)) for i in range(3)]
    servers = [start_live_server(u) for u in upstreams]
    try:
        settings = settings_from_dict({
            "pools": [
                {"name": "slm", "kind": "remote", "model": "fake-model", "max_retries": 3,
                 "urls": [s.base_url + "/v1" for s in servers[:2]]},
                {"name": "llm", "kind": "remote", "model": "fake-model", "urls": [servers[2].base_url + "/v1"]},
            ],
            "routing": {"cascade": {"mode": "off"}},
            "example_cache": {"enabled": False},
        })
        gateway = live_server(create_app(settings))
        client = openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0, timeout=60)

        async def one(i: int) -> str:
            messages = [{"role": "user", "content": f"request {i}"}]
            if i % 2:
                stream = await client.chat.completions.create(model="slm", messages=messages, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            resp = await client.chat.completions.create(model="slm", messages=messages)
            return resp.choices[0].message.content

        async def burst() -> list:
            tasks = [asyncio.create_task(one(i)) for i in range(200)]
            await asyncio.sleep(0.05)
            threading.Thread(target=servers[1].stop, daemon=True).start()  # replica 1 goes away mid-burst
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(burst())
        failures = [r for r in results if not isinstance(r, str) or r != EXPECTED]
        assert not failures, f"{len(failures)} of 200 failed, e.g. {failures[:3]}"
        assert upstreams[0].num_requests > 0
        # after the burst the dead replica is refused/ejected and traffic keeps flowing
        sync = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0)
        for _ in range(5):
            assert sync.chat.completions.create(model="slm", messages=[{"role": "user", "content": "x"}]) \
                .choices[0].message.content == EXPECTED
        # /metrics: every request reached the pool once and none ended in an error for the caller
        metrics = httpx.get(gateway.base_url + "/metrics").text
        assert 'switchyard_pool_events_total{event="requests",pool="slm"} 205.0' in metrics
        assert 'switchyard_pool_events_total{event="failures",pool="slm"} 0.0' in metrics
    finally:
        for s in servers:
            s.stop()


def test_remote_pool_passes_tools_json_mode_and_logprobs_through(live_server):
    upstream = FakeUpstream(name="u", model="up-model", behavior=FakeBehavior(num_tokens=4))
    up = live_server(upstream)
    settings = settings_from_dict({
        "pools": [{"name": "slm", "kind": "remote", "model": "up-model", "urls": [up.base_url + "/v1"],
                   "supports_tools": True, "supports_json_mode": True},
                  {"name": "llm", "kind": "remote", "model": "up-model", "urls": [up.base_url + "/v1"]}],
        "example_cache": {"enabled": False},
    })
    gateway = live_server(create_app(settings))
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    resp = client.chat.completions.create(model="slm", messages=[{"role": "user", "content": "hi"}], tools=tools,
                                          tool_choice="required")
    assert resp.choices[0].finish_reason == "tool_calls" and resp.choices[0].message.tool_calls
    assert upstream.last_bodies[-1]["tools"] == tools and upstream.last_bodies[-1]["tool_choice"] == "required"
    client.chat.completions.create(model="slm", messages=[{"role": "user", "content": "hi"}],
                                   response_format={"type": "json_object"})
    assert upstream.last_bodies[-1]["response_format"] == {"type": "json_object"}
    with_lp = client.chat.completions.create(model="slm", messages=[{"role": "user", "content": "hi"}],
                                             logprobs=True, top_logprobs=1, max_tokens=3)
    assert len(with_lp.choices[0].logprobs.content) == 3
    with openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0) as c2:
        try:
            c2.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], tools=tools)
            raise AssertionError("expected 400")
        except openai.BadRequestError as e:
            assert e.code == "tools_not_supported"
