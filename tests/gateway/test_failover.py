"""Failover through Pool over real HTTP: OpenAIUpstream replicas on real uvicorn fake upstreams.

A replica that refuses connections, answers 500, hangs past its timeout or dies mid-stream: requests still
complete via another replica or the fallback pool, or end with an ``after_first_token`` error when tokens
were already sent. A 200-request concurrent burst with one replica process killed loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from backends.base import BackendError, GenerationRequest, SamplingParams
from backends.openai_upstream import OpenAIUpstream
from backends.pool import Pool
from bench.fake_upstream import FakeBehavior, FakeUpstream
from gateway.settings import PoolConfig
from tests.conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = "tok0 tok1 tok2 tok3 "


def chat(i: int = 0, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(request_id=f"r{i}", model="m", messages=[{"role": "user", "content": f"question {i}"}],
                             sampling=SamplingParams(max_tokens=max_tokens))


def make_pool(urls: list[str], name: str = "p", timeout_s: float = 5.0, max_retries: int = 2,
              timeouts: list[float] | None = None, **kw) -> Pool:
    cfg = PoolConfig(name=name, kind="remote", model="up-model", urls=urls, timeout_s=timeout_s,
                     connect_timeout_s=1.0, max_retries=max_retries)
    timeouts = timeouts or [timeout_s] * len(urls)
    replicas = [OpenAIUpstream(u, u, cfg.model, timeout_s=t, connect_timeout_s=1.0)
                for u, t in zip(urls, timeouts, strict=True)]
    kw.setdefault("health_interval_s", 0)
    kw.setdefault("backoff_base_s", 0.005)
    return Pool(name, replicas, cfg, rng=random.Random(0), **kw)


async def text_of(pool: Pool, request: GenerationRequest, stream: bool = True) -> str:
    return "".join([d.text async for d in pool.generate(request, stream=stream)])


@pytest.fixture
def fakes(live_server):
    """start(behavior) → (app, base_url ending /v1)."""

    def start(name: str, **behavior):
        app = FakeUpstream(name=name, model="up-model", behavior=FakeBehavior(num_tokens=4, **behavior))
        return app, f"{live_server(app).base_url}/v1"

    return start


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("failure", ["refused", "error_500", "hang"])
async def test_bad_replica_is_routed_around(fakes, failure, stream):
    good, good_url = fakes("good")
    if failure == "refused":
        bad, bad_url = None, dead_url()
    else:
        bad, bad_url = fakes("bad", mode=failure)
    pool = make_pool([bad_url, good_url], timeouts=[0.5, 30.0], affinity_prefix_chars=0, eject_after_failures=2)
    try:
        results = [await text_of(pool, chat(i), stream) for i in range(6)]
    finally:
        await pool.close()
    assert results == [EXPECTED] * 6
    assert good.num_requests == 6
    assert pool.stats.num_retries >= 1 and pool.stats.num_failures == 0
    assert pool.health()[bad_url] is False  # ejected after two failures
    if bad is not None:
        assert 1 <= bad.num_requests <= 2


async def test_die_mid_stream_ends_with_after_first_token_error(fakes):
    dying, dying_url = fakes("dying", mode="die_mid_stream", die_after_tokens=2)
    backup, backup_url = fakes("backup")
    pool = make_pool([dying_url], name="primary")
    pool.fallback = make_pool([backup_url], name="backup")
    got = []
    with pytest.raises(BackendError) as err:
        async for d in pool.generate(chat()):
            got.append(d.text)
    assert "".join(got) == "tok0 tok1 " and err.value.after_first_token
    assert backup.num_requests == 0  # tokens were sent: no silent restart elsewhere
    # the same failure for a buffered (non-stream) request is retried, then fails over
    assert await text_of(pool, chat(), stream=False) == EXPECTED
    assert backup.num_requests == 1 and pool.stats.num_failovers == 1
    await pool.close()
    await pool.fallback.close()


async def test_stream_fails_over_to_fallback_pool_before_first_token(fakes):
    _, bad1 = fakes("bad1", mode="error_500")
    backup, backup_url = fakes("backup")
    pool = make_pool([bad1, dead_url()], name="primary", max_retries=1)
    pool.fallback = make_pool([backup_url], name="backup")
    deltas = [d async for d in pool.generate(chat())]
    assert "".join(d.text for d in deltas) == EXPECTED
    assert sum(d.finish_reason is not None for d in deltas) == 1 and deltas[-1].is_final
    assert backup.num_requests == 1 and pool.stats.num_failovers == 1
    await pool.close()
    await pool.fallback.close()


async def test_every_replica_down_without_fallback_is_503():
    a, b = dead_url(), dead_url()
    pool = make_pool([a, b], eject_after_failures=1, max_retries=1)
    with pytest.raises(BackendError) as err:
        await text_of(pool, chat())
    assert err.value.retryable is False and err.value.code == "upstream_connect_error"
    assert sorted(pool.health().values()) == [False, True]  # the last one standing is not ejected
    assert await pool.check_health() == {a: False, b: False}  # the probe finds both down
    with pytest.raises(BackendError) as err:
        await text_of(pool, chat())
    assert err.value.status_code == 503 and err.value.code == "no_healthy_replica"
    await pool.close()


async def test_ejected_replica_recovers_via_probe(fakes):
    flaky, flaky_url = fakes("flaky", mode="error_500")
    _, good_url = fakes("good")
    pool = make_pool([flaky_url, good_url], affinity_prefix_chars=0, eject_after_failures=1, eject_cooldown_s=60)
    await text_of(pool, chat(0))
    await text_of(pool, chat(1))
    assert pool.health() == {flaky_url: False, good_url: True}
    assert await pool.check_health() == {flaky_url: False, good_url: True}
    flaky.behavior = FakeBehavior(num_tokens=4)
    assert await pool.check_health() == {flaky_url: True, good_url: True}
    before = flaky.num_requests
    for i in range(4):
        assert await text_of(pool, chat(i)) == EXPECTED
    assert flaky.num_requests > before
    await pool.close()


@contextlib.contextmanager
def upstream_process(token_delay_ms: float):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_upstream", "--port", str(port), "--num-tokens", "4",
         "--token-delay-ms", str(token_delay_ms)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=30)
        yield proc, f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
async def test_burst_of_200_with_one_replica_killed_loses_nothing(stream):
    with upstream_process(50) as (victim, url0), upstream_process(50) as (_, url1), \
            upstream_process(50) as (_, url2):
        pool = make_pool([url0, url1, url2], timeout_s=10, max_retries=3, eject_after_failures=2)
        await pool.start()

        async def one(i: int) -> str:
            try:
                return await text_of(pool, chat(i), stream)
            except BackendError as e:
                return "after_first_token" if e.after_first_token else f"error: {e.message}"

        tasks = [asyncio.ensure_future(one(i)) for i in range(200)]
        for _ in range(1000):  # kill the replica while it is serving
            if pool.replicas[0].num_outstanding_requests >= 10:
                break
            await asyncio.sleep(0.005)
        victim.kill()
        results = await asyncio.gather(*tasks)
        await pool.close()
    completed = results.count(EXPECTED)
    cut = results.count("after_first_token")
    assert completed + cut == 200, [r for r in results if r not in (EXPECTED, "after_first_token")][:3]
    if not stream:
        assert completed == 200  # buffered requests are retried even when the replica died mid-answer
    assert pool.stats.num_failures == cut
    assert pool.stats.num_retries > 0 and pool.stats.num_ejections >= 1  # the kill hit traffic in flight
