"""Per-key budgets: reserve the worst case at admission, settle to the cost; concurrent bursts across two
gateway replicas sharing Redis overshoot by at most one reservation."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.budget import Budgets, window_seconds
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, fake_settings

# slm: $1 / $2 per 1M tokens (fake_settings); a budget of a few requests' worth
BUDGET = 0.0004
KEYS = [{"name": "team-a", "sha256": hash_api_key("sk-a"), "max_budget_usd": BUDGET, "budget_window": "1h"},
        {"name": "team-b", "sha256": hash_api_key("sk-b")}]
BODY = {"model": "slm", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 40}


def test_window_seconds():
    assert window_seconds("1d") == 86400 and window_seconds("30m") == 1800 and window_seconds("12h") == 43200
    with pytest.raises(ValueError):
        window_seconds("1w")


async def test_reserve_and_settle_in_process():
    clock = [1000.0]
    budgets = Budgets(None, clock=lambda: clock[0])
    first = await budgets.reserve("k", "1h", 0.6, 1.0)
    assert first is not None and await budgets.reserve("k", "1h", 0.6, 1.0) is None  # 0.6 + 0.6 > 1
    await budgets.settle(first, 0.1)  # cost less than reserved: room again
    assert await budgets.spent("k", "1h") == pytest.approx(0.1)
    assert await budgets.reserve("k", "1h", 0.6, 1.0) is not None
    clock[0] += 3600  # next window
    assert await budgets.spent("k", "1h") == 0.0


async def test_redis_outage_counts_on_from_the_last_total_redis_answered(redis_server, redis_url):
    budgets = Budgets(redis_url, timeout_s=0.5)
    first = await budgets.reserve("k", "1h", 0.4, 1.0)
    await budgets.settle(first, 0.3)
    assert await budgets.reserve("k", "1h", 0.5, 1.0) is not None  # 0.8 of 1.0 in Redis
    redis_server.stop()
    try:
        # Redis is gone: this replica's fallback starts at Redis's 0.8, so 0.3 more is refused and 0.2 is not
        assert await budgets.reserve("k", "1h", 0.3, 1.0) is None
        assert await budgets.reserve("k", "1h", 0.2, 1.0) is not None
        assert await budgets.spent("k", "1h") == pytest.approx(1.0)
        assert budgets.num_failures >= 3
    finally:
        redis_server.start()
        await budgets.close()


def test_budget_blocks_with_429_before_any_backend_call(live_server):
    factory = FakeFactory()
    server = live_server(create_app(fake_settings(api_keys=KEYS), backend_factory=factory))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-a", max_retries=0)
    answered = 0
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(100):
            client.chat.completions.create(**BODY)
            answered += 1
    assert e.value.code == "budget_exceeded" and "team-a" in e.value.message
    assert len(factory.requests("slm")) == answered > 0  # the refused request reached no backend
    other = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-b", max_retries=0)
    assert other.chat.completions.create(**BODY).choices[0].message.content  # other keys unaffected
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "switchyard_budget_exceeded_total 1.0" in metrics
    spend = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('switchyard_key_spend_usd_total{key="team-a"}'))
    assert 0 < spend <= BUDGET


def test_two_replicas_sharing_redis_overshoot_at_most_one_reservation(live_server, redis_url):
    factories = [FakeFactory(), FakeFactory()]
    servers = [live_server(create_app(fake_settings(api_keys=KEYS, redis_url=redis_url), backend_factory=f))
               for f in factories]
    # worst case of one request: (prompt estimate + 40 completion tokens) at the SLM's prices
    one_reservation = (40 * 2.0 + 20 * 1.0) / 1e6

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30, headers={"authorization": "Bearer sk-a"}) as client:
            async def one(i: int) -> int:
                r = await client.post(servers[i % 2].base_url + "/v1/chat/completions", json=BODY)
                return r.status_code
            return await asyncio.gather(*(one(i) for i in range(50)))

    statuses = asyncio.run(burst())
    assert set(statuses) == {200, 429} and statuses.count(200) > 0  # reservations held the burst back
    # answers cost less than their reservations: spend the rest one request at a time, until refused
    for i in range(200):
        r = httpx.post(servers[i % 2].base_url + "/v1/chat/completions", json=BODY,
                       headers={"authorization": "Bearer sk-a"})
        if r.status_code == 429:
            break
        statuses.append(r.status_code)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    answered = sum(len(f.requests("slm")) for f in factories)
    assert answered == statuses.count(200)
    spent = 0.0
    for server in servers:
        for line in httpx.get(server.base_url + "/metrics").text.splitlines():
            if line.startswith('switchyard_key_spend_usd_total{key="team-a"}'):
                spent += float(line.split()[-1])
    assert 0 < spent <= BUDGET + one_reservation
