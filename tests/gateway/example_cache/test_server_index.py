"""Server-side vector search (``example_cache.server_search``) on the real Redis 7 of this machine, which has
no query engine: detection says no, ``auto`` keeps the in-process index, ``on`` fails start-up clearly, and
an FT error falls back to the in-process index once. The FT query path itself is checked only as far as
building the query and reading results (no Redis 8 / Redis Stack here)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import redis

from gateway.example_cache.server_index import ServerIndex, has_server_search, namespace_tag, parse_hits
from gateway.example_cache.store_redis import KEY_PREFIX, RedisExampleStore
from gateway.lifecycle import Lifecycle
from gateway.settings import ConfigError
from gateway.wiring import build_pipeline
from tests.gateway.fakes import FakeFactory, bow_embed, cache_settings, fake_settings


async def test_auto_detects_no_server_search_and_uses_the_in_process_index(redis_url):
    store = RedisExampleStore(redis_url, cache_settings(server_search="auto"), embed=bow_embed)
    await store.start()
    assert store.stats["server_vector_search"] == 0 and store._server is None
    assert await store.admit("t", "how do tides work", "the moon", "llm", "stop")
    assert [e.answer for e in await store.lookup("t", "how do tides work")] == ["the moon"]
    assert store.stats["reloads"] == 1 and store.stats["server_search_fallbacks"] == 0  # in-process index
    key = redis.Redis.from_url(redis_url).keys(KEY_PREFIX + "t:e:*")[0]
    assert redis.Redis.from_url(redis_url).hget(key, "ns") == namespace_tag("t").encode()  # the TAG field
    await store.close()


async def test_detection_on_plain_redis_7(redis_url):
    from redis.asyncio import Redis

    r = Redis.from_url(redis_url)
    assert await has_server_search(r) is False
    await r.aclose()


async def test_on_fails_start_up_with_a_clear_message(redis_url):
    settings = fake_settings(redis_url=redis_url, example_cache={
        "enabled": True, "backend": "redis", "server_search": "on"})
    lifecycle = Lifecycle(build_pipeline(settings, backend_factory=FakeFactory(), embed=bow_embed))
    with pytest.raises(ConfigError, match=r"server_search = .on. but this Redis server has no vector search .no FT"):
        await lifecycle.start()
    await lifecycle.close()


async def test_on_with_redis_unreachable_fails_start_up():
    store = RedisExampleStore("redis://127.0.0.1:1/0", cache_settings(server_search="on"), embed=bow_embed,
                              admit_timeout_s=0.5)
    with pytest.raises(ConfigError, match="cannot ask Redis"):
        await store.start()
    await store.close()


def test_on_needs_the_redis_backend():
    with pytest.raises(ConfigError, match="server_search"):
        fake_settings(example_cache={"enabled": True, "backend": "memory", "server_search": "on"})
    assert fake_settings(example_cache={"enabled": True}).example_cache.server_search == "off"


async def test_an_ft_error_falls_back_to_the_in_process_index_once(redis_url, caplog):
    store = RedisExampleStore(redis_url, cache_settings(), embed=bow_embed)
    store._server = ServerIndex(KEY_PREFIX)  # as if detected: plain Redis 7 answers FT.* with an error
    with caplog.at_level(logging.WARNING, logger="switchyard.example_cache"):
        assert await store.admit("t", "red green blue", "colours", "llm", "stop")
        assert not await store.admit("t", "red green blue!", "again", "llm", "stop")  # dedup in process
        assert [e.answer for e in await store.lookup("t", "red green blue")] == ["colours"]
    assert store.stats["server_search_fallbacks"] == 1 and store._server is None
    assert sum("server-side vector search failed" in r.getMessage() for r in caplog.records) == 1
    assert store.stats["redis_errors"] == 0  # an FT error is not a Redis outage
    await store.close()


def test_knn_query_is_prefiltered_by_the_namespace_tag():
    q = ServerIndex(KEY_PREFIX).query("team a, b", 7)
    assert q.query_string() == f"(@ns:{{{namespace_tag('team a, b')}}})=>[KNN 7 @emb $vec AS dist]"
    assert namespace_tag("team a, b").isalnum() and namespace_tag("x") != namespace_tag("y")
    args = q.get_args()
    assert "DIALECT" in args and args[args.index("DIALECT") + 1] == 2
    assert "SORTBY" in args and args[args.index("SORTBY") + 1] == "dist"


def test_parse_hits_applies_the_cutoff_and_the_key_prefix():
    prefix = KEY_PREFIX + "t:e:"

    def doc(key, dist, text="q"):
        return SimpleNamespace(id=key, dist=str(dist), text=text, answer="a", model="llm", created="1.5",
                               kept="2", escalated="1")

    docs = [doc(prefix + "b", 0.2), doc(prefix + "a", 0.1), doc(prefix + "c", 0.6),
            doc(KEY_PREFIX + "other:e:z", 0.0)]
    hits = parse_hits(docs, prefix, min_similarity=0.5)
    assert [(h.id, round(h.similarity, 6)) for h in hits] == [("a", 0.9), ("b", 0.8)]
    assert (hits[0].created_at, hits[0].kept, hits[0].escalated) == (1.5, 2, 1)
