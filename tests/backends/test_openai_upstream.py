"""OpenAIUpstream against a real uvicorn server running the fake OpenAI upstream (bench/fake_upstream.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from backends.base import Backend, BackendError, GenerationRequest, SamplingParams
from backends.openai_upstream import OpenAIUpstream
from bench.fake_upstream import FakeBehavior, FakeUpstream
from tests.conftest import free_port
from tests.gateway.fakes import wait_until_async


def chat(max_tokens: int = 4, **kw) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, **kw.pop("sampling", {}))
    return GenerationRequest(request_id="r1", model="ignored", messages=[{"role": "user", "content": "hi"}],
                             sampling=sampling, **kw)


async def collect(backend, request, **kw):
    return [d async for d in backend.generate(request, **kw)]


@pytest.fixture(autouse=True, params=["lean", "httpx"])
def client_kind(request, monkeypatch):
    """Every test runs on both transports (the default for http:// is the lean one)."""
    defaults = dict(OpenAIUpstream.__init__.__kwdefaults__, client=request.param)
    monkeypatch.setattr(OpenAIUpstream.__init__, "__kwdefaults__", defaults)
    return request.param


@pytest.fixture
def fake(live_server):
    app = FakeUpstream(name="a", model="up-model", behavior=FakeBehavior(num_tokens=4))
    server = live_server(app)
    return app, f"{server.base_url}/v1"


async def test_stream_chat_maps_chunks_to_deltas(fake):
    app, url = fake
    up = OpenAIUpstream("a", url, "up-model")
    assert isinstance(up, Backend)
    try:
        deltas = await collect(up, chat(max_tokens=3))
    finally:
        await up.close()
    assert "".join(d.text for d in deltas) == "tok0 tok1 tok2 "
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    assert [d.is_final for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 3
    assert deltas[-1].usage.prompt_tokens == 7
    body = app.last_bodies[-1]
    assert body["model"] == "up-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_buffered_equals_stream_and_passes_options(fake):
    app, url = fake
    up = OpenAIUpstream("a", url, "up-model", "sk-up", supports_json_mode=True)
    request = chat(max_tokens=4, sampling={"stop": ("zz",), "seed": 3, "temperature": 0.0}, user="u1",
                   response_format={"type": "json_object"})
    streamed = await collect(up, request)
    whole = await collect(up, request, stream=False)
    await up.close()
    assert "".join(d.text for d in streamed) == "".join(d.text for d in whole) == "tok0 tok1 tok2 tok3 "
    assert whole[-1].is_final and whole[-1].finish_reason == "length" and whole[-1].usage.completion_tokens == 4
    body = app.last_bodies[-1]
    assert body["stream"] is False and "stream_options" not in body
    assert body["stop"] == ["zz"] and body["seed"] == 3 and body["user"] == "u1"
    assert body["response_format"] == {"type": "json_object"} and body["temperature"] == 0.0
    assert app.last_headers["authorization"] == "Bearer sk-up"
    assert app.last_headers["content-type"] == "application/json"


async def test_completions_logprobs_and_n(fake):
    app, url = fake
    up = OpenAIUpstream("a", url, "up-model")
    request = GenerationRequest(request_id="r", model="m", prompt="Once upon",
                                sampling=SamplingParams(max_tokens=2, logprobs=2, n=2))
    deltas = await collect(up, request)
    whole = await collect(up, request, stream=False)
    await up.close()
    assert app.last_bodies[-1]["logprobs"] == 2 and app.last_bodies[-1]["prompt"] == "Once upon"
    for idx in (0, 1):
        mine = [d for d in deltas if d.index == idx]
        assert "".join(d.text for d in mine) == "tok0 tok1 "
        assert [d.finish_reason for d in mine if d.finish_reason] == ["length"]
        lps = [lp for d in mine for lp in d.logprobs]
        assert [lp.token for lp in lps] == ["tok0 ", "tok1 "]
        assert lps[0].logprob == -0.5 and lps[0].top_logprobs == (("tok0 ", -0.5), ("alt1", -1.5))
    assert sum(d.is_final for d in deltas) == 1 and deltas[-1].usage.completion_tokens == 4
    assert [d.index for d in whole] == [0, 1] and len(whole[0].logprobs) == 2


async def test_chat_logprobs(fake):
    _, url = fake
    up = OpenAIUpstream("a", url, "up-model")
    deltas = await collect(up, chat(max_tokens=2, sampling={"logprobs": 2}))
    await up.close()
    lps = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token for lp in lps] == ["tok0 ", "tok1 "]
    assert lps[1].top_logprobs == (("tok1 ", -0.5), ("alt1", -1.5))


async def test_tools_pass_through_or_are_rejected(fake):
    app, url = fake
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    up = OpenAIUpstream("a", url, "up-model", supports_tools=True)
    deltas = await collect(up, chat(tools=tools, tool_choice="auto"))
    whole = await collect(up, chat(tools=tools), stream=False)
    await up.close()
    calls = [c for d in deltas if d.tool_calls for c in d.tool_calls]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert deltas[-1].finish_reason == "tool_calls"
    assert whole[0].tool_calls[0]["function"]["name"] == "get_weather" and whole[0].tool_calls[0]["index"] == 0
    assert app.last_bodies[-1]["tools"] == tools

    plain = OpenAIUpstream("a", url, "up-model")
    with pytest.raises(BackendError) as err:
        await collect(plain, chat(tools=tools))
    assert err.value.status_code == 400 and not err.value.retryable and err.value.code == "tools_not_supported"
    await plain.close()


@pytest.mark.parametrize("stream", [True, False])
async def test_status_errors(fake, stream):
    app, url = fake
    up = OpenAIUpstream("a", url, "up-model")
    app.behavior = FakeBehavior(mode="error_500")
    with pytest.raises(BackendError) as err:
        await collect(up, chat(), stream=stream)
    assert err.value.retryable and err.value.status_code == 502 and not err.value.after_first_token
    assert "fake upstream is failing" in err.value.message
    app.behavior = FakeBehavior(mode="error_400")
    with pytest.raises(BackendError) as err:
        await collect(up, chat(), stream=stream)
    assert not err.value.retryable and err.value.status_code == 400 and err.value.code == "bad_fake"
    assert "rejects this request" in err.value.message
    await up.close()


async def test_connection_refused_is_retryable():
    up = OpenAIUpstream("dead", f"http://127.0.0.1:{free_port()}/v1", "m", connect_timeout_s=0.5)
    with pytest.raises(BackendError) as err:
        await collect(up, chat())
    assert err.value.retryable and err.value.code == "upstream_connect_error"
    assert await up.health() is False
    await up.close()


async def test_hang_times_out_retryably(fake):
    app, url = fake
    app.behavior = FakeBehavior(mode="hang")
    up = OpenAIUpstream("a", url, "up-model", timeout_s=0.3)
    with pytest.raises(BackendError) as err:  # the upstream never answers: only the 0.3 s timeout ends it
        await collect(up, chat())
    assert err.value.retryable and err.value.code == "upstream_timeout" and err.value.status_code == 504
    await up.close()


async def test_deadline_bounds_the_request(fake):
    app, url = fake
    app.behavior = FakeBehavior(mode="hang")
    up = OpenAIUpstream("a", url, "up-model", timeout_s=30)
    with pytest.raises(BackendError) as err:
        await collect(up, chat(deadline=time.monotonic() + 0.3))
    assert err.value.status_code == 504
    with pytest.raises(BackendError) as err:
        await collect(up, chat(deadline=time.monotonic() - 1))
    assert err.value.code == "deadline_exceeded" and not err.value.retryable
    await up.close()


async def test_die_mid_stream_is_after_first_token(fake):
    app, url = fake
    app.behavior = FakeBehavior(mode="die_mid_stream", num_tokens=6, die_after_tokens=2)
    up = OpenAIUpstream("a", url, "up-model")
    got = []
    with pytest.raises(BackendError) as err:
        async for d in up.generate(chat(max_tokens=6)):
            got.append(d)
    assert "".join(d.text for d in got) == "tok0 tok1 "
    assert err.value.after_first_token and not err.value.retryable
    with pytest.raises(BackendError) as err:  # non-stream: fails before anything → retryable
        await collect(up, chat(max_tokens=6), stream=False)
    assert err.value.retryable and not err.value.after_first_token
    await up.close()


async def test_health_and_closing_aborts_upstream(fake):
    app, url = fake
    up = OpenAIUpstream("a", url, "up-model")
    assert await up.health() is True
    app.behavior = FakeBehavior(mode="error_500")
    assert await up.health() is False
    app.behavior = FakeBehavior(num_tokens=200, token_delay_s=0.02)
    gen = up.generate(chat(max_tokens=200))
    first = await anext(gen)
    assert first.text == "tok0 " and app.num_in_flight == 1
    await gen.aclose()
    for _ in range(100):
        if app.num_in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert app.num_in_flight == 0
    await up.close()


def test_bad_arguments_raise_value_error(client_kind):
    assert OpenAIUpstream("a", "http://x/v1", "m").client_kind == client_kind
    assert OpenAIUpstream("a", "https://x/v1", "m", client="auto").client_kind == "httpx"
    with pytest.raises(ValueError):
        OpenAIUpstream("a", "https://x/v1", "m", client="lean")
    with pytest.raises(ValueError):
        OpenAIUpstream("a", "ftp://x", "m")
    with pytest.raises(ValueError):
        OpenAIUpstream("a", "http://x/v1", "m", timeout_s=0)


async def test_events_split_across_reads_and_crlf(live_server):
    pieces = [b'data: {"choices":[{"index":0,"delta":{"content":"hel', b'lo"},"finish_reason":null}]}\r\n\r\n',
              b'data: {"choices":[{"index":0,"delta":{"content":" world"},"finish_reason":null}]}\r\n\r\n'
              b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}\r\n\r\n'
              b'data: [DONE]\r\n\r\n']

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    up = OpenAIUpstream("split", f"{live_server(app).base_url}/v1", "m")
    deltas = await collect(up, chat())
    await up.close()
    assert "".join(d.text for d in deltas) == "hello world"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage.completion_tokens == 2


async def test_lean_pool_reconnects_after_the_server_closed_idle_connections(live_server):
    app = FakeUpstream(behavior=FakeBehavior(num_tokens=2))
    server = live_server(app, timeout_keep_alive=0.2)
    up = OpenAIUpstream("a", f"{server.base_url}/v1", "m", client="lean")
    assert "".join(d.text for d in await collect(up, chat())) == "tok0 tok1 "
    assert len(up._lean.idle) == 1
    connections = server.server.server_state.connections  # uvicorn closes the idle keep-alive connection
    await wait_until_async(lambda: not connections, "uvicorn to close the idle connection")
    assert "".join(d.text for d in await collect(up, chat(), stream=False)) == "tok0 tok1 "
    assert app.num_requests == 2
    await up.close()


async def test_deadline_mid_stream_is_after_first_token(fake):
    app, url = fake
    app.behavior = FakeBehavior(num_tokens=100, token_delay_s=0.05)
    up = OpenAIUpstream("a", url, "up-model", timeout_s=30)
    got = []
    with pytest.raises(BackendError) as err:  # 100 tokens take 5 s: the 1 s deadline cuts the stream
        async for d in up.generate(chat(max_tokens=100, deadline=time.monotonic() + 1.0)):
            got.append(d)
    assert got
    assert err.value.code == "deadline_exceeded" and err.value.after_first_token and err.value.status_code == 504
    await up.close()


async def test_idle_timeout_between_stream_chunks(fake):
    app, url = fake
    app.behavior = FakeBehavior(num_tokens=5, token_delay_s=3.0)
    up = OpenAIUpstream("a", url, "up-model", timeout_s=1.0)
    got = []
    with pytest.raises(BackendError) as err:
        async for d in up.generate(chat(max_tokens=5)):
            got.append(d)
    assert [d.text for d in got] == ["tok0 "]
    assert err.value.code == "upstream_timeout" and err.value.after_first_token
    await up.close()


@pytest.mark.parametrize("stream", [True, False])
async def test_large_answers_and_connection_reuse(fake, stream):
    app, url = fake
    app.behavior = FakeBehavior(num_tokens=3000)
    up = OpenAIUpstream("a", url, "up-model")
    for _ in range(3):
        deltas = await collect(up, chat(max_tokens=3000), stream=stream)
        text = "".join(d.text for d in deltas)
        assert text.startswith("tok0 tok1 ") and text.endswith("tok2999 ") and len(text) > 20000
    if up._lean is not None:
        assert len(up._lean.idle) == 1  # one keep-alive connection served all three
    await up.close()
