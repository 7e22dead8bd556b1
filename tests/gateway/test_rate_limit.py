"""Sliding-window rate limits: the arithmetic by hand, the boundary burst fixed windows let through, and
the in-process and Redis limiters (real redis-server) agreeing decision for decision."""

import asyncio
import random

import pytest

from gateway.admission import InProcessRateLimiter, LimitCheck, RedisRateLimiter, SlidingWindow

T0 = 60.0 * 29_000_000  # a minute boundary


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_sliding_window_arithmetic_by_hand():
    # 30 s into the minute the previous minute weighs 0.5: 10 * 0.5 + 2 = 7 (room for 9 → fits)
    assert SlidingWindow.wait_s(10, 2, 9, T0 + 30) is None
    # 6 s in it weighs 0.9: 9 + 2 = 11 > 9; fits once 10 * w <= 7, i.e. w <= 0.7 → 18 s in → 12 s from now
    assert SlidingWindow.wait_s(10, 2, 9, T0 + 6) == 12
    # the current minute alone is over (12 > 9): wait for the boundary (54 s), then 60 * (1 - 9/12) = 15 s
    assert SlidingWindow.wait_s(0, 12, 9, T0 + 6) == 54 + 15
    assert SlidingWindow.wait_s(0, 0, -1, T0) == 60  # a zero limit never admits


def _run(coro):
    return asyncio.run(coro)


def _limiter(backend: str, request, clock: Clock):
    if backend == "redis":
        return RedisRateLimiter(request.getfixturevalue("redis_url"), timeout_s=2.0, clock=clock)
    return InProcessRateLimiter(clock=clock)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_no_double_burst_across_a_minute_boundary(backend, request):
    clock = Clock(T0 + 59.0)
    limiter = _limiter(backend, request, clock)

    async def scenario() -> list:
        out = [await limiter.hit("k", max_requests=10, max_tokens=None) for _ in range(11)]
        clock.t = T0 + 61.0  # a fixed window would admit 10 more here
        out.append(await limiter.hit("k", max_requests=10, max_tokens=None))
        clock.t = T0 + 66.0  # 10 * (1 - 6/60) + 0 + 1 = 10: exactly one fits
        out.append(await limiter.hit("k", max_requests=10, max_tokens=None))
        out.append(await limiter.hit("k", max_requests=10, max_tokens=None))
        await limiter.close()
        return out

    out = _run(scenario())
    assert out[:10] == [LimitCheck()] * 10
    assert out[10].over == "requests" and out[10].retry_after_s == 7  # 11th at 59 s: the minute is full
    assert out[11] == LimitCheck("requests", 5)  # at 61 s: 6 s into the minute are needed → 5 s
    assert out[12] == LimitCheck()
    assert out[13].over == "requests"
    if backend == "redis":
        import redis

        r = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        w = int(T0 // 60) + 1  # the minute of the last hits
        assert int(r.get(f"sy:rl:k:req:{w - 1}")) == 10  # refused requests are not counted
        assert int(r.get(f"sy:rl:k:req:{w}")) == 1
        assert 0 < r.ttl(f"sy:rl:k:req:{w}") <= 180


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_tokens_slide_out(backend, request):
    clock = Clock(T0 + 50.0)
    limiter = _limiter(backend, request, clock)

    async def scenario() -> list:
        out = [await limiter.hit("t", max_requests=None, max_tokens=100)]
        await limiter.add_tokens("t", 120)
        out.append(await limiter.hit("t", max_requests=None, max_tokens=100))
        clock.t = T0 + 70.0  # 120 * (1 - 10/60) = 100: still at the limit
        out.append(await limiter.hit("t", max_requests=None, max_tokens=100))
        clock.t = T0 + 71.0  # 98: under it
        out.append(await limiter.hit("t", max_requests=None, max_tokens=100))
        await limiter.close()
        return out

    out = _run(scenario())
    assert out[0] == LimitCheck()
    assert out[1].over == "tokens" and out[1].retry_after_s == 10 + 10 + 1  # boundary, then 1/6 of a minute
    assert out[2] == LimitCheck("tokens", 1)
    assert out[3] == LimitCheck()


def test_redis_and_in_process_limiters_agree(redis_url):
    """A random schedule of hits and token reports, on both limiters: the same decision every time."""
    rng = random.Random(7)
    clock = Clock(T0 + 3.0)
    mem = InProcessRateLimiter(clock=clock)
    red = RedisRateLimiter(redis_url, timeout_s=2.0, clock=clock)

    async def scenario() -> list[tuple[LimitCheck, LimitCheck]]:
        pairs = []
        for _ in range(300):
            clock.t += rng.uniform(0.0, 1.5)
            if rng.random() < 0.2:
                n = rng.randint(1, 30)
                await mem.add_tokens("a", n)
                await red.add_tokens("a", n)
            else:
                pairs.append((await mem.hit("a", max_requests=25, max_tokens=400),
                              await red.hit("a", max_requests=25, max_tokens=400)))
        await red.close()
        return pairs

    pairs = _run(scenario())
    assert all(a == b for a, b in pairs), [p for p in pairs if p[0] != p[1]][:3]
    kinds = {a.over for a, _ in pairs}
    assert kinds == {None, "requests", "tokens"}  # the schedule exercised every outcome
