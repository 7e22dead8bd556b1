"""Pool and PoolSet with scripted in-process backends: exact choices, retries, ejection, deadlines, fallback."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from backends.base import BackendError, Delta, GenerationRequest, SamplingParams, Usage
from backends.openai_upstream import OpenAIUpstream
from backends.pool import Pool, PoolSet
from gateway.settings import PoolConfig, settings_from_dict
from tests.gateway.fakes import wait_until_async


class Scripted:
    """A Backend whose behaviour the test sets: ok | fail (retryable) | bad (4xx) | die (after one token)."""

    def __init__(self, name: str, mode: str = "ok", num_tokens: int = 3) -> None:
        self.name, self.mode, self.num_tokens = name, mode, num_tokens
        self.num_calls = 0
        self.healthy = True
        self.gate: asyncio.Event | None = None
        self.loaded = self.closed = False

    async def load(self) -> None:
        self.loaded = True

    async def close(self) -> None:
        self.closed = True

    async def health(self) -> bool:
        return self.healthy

    def num_prompt_tokens(self, request):
        return None

    async def generate(self, request):
        self.num_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "fail":
            raise BackendError(f"{self.name} down", retryable=True)
        if self.mode == "bad":
            raise BackendError("too long", retryable=False, status_code=400, code="context_length_exceeded")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        for i in range(self.num_tokens):
            yield Delta(text=f"{self.name}:{i} ")
            if self.mode == "die":
                raise BackendError(f"{self.name} died", retryable=False, after_first_token=True)
        yield Delta(finish_reason="stop", is_final=True, usage=Usage(3, self.num_tokens))


def cfg(name="p", max_retries=2, **kw) -> PoolConfig:
    return PoolConfig(name=name, kind="remote", model=f"{name}-model", urls=["http://x/v1"], max_retries=max_retries,
                      **kw)


def req(prompt: str = "hello world", **kw) -> GenerationRequest:
    return GenerationRequest(request_id="r", model="m", prompt=prompt, sampling=SamplingParams(max_tokens=10), **kw)


def pool(backends, name="p", max_retries=2, **kw) -> Pool:
    kw.setdefault("backoff_base_s", 0.001)
    kw.setdefault("health_interval_s", 0)
    return Pool(name, backends, cfg(name, max_retries), rng=random.Random(0), **kw)


def outstanding(p: Pool) -> tuple[int, int]:
    """(tokens, requests) outstanding over the pool's replicas."""
    return (sum(r.num_outstanding_tokens for r in p.replicas), sum(r.num_outstanding_requests for r in p.replicas))


async def text_of(p: Pool, request: GenerationRequest, **kw) -> str:
    return "".join([d.text async for d in p.generate(request, **kw)])


def test_affinity_is_sticky_and_spreads_distinct_prefixes():
    p = pool([Scripted("a"), Scripted("b"), Scripted("c")])
    shared = "You are a helpful assistant. " * 20
    picks = {p.choose(req(shared + f" question {i}"), key=p.affinity_key(req(shared + f" question {i}"))).name
             for i in range(20)}
    assert len(picks) == 1  # the leading 256 chars are equal
    spread = {p.choose(req(f"{i} other"), key=p.affinity_key(req(f"{i} other"))).name for i in range(30)}
    assert spread == {"a", "b", "c"}


def test_affinity_gives_way_to_least_loaded_when_overloaded():
    p = pool([Scripted("a"), Scripted("b")], affinity_load_factor=2.0, affinity_slack_tokens=100)
    r = req("same prefix")
    key = p.affinity_key(r)
    preferred = p.choose(r, key=key)
    other = next(x for x in p.replicas if x is not preferred)
    other.num_outstanding_tokens = 100
    preferred.num_outstanding_tokens = 300  # == 2 * 100 + 100: still within the limit
    assert p.choose(r, key=key) is preferred
    preferred.num_outstanding_tokens = 301
    assert p.choose(r, key=key) is other


def test_least_outstanding_tokens_without_affinity():
    p = pool([Scripted("a"), Scripted("b"), Scripted("c")], affinity_prefix_chars=0)
    a, b, c = p.replicas
    a.num_outstanding_tokens, b.num_outstanding_tokens, c.num_outstanding_tokens = 50, 10, 30
    assert p.affinity_key(req()) is None
    assert p.choose(req()) is b
    b.num_outstanding_tokens = 60
    assert p.choose(req()) is c
    a.num_outstanding_tokens = b.num_outstanding_tokens = c.num_outstanding_tokens = 0
    assert {p.choose(req()).name for _ in range(6)} == {"a", "b", "c"}  # ties rotate


async def test_outstanding_tokens_follow_requests():
    backend = Scripted("a")
    backend.gate = asyncio.Event()
    p = pool([backend])
    task = asyncio.ensure_future(text_of(p, req("x" * 40)))
    await wait_until_async(lambda: backend.num_calls == 1, "the request to reach the backend")
    assert outstanding(p) == (40 // 4 + 1 + 10, 1)
    backend.gate.set()
    assert await task == "a:0 a:1 a:2 "
    assert outstanding(p) == (0, 0)


async def test_retry_goes_to_another_replica():
    bad, good = Scripted("bad", "fail"), Scripted("good")
    p = pool([bad, good], affinity_prefix_chars=0)
    for _ in range(4):
        assert (await text_of(p, req())).startswith("good:0")
    assert bad.num_calls >= 1 and p.stats.num_retries == bad.num_calls
    assert p.stats.num_failures == 0 and p.stats.num_requests == 4


async def test_non_retryable_error_is_raised_as_is():
    bad, good = Scripted("bad", "bad"), Scripted("good")
    p = pool([bad, good], affinity_prefix_chars=0)
    p.replicas[1].num_outstanding_tokens = 10**6  # make "bad" the choice
    with pytest.raises(BackendError) as err:
        await text_of(p, req())
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    assert good.num_calls == 0 and p.replicas[0].num_consecutive_failures == 0  # a bad request, not a bad replica


async def test_failure_after_first_token_is_reraised_not_retried():
    dying, good = Scripted("dying", "die"), Scripted("good")
    p = pool([dying, good], affinity_prefix_chars=0)
    p.replicas[1].num_outstanding_tokens = 10**6
    got = []
    with pytest.raises(BackendError) as err:
        async for d in p.generate(req()):
            got.append(d.text)
    assert got == ["dying:0 "] and err.value.after_first_token and good.num_calls == 0


async def test_buffered_request_retries_even_after_partial_output():
    dying, good = Scripted("dying", "die"), Scripted("good")
    p = pool([dying, good], affinity_prefix_chars=0)
    p.replicas[1].num_outstanding_tokens = 10**6
    assert await text_of(p, req(), stream=False) == "good:0 good:1 good:2 "
    assert dying.num_calls == 1 and good.num_calls == 1


async def test_ejection_and_recovery_after_cooldown():
    flaky = Scripted("flaky", "fail")
    good = Scripted("good")
    p = pool([flaky, good], affinity_prefix_chars=0, eject_after_failures=2, eject_cooldown_s=0.2, max_retries=1)
    for _ in range(6):
        await text_of(p, req())
    assert p.health() == {"flaky": False, "good": True} and p.stats.num_ejections == 1
    calls = flaky.num_calls
    for _ in range(4):
        await text_of(p, req())
    assert flaky.num_calls == calls  # ejected: no traffic
    flaky.mode = "ok"
    await wait_until_async(lambda: p.health()["flaky"], "the cooldown to end")
    names = [await text_of(p, req()) for _ in range(4)]
    assert any(n.startswith("flaky") for n in names)
    assert p.replicas[0].num_consecutive_failures == 0


async def test_last_replica_is_ejected_only_when_a_fallback_exists():
    alone = pool([Scripted("a", "fail")], eject_after_failures=1, max_retries=0)
    with pytest.raises(BackendError):
        await text_of(alone, req())
    assert alone.health() == {"a": True} and alone.stats.num_ejections == 0
    alone.fallback = pool([Scripted("b")], name="backup")
    assert await text_of(alone, req()) == "b:0 b:1 b:2 "
    assert alone.health() == {"a": False} and alone.stats.num_ejections == 1


async def test_recent_success_counts_as_healthy_without_probe():
    a = Scripted("a")
    p = pool([a], health_interval_s=60)
    await text_of(p, req())
    a.healthy = False
    assert await p.check_health() == {"a": True}  # served a request just now
    p.replicas[0].last_success = 0.0
    assert await p.check_health() == {"a": False}


async def test_active_probe_marks_down_and_lifts_ejection():
    a, b = Scripted("a"), Scripted("b")
    p = pool([a, b], eject_cooldown_s=60)
    a.healthy = False
    assert await p.check_health() == {"a": False, "b": True}
    assert p.health() == {"a": False, "b": True}
    p.replicas[1].ejected_until = time.monotonic() + 60
    assert p.health()["b"] is False
    a.healthy = True
    await p.check_health()
    assert p.health() == {"a": True, "b": True}


async def test_health_loop_runs(monkeypatch):
    a = Scripted("a")
    p = pool([a], health_interval_s=0.02)
    await p.start()
    assert a.loaded
    a.healthy = False
    await wait_until_async(lambda: p.health() == {"a": False}, "the probe to mark the replica down")
    await p.close()
    assert a.closed


async def test_no_healthy_replica_is_503():
    a = Scripted("a")
    p = pool([a])
    a.healthy = False
    await p.check_health()
    with pytest.raises(BackendError) as err:
        await text_of(p, req())
    assert err.value.status_code == 503 and err.value.code == "no_healthy_replica" and not err.value.retryable
    assert p.stats.num_no_replica == 1 and p.stats.num_failures == 1


async def test_retries_exhausted_without_fallback():
    backends = [Scripted("a", "fail"), Scripted("b", "fail")]
    p = pool(backends, max_retries=3, eject_after_failures=100)
    with pytest.raises(BackendError) as err:
        await text_of(p, req())
    assert "every attempt failed (4)" in err.value.message and not err.value.retryable
    assert [b.num_calls for b in backends] == [2, 2]  # alternates: another replica each time
    assert p.stats.num_retries == 3


async def test_fallback_pool_takes_over_stream_before_first_token():
    primary = pool([Scripted("a", "fail")], name="primary", max_retries=1)
    backup_backend = Scripted("backup")
    backup = pool([backup_backend], name="backup")
    primary.fallback = backup
    seen = []

    async def spy(request):
        seen.append(request.model)
        async for d in Scripted.generate(backup_backend, request):
            yield d

    backup_backend.generate = spy
    assert await text_of(primary, req()) == "backup:0 backup:1 backup:2 "
    assert seen == ["backup-model"] and primary.stats.num_failovers == 1


async def test_fallback_cycle_ends():
    a = pool([Scripted("a", "fail")], name="a", max_retries=0)
    b = pool([Scripted("b", "fail")], name="b", max_retries=0)
    a.fallback, b.fallback = b, a
    with pytest.raises(BackendError):
        await text_of(a, req())
    assert a.stats.num_failovers == 1 and b.stats.num_failovers == 0


async def test_deadline_during_generation_and_before():
    hang = Scripted("hang", "hang")
    p = pool([hang])
    with pytest.raises(BackendError) as err:
        await text_of(p, req(deadline=time.monotonic() + 0.1))
    assert err.value.code == "deadline_exceeded" and err.value.status_code == 504
    assert p.replicas[0].num_consecutive_failures == 0 and outstanding(p) == (0, 0)
    with pytest.raises(BackendError) as err:
        await text_of(p, req(deadline=time.monotonic() - 1))
    assert err.value.code == "deadline_exceeded"


async def test_closing_the_stream_frees_the_replica():
    slow = Scripted("slow", num_tokens=100)
    p = pool([slow])
    gen = p.generate(req())
    assert (await anext(gen)).text == "slow:0 "
    assert outstanding(p)[1] == 1
    await gen.aclose()
    assert outstanding(p) == (0, 0)


def test_constructor_misuse():
    with pytest.raises(ValueError):
        Pool("p", [], cfg())
    with pytest.raises(ValueError):
        Pool("p", [Scripted("a"), Scripted("a")], cfg())


async def test_poolset_from_settings_with_factory_and_default_remote(monkeypatch):
    settings = settings_from_dict({
        "pools": [
            {"name": "slm", "kind": "local", "model": "tiny", "replicas": 2, "fallback": "llm"},
            {"name": "llm", "kind": "remote", "model": "big", "urls": ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"],
             "api_key_env": "UPSTREAM_KEY", "timeout_s": 5, "supports_tools": True},
        ],
        "routing": {"slm_pool": "slm", "llm_pool": "llm"},
    })
    made = []

    def factory(pool_cfg, index):
        made.append((pool_cfg.name, index))
        return Scripted(f"{pool_cfg.name}/{index}")

    pools = PoolSet.from_settings(settings, backend_factory=factory, health_interval_s=0)
    assert made == [("slm", 0), ("slm", 1), ("llm", 0), ("llm", 1)]
    assert pools.get("slm").fallback is pools.get("llm") and pools.get("llm").fallback is None
    with pytest.raises(KeyError):
        pools.get("nope")
    await pools.start()
    assert pools.health() == {"slm": {"slm/0": True, "slm/1": True}, "llm": {"llm/0": True, "llm/1": True}}
    await pools.close()

    remote_only = settings_from_dict({
        "pools": [{"name": "llm", "kind": "remote", "model": "big", "urls": ["http://127.0.0.1:1/v1"],
                   "api_key_env": "UPSTREAM_KEY", "timeout_s": 5, "supports_tools": True}],
        "routing": {"slm_pool": "llm", "llm_pool": "llm"},
    })
    with pytest.raises(ValueError, match="UPSTREAM_KEY"):
        PoolSet.from_settings(remote_only, environ={})
    pools = PoolSet.from_settings(remote_only, environ={"UPSTREAM_KEY": "sk-test"})
    up = pools.get("llm").replicas[0].backend
    assert isinstance(up, OpenAIUpstream)
    assert (up.model, up.api_key, up.timeout_s, up.supports_tools) == ("big", "sk-test", 5.0, True)
    assert set(pools.pools) == {"llm"} and set(pools.stats()) == {"llm"}


def test_default_factory_builds_local_replicas(tiny_model_dir):
    from backends.local import LocalBackend

    settings = settings_from_dict({
        "pools": [{"name": "slm", "kind": "local", "model": str(tiny_model_dir("llama")), "replicas": 2,
                   "engine": {"max_num_seqs": 4}}],
        "routing": {"slm_pool": "slm", "llm_pool": "slm"},
    })
    pools = PoolSet.from_settings(settings)
    replicas = [r.backend for r in pools.get("slm").replicas]
    assert all(isinstance(b, LocalBackend) for b in replicas)
    assert [b.name for b in replicas] == ["slm/0", "slm/1"] and replicas[0].args.max_num_seqs == 4
