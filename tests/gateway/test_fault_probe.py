"""The fault probe: a live gateway (uvicorn, remote pools over real HTTP to fake upstreams, Redis for the
rate limiter and the example cache) under the inputs and faults a hostile or broken world sends.

For every case: never a 500, no traceback in the log, the right status and OpenAI's error shape; at the
end the metrics add up (every request that reached the app is counted exactly once) and the gateway
still serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket

import httpx
import pytest

from bench.fake_upstream import FakeBehavior, FakeUpstream
from gateway.app import create_app
from gateway.settings import hash_api_key, settings_from_dict
from tests.gateway.fakes import requests_total

KEY = "sk-probe"
AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = {"model": "slm", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture
def probe(live_server, redis_url, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    ok = live_server(FakeUpstream(name="ok", behavior=FakeBehavior(num_tokens=20, token_delay_s=0.03)))
    resets = live_server(FakeUpstream(name="resets", behavior=FakeBehavior(mode="die_mid_stream")))
    stalls = live_server(FakeUpstream(name="stalls", behavior=FakeBehavior(mode="hang")))

    def pool(name: str, upstream) -> dict:
        return {"name": name, "kind": "remote", "model": f"model-{name}", "urls": [upstream.base_url + "/v1"],
                "max_retries": 0}

    settings = settings_from_dict({
        "pools": [pool("slm", ok), pool("llm", ok), pool("resets", resets), pool("stalls", stalls)],
        "redis_url": redis_url,
        "example_cache": {"enabled": False},
        "api_keys": [{"name": "probe", "sha256": hash_api_key(KEY), "requests_per_minute": 100_000}],
        "limits": {"max_body_bytes": 64_000, "request_timeout_s": 1.5, "body_read_timeout_s": 2.0},
        "decision_log": {"path": str(tmp_path / "decisions.jsonl")},
    })
    server = live_server(create_app(settings))
    server.decision_log = tmp_path / "decisions.jsonl"
    return server


def _assert_envelope(r: httpx.Response) -> None:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _assert_clean_log(caplog) -> None:
    """No traceback and no error from the gateway (the fake upstreams' own uvicorn logs their drops)."""
    bad = [r for r in caplog.records if (r.exc_info or r.levelno >= logging.ERROR)
           and not (r.exc_info and r.exc_info[0].__name__ == "_Dropped")]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


# (name, method, path, headers, body bytes, expected status)
CASES = [
    ("bad json", "POST", "/v1/chat/completions", AUTH, b"{not json", 400),
    ("truncated json", "POST", "/v1/chat/completions", AUTH, b'{"model": "slm", "messages": [', 400),
    ("not an object", "POST", "/v1/chat/completions", AUTH, b"[1, 2]", 400),
    ("empty body", "POST", "/v1/chat/completions", AUTH, b"", 400),
    ("invalid utf-8", "POST", "/v1/chat/completions", AUTH, b'{"model": "\xff\xfe"}', 400),
    ("deep nesting", "POST", "/v1/chat/completions", AUTH, b"[" * 5000 + b"]" * 5000, 400),
    ("huge number", "POST", "/v1/chat/completions", AUTH,
     json.dumps({**CHAT, "max_tokens": 10**400}).encode(), 400),
    ("stream as string", "POST", "/v1/chat/completions", AUTH, json.dumps({**CHAT, "stream": "yes"}).encode(), 400),
    ("n as string", "POST", "/v1/chat/completions", AUTH, json.dumps({**CHAT, "n": "2"}).encode(), 400),
    ("temperature as string", "POST", "/v1/chat/completions", AUTH,
     json.dumps({**CHAT, "temperature": "0.5"}).encode(), 400),
    ("role unknown", "POST", "/v1/chat/completions", AUTH,
     json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    ("no messages", "POST", "/v1/chat/completions", AUTH, json.dumps({**CHAT, "messages": []}).encode(), 400),
    ("unknown model", "POST", "/v1/chat/completions", AUTH, json.dumps({**CHAT, "model": "gpt-9"}).encode(), 404),
    ("unknown fields ignored", "POST", "/v1/chat/completions", AUTH,
     json.dumps({**CHAT, "frobnicate": {"x": 1}, "messages": [{"role": "user", "content": "hi", "mood": 3}]}).encode(),
     200),
    ("text/plain body", "POST", "/v1/chat/completions", {**AUTH, "content-type": "text/plain"},
     json.dumps(CHAT).encode(), 400),
    ("oversized body", "POST", "/v1/chat/completions", AUTH,
     json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}).encode(), 413),
    ("missing key", "POST", "/v1/chat/completions", {}, json.dumps(CHAT).encode(), 401),
    ("wrong key", "POST", "/v1/chat/completions", {"authorization": "Bearer sk-nope"}, json.dumps(CHAT).encode(), 401),
    ("malformed auth header", "POST", "/v1/chat/completions", {"authorization": "Basic Zm9vOmJhcg=="},
     json.dumps(CHAT).encode(), 401),
    ("bad body, no key", "POST", "/v1/chat/completions", {}, b"{not json", 401),
    ("trailing slash", "POST", "/v1/chat/completions/", AUTH, json.dumps(CHAT).encode(), 404),
    ("wrong method", "GET", "/v1/chat/completions", AUTH, b"", 405),
    ("unknown path", "GET", "/v1/nothing-here", AUTH, b"", 404),
    ("completion echo 0", "POST", "/v1/completions", AUTH,
     json.dumps({"model": "slm", "prompt": "x", "echo": 0}).encode(), 400),
    ("completion ok", "POST", "/v1/completions", AUTH, json.dumps({"model": "slm", "prompt": "x"}).encode(), 200),
    ("upstream reset, whole answer", "POST", "/v1/chat/completions", AUTH,
     json.dumps({**CHAT, "model": "resets"}).encode(), 502),
    ("upstream stall", "POST", "/v1/chat/completions", AUTH, json.dumps({**CHAT, "model": "stalls"}).encode(), 504),
    ("upstream stall, stream", "POST", "/v1/chat/completions", AUTH,
     json.dumps({**CHAT, "model": "stalls", "stream": True}).encode(), 504),
]


def test_fault_probe(probe, redis_server, caplog):
    base = probe.base_url
    num_sent = 0
    with httpx.Client(base_url=base, timeout=30) as client:
        # --- single requests: status and error shape
        for name, method, path, headers, body, expected in CASES:
            sent_headers = {"content-type": "application/json", **headers}
            r = client.request(method, path, content=body, headers=sent_headers)
            num_sent += 1
            assert r.status_code == expected, (name, r.status_code, r.text[:300])
            if expected >= 400:
                _assert_envelope(r)
            if expected in (502, 504):
                assert "127.0.0.1" not in r.text and "'resets'" in r.text or "'stalls'" in r.text, r.text

        # --- a stream whose upstream drops mid-way: headers already sent, an error event, counted as 502
        with client.stream("POST", "/v1/chat/completions", headers=AUTH,
                           json={**CHAT, "model": "resets", "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        num_sent += 1
        assert r.status_code == 200 and '"error"' in events[-1] and "127.0.0.1" not in events[-1]

    # --- oversized headers: 431 and the connection closed
    with socket.create_connection(("127.0.0.1", probe.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 60_000 + b"\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    num_sent += 1
    assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
    assert b'"code":"headers_too_large"' in reply

    # --- 200 concurrent streams, a random half of the clients leave after the first event
    async def burst() -> list[int]:
        rng = random.Random(7)
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, headers=AUTH) as aclient:
            async def one(leave: bool) -> int:
                async with aclient.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True,
                                                                               "max_tokens": 20}) as r:
                    async for line in r.aiter_lines():
                        if leave and line.startswith("data: "):
                            return 499
                    return r.status_code
            return await asyncio.gather(*(one(rng.random() < 0.5) for _ in range(200)))

    outcomes = asyncio.run(burst())
    num_sent += len(outcomes)
    assert outcomes.count(200) + outcomes.count(499) == 200 and outcomes.count(499) > 0

    # --- Redis killed mid-burst: the rate limiter fails open, every request is answered
    async def redis_burst() -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=AUTH) as aclient:
            async def one(i: int) -> int:
                if i == 10:
                    await asyncio.to_thread(redis_server.stop)
                return (await aclient.post("/v1/chat/completions", json=CHAT)).status_code
            return [await one(i) for i in range(40)]

    statuses = asyncio.run(redis_burst())
    num_sent += len(statuses)
    assert statuses == [200] * 40

    # --- still serving; every request that reached the app counted exactly once
    r = httpx.post(base + "/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
    num_sent += 1
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    counts = _wait_counted(base, num_sent)
    assert not [k for k in counts if k[2] == "500"], counts
    # A client that left after the server sent its last event is a 200 there; no finished stream is a 499.
    num_gone = counts.get(("explicit", "slm", "499"), 0)
    assert 0 < num_gone <= outcomes.count(499), counts
    assert counts[("explicit", "slm", "200")] + num_gone == 200 + 40 + 1 + 2, counts
    lines = probe.decision_log.read_text().splitlines()
    assert len(lines) == num_sent  # one decision-log line per request, whatever its outcome
    assert sum('"status":499' in line for line in lines) == num_gone
    _assert_clean_log(caplog)


def _wait_counted(base: str, expected: int, timeout: float = 10.0) -> dict:
    """The stream outcomes are counted when each stream's generator closes: wait until all are."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        counts = requests_total(base)
        if sum(counts.values()) == expected or time.monotonic() > deadline:
            assert sum(counts.values()) == expected, f"{sum(counts.values())} != {expected}: {sorted(counts.items())}"
            return counts
        time.sleep(0.05)


def test_redis_killed_under_a_200_request_burst(probe, redis_server):
    """Issue 23: Redis dies during a 200-request burst — /readyz stays 200 (degraded), no request fails, and
    the limiter is counting in Redis again once it is back."""
    base = probe.base_url

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=AUTH, limits=limits) as client:
            async def one(i: int) -> int:
                if i == 50:
                    await asyncio.to_thread(redis_server.stop)
                return (await client.post("/v1/chat/completions", json=CHAT)).status_code
            return list(await asyncio.gather(*(one(i) for i in range(200))))

    try:
        statuses = asyncio.run(burst())
        assert statuses == [200] * 200
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    finally:
        redis_server.start()
    import redis

    def failures() -> float:
        text = httpx.get(base + "/metrics").text
        line = next(x for x in text.splitlines() if x.startswith('switchyard_redis_failures_total{component="rate_limiter"}'))
        return float(line.split()[-1])

    assert failures() > 0
    settled = failures()
    for _ in range(5):
        assert httpx.post(base + "/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30).status_code == 200
    assert failures() == settled  # the limiter talks to Redis again
    assert any(k.startswith(b"sy:rl:probe:") for k in redis.Redis.from_url(redis_server.url).keys("sy:rl:*"))
    assert httpx.get(base + "/readyz").json()["status"] == "ok"
