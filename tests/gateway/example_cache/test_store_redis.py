"""The Redis example store on a real redis-server: export/import and the admin calls, replicas in sync,
outages, a slow server, corrupt entries, batched use counts, resyncs after the op stream was trimmed or
recreated."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis

from gateway.example_cache.store_redis import KEY_PREFIX, RedisExampleStore
from gateway.example_cache.types import Entry
from tests.gateway.fakes import bow_embed, cache_settings, wait_until_async


async def _close(*stores):
    for s in stores:
        await s.close()


async def test_export_put_clear_admin(redis_url):
    store = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    assert await store.admit("t", "one two three", "a", "llm", "stop")
    assert await store.admit("t", "four five six", "b", "llm", "stop")
    rows = [e.to_json() for e in await store.entries("t")]
    assert [r["answer"] for r in rows] == ["a", "b"]
    assert await store.namespaces() == ["t"]
    assert await store.clear("t") == 2
    assert await store.lookup("t", "one two three") == []
    for row in rows:
        entry = Entry.from_json({**row, "namespace": "u"})
        await store.put(entry)
    assert [e.answer for e in await store.lookup("u", "one two three")] == ["a"]
    assert await store.remove("u", [rows[0]["id"]]) == 1
    assert await store.lookup("u", "one two three") == []
    with pytest.raises(ValueError):
        Entry.from_json({"request_text": "", "answer": "x"})
    await store.close()


async def test_replica_sync_two_stores_one_redis(redis_url):
    a = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    b = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
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
    c = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)  # a fresh replica loads what is there
    assert await a.admit("t", "purple monkey dishwasher", "ok", "llm", "stop")
    assert [e.answer for e in await c.lookup("t", "purple monkey dishwasher")] == ["ok"]
    assert [e.answer for e in await b.lookup("t", "purple monkey dishwasher")] == ["ok"]
    await _close(a, b, c)


async def test_redis_eviction_propagates_to_other_replica(redis_url):
    a = RedisExampleStore(redis_url, cache_settings(max_entries_per_namespace=1), embed=bow_embed)
    b = RedisExampleStore(redis_url, cache_settings(max_entries_per_namespace=1), embed=bow_embed)
    assert await a.admit("t", "first apple", "1", "llm", "stop")
    assert await b.lookup("t", "unrelated query") == []  # b's index is loaded, no uses recorded
    assert await b.admit("t", "second banana", "2", "llm", "stop")  # equal ranks: the older one goes
    assert await a.lookup("t", "first apple") == []  # a learns of the eviction from the stream
    assert [e.answer for e in await a.lookup("t", "second banana")] == ["2"]
    await _close(a, b)


async def test_ttl_is_set_on_redis_keys(redis_url):
    store = RedisExampleStore(redis_url, cache_settings(ttl_s=100), embed=bow_embed)
    assert await store.admit("t", "some words", "x", "llm", "stop")
    r = redis.Redis.from_url(redis_url)
    keys = r.keys(KEY_PREFIX + "t:e:*")
    assert len(keys) == 1 and 0 < r.ttl(keys[0]) <= 100
    await store.close()


async def test_redis_killed_and_restarted_mid_run(redis_server, redis_url):
    store = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed, max_backoff_s=0.2)
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

    async def reconnected() -> bool:
        return await store.health() and await store.admit("t", "after banana split", "after", "llm", "stop")

    await wait_until_async(reconnected, "the store to reconnect")
    assert [e.answer for e in await store.lookup("t", "after banana split")] == ["after"]
    assert await store.lookup("t", "before apple pie") == []  # gone with the old server
    await store.close()


@pytest.mark.slow
async def test_slow_redis_is_skipped_within_deadline(redis_url):
    store = RedisExampleStore(redis_url, cache_settings(deadline_ms=30), embed=bow_embed)
    assert await store.admit("t", "slow server words", "x", "llm", "stop")
    assert len(await store.lookup("t", "slow server words")) == 1
    redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "400", "ALL")
    # the answer would come after the pause (400 ms) and hold the example: [] is the 30 ms deadline's
    assert await store.lookup("t", "slow server words") == []
    assert store.stats["timeouts"] == 1 and store.stats["redis_errors"] == 0
    await wait_until_async(lambda: store.lookup("t", "slow server words"), "lookups to recover after the pause")
    await store.close()


async def test_corrupt_entries_are_skipped_with_a_log_line(redis_url, caplog):
    writer = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    assert await writer.admit("t", "good entry words", "good", "llm", "stop")
    assert await writer.admit("t", "bad text entry", "bad", "llm", "stop")
    await writer.close()
    r = redis.Redis.from_url(redis_url)
    # 1) an embedding of the wrong size
    r.hset(KEY_PREFIX + "t:e:zzbroken", mapping={"text": "x", "answer": "y", "model": "m",
                                                    "created": "1e12", "emb": b"\x00\x01\x02"})
    r.zadd(KEY_PREFIX + "t:time", {"zzbroken": 1e12})
    # 2) an answer that is not UTF-8 (found at fetch time)
    (bad_key,) = [k for k in r.keys(KEY_PREFIX + "t:e:*") if r.hget(k, "answer") == b"bad"]
    r.hset(bad_key, "answer", b"\xff\xfe")
    reader = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    with caplog.at_level(logging.WARNING, logger="switchyard.example_cache"):
        assert [e.answer for e in await reader.lookup("t", "good entry words")] == ["good"]
        assert await reader.lookup("t", "bad text entry") == []
        assert [e.answer for e in await reader.entries("t")] == ["good"]
    assert reader.stats["corrupt"] >= 2
    assert sum("skipping corrupt entry" in rec.getMessage() for rec in caplog.records) >= 2
    await reader.close()


async def test_detects_no_server_vector_search_on_plain_redis(redis_url):
    store = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    await store.lookup("t", "anything")
    assert store.stats["server_vector_search"] == 0
    assert store.stats["reloads"] == 1
    await store.close()


async def test_embedding_failure_is_a_miss(redis_url):
    def broken(texts):
        raise RuntimeError("no model")

    store = RedisExampleStore(redis_url, cache_settings(), embed=broken)
    assert await store.lookup("t", "words") == []
    assert not await store.admit("t", "words", "a", "llm", "stop")
    assert store.stats["embed_errors"] == 2
    emb = bow_embed(["given words"])[0]
    assert await store.admit("t", "given words", "a", "llm", "stop", embedding=emb)
    assert [e.answer for e in await store.lookup("t", "given words", embedding=emb)] == ["a"]
    await store.close()


async def test_uses_are_batched_and_flushed_on_close(redis_url):
    store = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    assert await store.admit("t", "count my uses", "x", "llm", "stop")
    for _ in range(3):
        assert await store.lookup("t", "count my uses")
    await store.close()  # before the 0.1 s batch is due: close writes it
    reader = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    (entry,) = await reader.entries("t")
    assert entry.uses == 3
    await reader.close()


async def test_lagging_replica_resyncs_after_the_op_stream_was_trimmed(redis_url, caplog):
    r = redis.Redis.from_url(redis_url)
    node_max = r.config_get("stream-node-max-entries")["stream-node-max-entries"]
    r.config_set("stream-node-max-entries", 2)  # so that MAXLEN ~ trims at a tiny cap
    texts = [f"topic{i} word{i} thing{i}" for i in range(16)]
    log_key = KEY_PREFIX + "t:log"
    try:
        settings = cache_settings(max_entries_per_namespace=5)
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
    a = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    b = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    for t in ("alpha beta gamma", "delta epsilon zeta"):
        assert await a.admit("t", t, "x", "llm", "stop")
    assert len(await b.lookup("t", "alpha beta gamma")) == 1
    redis.Redis.from_url(redis_url).flushall()  # e.g. Redis restarted empty, then another replica writes
    assert await a.admit("t", "eta theta iota", "y", "llm", "stop")
    assert await b.lookup("t", "alpha beta gamma") == []
    assert b.stats["resyncs"] == 1 and b._ns["t"].index.ids() == [e.id for e in await a.entries("t")]
    await _close(a, b)
