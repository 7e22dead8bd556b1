"""Example cache (IC-Cache): exact-value tests on both stores, the Redis ones against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re

import numpy as np
import pytest
import redis

from gateway import example_cache as ec
from gateway.example_cache import (
    Example,
    ExampleStore,
    InMemoryExampleStore,
    RedisExampleStore,
    VectorIndex,
    build_example_store,
    format_examples,
)
from gateway.settings import ExampleCacheSettings, settings_from_dict

DIM = 64


def bow_embed(texts: list[str]) -> np.ndarray:
    """Deterministic bag-of-words embedding: shared words → high cosine, disjoint words → ~0."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % DIM] += 1.0
        n = np.linalg.norm(out[i])
        out[i] /= n if n else 1.0
    return out


def cfg(**kw) -> ExampleCacheSettings:
    base = dict(top_k=2, min_similarity=0.5, dedup_similarity=0.97, max_example_tokens=512, deadline_ms=500)
    base.update(kw)
    return ExampleCacheSettings(**base)


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """Factory for either store; Redis stores share the test's clean database."""
    def make(**kw):
        settings = cfg(**kw)
        if request.param == "memory":
            store = InMemoryExampleStore(settings, embed=bow_embed)
        else:
            store = RedisExampleStore(request.getfixturevalue("redis_url"), settings, embed=bow_embed)
        return store

    return make


async def _close(*stores):
    for s in stores:
        await s.close()


# ---------------------------------------------------------------------------------- index


def test_vector_index_exact_values():
    idx = VectorIndex(3, capacity=1)
    idx.add("a", np.array([1, 0, 0]))
    idx.add("b", np.array([0, 1, 0]))
    idx.add("c", np.array([0.6, 0.8, 0]))
    assert idx.search(np.array([1, 0, 0]), 2) == [("a", 1.0), ("c", pytest.approx(0.6))]
    assert [i for i, _ in idx.search(np.array([0, 1, 0]), 5, min_similarity=0.5)] == ["b", "c"]
    assert idx.remove("a") and not idx.remove("a")
    assert idx.ids() == ["c", "b"]  # last row moved into the hole
    assert [i for i, _ in idx.search(np.array([1, 0, 0]), 5)] == ["c", "b"]
    idx.add("c", np.array([0, 0, 1]))  # replace in place
    assert len(idx) == 2 and idx.search(np.array([0, 0, 1]), 1) == [("c", 1.0)]
    with pytest.raises(ValueError):
        idx.add("d", np.array([1, 0]))
    with pytest.raises(ValueError):
        VectorIndex(0)


@pytest.mark.parametrize("min_similarity", [-1.0, 0.5, 0.9])
def test_two_stage_search_equals_a_full_scan(min_similarity):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 48)) * np.linspace(3, 0.1, 48)  # anisotropic, like real embeddings
    vecs = centres[rng.integers(0, 20, 900)] + rng.normal(scale=0.3, size=(900, 48))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    idx = VectorIndex(48, capacity=8, head_dim=8, rotate_at=300)
    for i, v in enumerate(vecs):
        idx.add(str(i), v)
    assert idx.rotation is not None
    for i in range(0, 900, 7):  # removals after the rotation was fitted
        idx.remove(str(i))
    live = np.array([i for i in range(900) if i % 7])
    pruned = 0
    for _ in range(40):
        q = vecs[rng.integers(0, 900)] + rng.normal(scale=0.2, size=48).astype(np.float32)
        q /= np.linalg.norm(q)
        full = vecs[live] @ q
        order = np.argsort(-full, kind="stable")[:5]
        want = [(str(live[o]), full[o]) for o in order if full[o] >= min_similarity]
        got = idx.search(q, 5, min_similarity)
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)
        pruned += idx.num_exact_rows_last < len(live)
    assert pruned > 0  # the bound did skip rows


def test_format_examples_most_similar_last():
    exs = [Example("1", "q1", "a1", 0.9, "llm", 0.5), Example("2", "q2", "a2", 0.8, "llm", 0.5)]
    assert format_examples(exs) == [
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
    ]


def test_ids_are_time_ordered():
    clock = ec._IdClock()
    ids = [clock.next(1000.0) for _ in range(50)] + [clock.next(999.0), clock.next(1001.0)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_build_example_store():
    base = {"pools": [{"name": "slm", "model": "m"}, {"name": "llm", "model": "m"}]}
    assert isinstance(build_example_store(settings_from_dict(base)), InMemoryExampleStore)
    off = settings_from_dict({**base, "example_cache": {"enabled": False}})
    assert build_example_store(off) is None
    red = settings_from_dict({**base, "redis_url": "redis://127.0.0.1:1/0", "example_cache": {"backend": "redis"}})
    store = build_example_store(red)
    assert isinstance(store, RedisExampleStore) and isinstance(store, ExampleStore)
    with pytest.raises(ValueError):
        RedisExampleStore("http://nope", cfg())


# --------------------------------------------------------------------------- both stores


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
        await asyncio.sleep(0.3)  # Redis records uses in the background (batched every 0.1 s)
        found = [t for t in texts if await store.lookup("t", t, k=1)]  # +1 use each
        await asyncio.sleep(0.3)
        return found

    for t in texts[:3]:
        assert await store.admit("t", t, f"answer {t}", "llm", "stop")  # rank 1 each
    ids = {t: (await store.lookup("t", t, k=1))[0].id for t in texts[:3]}  # rank 2 each
    await store.feedback("t", [ids["alpha one"]], escalated=False)  # 4
    await store.feedback("t", [ids["beta two"]], escalated=True)  # -2
    await asyncio.sleep(0.3)
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
    real_time = ec.time.time
    monkeypatch.setattr(ec.time, "time", lambda: real_time() + 120)
    assert await store.lookup("t", "old question words") == []
    assert await store.admit("t", "new question words", "new", "llm", "stop")
    assert [e.answer for e in await store.lookup("t", "new question words")] == ["new"]
    assert store.stats["expired"] >= 1
    assert [e.request_text for e in await store.entries("t")] == ["new question words"]
    await store.close()


async def test_export_put_clear_admin(make_store):
    store = make_store()
    assert await store.admit("t", "one two three", "a", "llm", "stop")
    assert await store.admit("t", "four five six", "b", "llm", "stop")
    rows = [e.to_json() for e in await store.entries("t")]
    assert [r["answer"] for r in rows] == ["a", "b"]
    assert await store.namespaces() == ["t"]
    assert await store.clear("t") == 2
    assert await store.lookup("t", "one two three") == []
    for row in rows:
        entry = ec.Entry.from_json({**row, "namespace": "u"})
        await store.put(entry)
    assert [e.answer for e in await store.lookup("u", "one two three")] == ["a"]
    assert await store.remove("u", [rows[0]["id"]]) == 1
    assert await store.lookup("u", "one two three") == []
    with pytest.raises(ValueError):
        ec.Entry.from_json({"request_text": "", "answer": "x"})
    await store.close()


# ------------------------------------------------------------------------------ Redis only


async def test_replica_sync_two_stores_one_redis(redis_url):
    a = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    b = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    assert await b.lookup("t", "the quick brown fox") == []  # b's index is loaded (empty) now
    assert await a.admit("t", "the quick brown fox", "jumps", "llm", "stop")
    assert [e.answer for e in await b.lookup("t", "the quick brown fox")] == ["jumps"]
    assert not await b.admit("t", "The quick brown fox!", "again", "llm", "stop")  # dedup across replicas
    assert b.stats["rejected_duplicate"] == 1
    assert await b.admit("t", "lazy dog sleeps", "zzz", "llm", "stop")
    assert [e.answer for e in await a.lookup("t", "lazy dog sleeps")] == ["zzz"]
    assert await a.clear("t") == 2
    assert await b.lookup("t", "the quick brown fox") == []
    assert await b.lookup("t", "lazy dog sleeps") == []
    c = RedisExampleStore(redis_url, cfg(), embed=bow_embed)  # a fresh replica loads what is there
    assert await a.admit("t", "purple monkey dishwasher", "ok", "llm", "stop")
    assert [e.answer for e in await c.lookup("t", "purple monkey dishwasher")] == ["ok"]
    assert [e.answer for e in await b.lookup("t", "purple monkey dishwasher")] == ["ok"]
    await _close(a, b, c)


async def test_redis_eviction_propagates_to_other_replica(redis_url):
    a = RedisExampleStore(redis_url, cfg(max_entries_per_namespace=1), embed=bow_embed)
    b = RedisExampleStore(redis_url, cfg(max_entries_per_namespace=1), embed=bow_embed)
    assert await a.admit("t", "first apple", "1", "llm", "stop")
    assert await b.lookup("t", "unrelated query") == []  # b's index is loaded, no uses recorded
    assert await b.admit("t", "second banana", "2", "llm", "stop")  # equal ranks: the older one goes
    assert await a.lookup("t", "first apple") == []  # a learns of the eviction from the stream
    assert [e.answer for e in await a.lookup("t", "second banana")] == ["2"]
    await _close(a, b)


async def test_ttl_is_set_on_redis_keys(redis_url):
    store = RedisExampleStore(redis_url, cfg(ttl_s=100), embed=bow_embed)
    assert await store.admit("t", "some words", "x", "llm", "stop")
    r = redis.Redis.from_url(redis_url)
    keys = r.keys(ec.KEY_PREFIX + "t:e:*")
    assert len(keys) == 1 and 0 < r.ttl(keys[0]) <= 100
    await store.close()


async def test_redis_killed_and_restarted_mid_run(redis_server, redis_url):
    store = RedisExampleStore(redis_url, cfg(), embed=bow_embed, max_backoff_s=0.2)
    assert await store.admit("t", "before apple pie", "before", "llm", "stop")
    assert len(await store.lookup("t", "before apple pie")) == 1
    redis_server.stop()
    for i in range(20):  # none of these may raise
        assert await store.lookup("t", "before apple pie") == []
        assert not await store.admit("t", f"during outage {i}", "x", "llm", "stop")
        await store.feedback("t", ["whatever"], escalated=True)
    assert not await store.health()
    assert store.stats["redis_errors"] >= 1
    assert store.stats["redis_errors"] + store.stats["skipped_unavailable"] >= 20
    redis_server.start()  # comes back empty (no persistence)
    for _ in range(100):
        if await store.health() and await store.admit("t", "after banana split", "after", "llm", "stop"):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("store did not reconnect")
    assert [e.answer for e in await store.lookup("t", "after banana split")] == ["after"]
    assert await store.lookup("t", "before apple pie") == []  # gone with the old server
    await store.close()


async def test_slow_redis_is_skipped_within_deadline(redis_url):
    store = RedisExampleStore(redis_url, cfg(deadline_ms=30), embed=bow_embed)
    assert await store.admit("t", "slow server words", "x", "llm", "stop")
    assert len(await store.lookup("t", "slow server words")) == 1
    redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "400", "ALL")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await store.lookup("t", "slow server words") == []
    assert loop.time() - t0 < 0.3
    assert store.stats["timeouts"] == 1
    await asyncio.sleep(0.45)
    for _ in range(50):
        if await store.lookup("t", "slow server words"):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("lookups did not recover after the pause")
    await store.close()


async def test_corrupt_entries_are_skipped_with_a_log_line(redis_url, caplog):
    writer = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    assert await writer.admit("t", "good entry words", "good", "llm", "stop")
    assert await writer.admit("t", "bad text entry", "bad", "llm", "stop")
    await writer.close()
    r = redis.Redis.from_url(redis_url)
    # 1) an embedding of the wrong size
    r.hset(ec.KEY_PREFIX + "t:e:zzbroken", mapping={"text": "x", "answer": "y", "model": "m",
                                                    "created": "1e12", "emb": b"\x00\x01\x02"})
    r.zadd(ec.KEY_PREFIX + "t:time", {"zzbroken": 1e12})
    # 2) an answer that is not UTF-8 (found at fetch time)
    (bad_key,) = [k for k in r.keys(ec.KEY_PREFIX + "t:e:*") if r.hget(k, "answer") == b"bad"]
    r.hset(bad_key, "answer", b"\xff\xfe")
    reader = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    with caplog.at_level(logging.WARNING, logger="switchyard.example_cache"):
        assert [e.answer for e in await reader.lookup("t", "good entry words")] == ["good"]
        assert await reader.lookup("t", "bad text entry") == []
        assert [e.answer for e in await reader.entries("t")] == ["good"]
    assert reader.stats["corrupt"] >= 2
    assert sum("skipping corrupt entry" in rec.getMessage() for rec in caplog.records) >= 2
    await reader.close()


async def test_detects_no_server_vector_search_on_plain_redis(redis_url):
    store = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    await store.lookup("t", "anything")
    assert store.stats["server_vector_search"] == 0
    assert store.stats["reloads"] == 1
    await store.close()


async def test_embedding_failure_is_a_miss(redis_url):
    def broken(texts):
        raise RuntimeError("no model")

    store = RedisExampleStore(redis_url, cfg(), embed=broken)
    assert await store.lookup("t", "words") == []
    assert not await store.admit("t", "words", "a", "llm", "stop")
    assert store.stats["embed_errors"] == 2
    emb = bow_embed(["given words"])[0]
    assert await store.admit("t", "given words", "a", "llm", "stop", embedding=emb)
    assert [e.answer for e in await store.lookup("t", "given words", embedding=emb)] == ["a"]
    await store.close()


async def test_uses_are_batched_and_flushed_on_close(redis_url):
    store = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    assert await store.admit("t", "count my uses", "x", "llm", "stop")
    for _ in range(3):
        assert await store.lookup("t", "count my uses")
    await store.close()  # before the 0.1 s batch is due: close writes it
    reader = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    (entry,) = await reader.entries("t")
    assert entry.uses == 3
    await reader.close()


async def test_lagging_replica_resyncs_after_the_op_stream_was_trimmed(redis_url, caplog):
    r = redis.Redis.from_url(redis_url)
    node_max = r.config_get("stream-node-max-entries")["stream-node-max-entries"]
    r.config_set("stream-node-max-entries", 2)  # so that MAXLEN ~ trims at a tiny cap
    texts = [f"topic{i} word{i} thing{i}" for i in range(16)]
    log_key = ec.KEY_PREFIX + "t:log"
    try:
        settings = cfg(max_entries_per_namespace=5)
        a = RedisExampleStore(redis_url, settings, embed=bow_embed, stream_maxlen=4)
        b = RedisExampleStore(redis_url, settings, embed=bow_embed, stream_maxlen=4)
        assert await b.lookup("t", texts[0]) == []  # b loads the (empty) namespace: no resync for a new stream
        for t in texts[:3]:
            assert await a.admit("t", t, "answer " + t, "llm", "stop")
            assert [e.request_text for e in await b.lookup("t", t)] == [t]  # b keeps up: trims are no loss
        assert b.stats["resyncs"] == 0
        seen = b._ns["t"].last_stream_id
        for t in texts[3:]:  # b stops reading; a adds 13 and evicts 11 (24 ops > the cap of 4)
            assert await a.admit("t", t, "answer " + t, "llm", "stop")
        first = r.xrange(log_key, "-", "+", count=1)[0][0].decode()
        assert r.xlen(log_key) < 24 and tuple(map(int, first.split("-"))) > tuple(map(int, seen.split("-")))
        live = {e.id: e.request_text for e in await a.entries("t")}
        assert len(live) == 5
        with caplog.at_level(logging.WARNING, logger="switchyard.example_cache"):
            await asyncio.gather(*(b.lookup("t", t) for t in texts[-3:]))  # concurrent lookups: one resync
        assert b.stats["resyncs"] == 1
        assert any("full resync" in rec.getMessage() for rec in caplog.records)
        assert sorted(b._ns["t"].index.ids()) == sorted(live)  # no trimmed example missing, no evicted one left
        for t in texts:
            assert [e.request_text for e in await b.lookup("t", t)] == ([t] if t in live.values() else [])
        assert b.stats["resyncs"] == 1
        await _close(a, b)
    finally:
        r.config_set("stream-node-max-entries", node_max)


async def test_a_recreated_stream_is_a_resync(redis_url):
    a = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    b = RedisExampleStore(redis_url, cfg(), embed=bow_embed)
    for t in ("alpha beta gamma", "delta epsilon zeta"):
        assert await a.admit("t", t, "x", "llm", "stop")
    assert len(await b.lookup("t", "alpha beta gamma")) == 1
    redis.Redis.from_url(redis_url).flushall()  # e.g. Redis restarted empty, then another replica writes
    assert await a.admit("t", "eta theta iota", "y", "llm", "stop")
    assert await b.lookup("t", "alpha beta gamma") == []
    assert b.stats["resyncs"] == 1 and b._ns["t"].index.ids() == [e.id for e in await a.entries("t")]
    await _close(a, b)
