"""Both example stores against one contract (the Redis one on a real redis-server): admission rules,
namespaces, top-k under the token budget, LFU-DA eviction, feedback, TTL, time-ordered ids."""

from __future__ import annotations

import time

import pytest

from gateway.example_cache import InMemoryExampleStore, RedisExampleStore
from tests.gateway.fakes import bow_embed, cache_settings


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """Factory for either store; Redis stores share the test's clean database."""
    def make(**kw):
        settings = cache_settings(**kw)
        if request.param == "memory":
            return InMemoryExampleStore(settings, embed=bow_embed)
        return RedisExampleStore(request.getfixturevalue("redis_url"), settings, embed=bow_embed)

    return make


async def test_round_trip_and_admission_rules(make_store):
    store = make_store()
    assert await store.lookup("t", "what is the capital of france") == []
    assert await store.admit("t", "what is the capital of france", "Paris.", "llm", "stop")
    assert not await store.admit("t", "why is the sky blue", "Rayleigh.", "llm", "length")
    assert not await store.admit("t", "why is the sky blue", "Rayleigh.", "llm", "stop", guard_ok=False)
    assert not await store.admit("t", "What is the capital of France?", "Paris!", "llm", "stop")  # near-dup
    assert not await store.admit("t", "   ", "x", "llm", "stop")
    got = await store.lookup("t", "capital of france please")
    assert len(got) == 1
    ex = got[0]
    assert (ex.request_text, ex.answer, ex.model, ex.utility) == ("what is the capital of france", "Paris.",
                                                                    "llm", 0.5)
    assert 0.5 <= ex.similarity < 1.0
    assert await store.lookup("t", "completely unrelated words here") == []  # below min_similarity
    s = store.stats
    assert (s["admitted"], s["rejected_finish"], s["rejected_guard"], s["rejected_duplicate"],
            s["rejected_empty"]) == (1, 1, 1, 1, 1)
    assert (s["lookups"], s["hits"], s["misses"]) == (3, 1, 2)
    assert await store.health()
    await store.close()


async def test_namespace_isolation(make_store):
    store = make_store()
    assert await store.admit("alice", "reset my password", "Use the link.", "llm", "stop")
    assert await store.admit("bob", "reset my password", "Call support.", "llm", "stop")  # no cross-ns dedup
    assert [e.answer for e in await store.lookup("alice", "reset my password")] == ["Use the link."]
    assert [e.answer for e in await store.lookup("bob", "reset my password")] == ["Call support."]
    assert await store.lookup("carol", "reset my password") == []
    await store.close()


async def test_top_k_order_and_token_budget(make_store):
    store = make_store(top_k=2, min_similarity=0.3, max_example_tokens=30, dedup_similarity=0.99)
    assert await store.admit("t", "red green blue", "short", "llm", "stop")
    assert await store.admit("t", "red green yellow", "x" * 200, "llm", "stop")  # 50+ tokens: never fits
    assert await store.admit("t", "red pink orange", "fits", "llm", "stop")
    got = await store.lookup("t", "red green blue")
    assert [e.request_text for e in got] == ["red green blue", "red pink orange"]
    assert got[0].similarity > got[1].similarity
    assert [e.request_text for e in await store.lookup("t", "red green blue", k=1)] == ["red green blue"]
    assert await store.lookup("t", "red green blue", k=0) == []
    await store.close()


async def test_eviction_order_is_lfu_da_and_utility_aware(make_store):
    store = make_store(max_entries_per_namespace=3)
    texts = ["alpha one", "beta two", "gamma three", "delta four", "epsilon five", "zeta six"]

    async def remaining():
        found = [t for t in texts if await store.lookup("t", t, k=1)]  # +1 use each
        await store.flush()  # Redis records uses in batches, off the request path
        return found

    for t in texts[:3]:
        assert await store.admit("t", t, f"answer {t}", "llm", "stop")  # rank 1 each
    ids = {t: (await store.lookup("t", t, k=1))[0].id for t in texts[:3]}  # rank 2 each
    await store.feedback("t", [ids["alpha one"]], escalated=False)  # 4
    await store.feedback("t", [ids["beta two"]], escalated=True)  # -2
    await store.flush()
    assert await store.admit("t", texts[3], "answer", "llm", "stop")  # rank 1; beta (-2) goes
    assert await remaining() == ["alpha one", "gamma three", "delta four"]  # 5, 3, 2
    assert not await store.admit("t", texts[4], "answer", "llm", "stop")  # rank 1 is the lowest; floor 1
    assert await store.admit("t", texts[5], "answer", "llm", "stop")  # rank 2 ties delta; delta is older
    assert await remaining() == ["alpha one", "gamma three", "zeta six"]
    assert store.stats["evicted"] == 3
    assert store.stats["feedback_kept"] == 1 and store.stats["feedback_escalated"] == 1
    await store.close()


async def test_feedback_changes_utility(make_store):
    store = make_store()
    assert await store.admit("t", "how do i sort a list", "sorted(xs)", "llm", "stop")
    (ex,) = await store.lookup("t", "how do i sort a list")
    await store.feedback("t", [ex.id], escalated=False)
    await store.feedback("t", [ex.id], escalated=False)
    await store.feedback("t", [ex.id], escalated=True)
    await store.feedback("t", ["no-such-id"], escalated=True)  # ignored
    (ex,) = await store.lookup("t", "how do i sort a list")
    assert ex.utility == pytest.approx(3 / 5)
    await store.close()


async def test_ttl_expired_entries_are_not_returned_and_are_swept(make_store, monkeypatch):
    store = make_store(ttl_s=60)
    assert await store.admit("t", "old question words", "old", "llm", "stop")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 120)
    assert await store.lookup("t", "old question words") == []
    assert await store.admit("t", "new question words", "new", "llm", "stop")
    assert [e.answer for e in await store.lookup("t", "new question words")] == ["new"]
    assert store.stats["expired"] >= 1
    monkeypatch.setattr(time, "time", real_time)
    assert [e.answer for e in await store.lookup("t", "old question words")] == ["new"]  # old: deleted
    await store.close()


async def test_ids_follow_admission_order_even_when_the_clock_steps_back(make_store, monkeypatch):
    store = make_store(dedup_similarity=0.99)
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    texts = [f"word{i} thing{i}" for i in range(6)]
    for i, text in enumerate(texts):
        now[0] += -1.0 if i == 3 else 0.0  # two in the same millisecond, then one a second earlier
        assert await store.admit("t", text, "a", "llm", "stop")
    ids = [(await store.lookup("t", t, k=1))[0].id for t in texts]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # eviction ties go to the oldest by id
    await store.close()
