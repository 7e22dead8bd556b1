"""In-context example cache (IC-Cache): good past (request, LLM answer) pairs handed to the SLM.

Contract (used by ``gateway/pipeline.py``):
  * ``lookup(namespace, text, k)`` returns at most ``k`` examples of *that* namespace, best first, each with
    cosine similarity >= ``min_similarity`` and together within ``max_example_tokens``. It never raises:
    a miss, an embedding failure, Redis down or slower than ``deadline_ms`` all return ``[]`` and are
    counted in ``store.stats``. The deadline covers the store's work (sync, search, fetch); the query
    embedding is computed before it and timed separately (``embed_ms_total`` / ``num_embeds``). The
    pipeline embeds once (``embed``) and passes the vector to ``lookup`` and later to ``admit``.
  * ``admit(...)`` keeps only answers with ``finish_reason == "stop"`` that passed the guard and are not
    near-duplicates (cosine >= ``dedup_similarity``) of an example already stored; returns whether it
    stored one. Never raises for store failures (returns False, counted).
  * ``feedback(namespace, ids, escalated)`` records that an SLM answer which used these examples was kept
    (``escalated=False``) or escalated by the cascade; utility and eviction order follow from it.
Entries older than ``ttl_s`` are never returned and are swept on admit.

The package, each module importing only those above it (import the public names from here):
  ``index.py``         ``VectorIndex``: exact in-process top-k cosine search (two-stage at scale), ``unit_vector``
  ``types.py``         ``Example``/``Examples``, ``Entry``, ``Embed``, the ``ExampleStore`` protocol
  ``policy.py``        the IC-Cache policy: admission, selection under the token budget, LFU-DA ranks, utility
  ``store.py``         ``StoreBase``: what both stores share (embedding, counters, ids)
  ``store_memory.py``  ``InMemoryExampleStore`` (embedded default)
  ``server_index.py``  optional vector search inside Redis (FT.SEARCH)
  ``store_redis.py``   ``RedisExampleStore`` (Redis layout, replica sync, failure handling)
The offline ``switchyard cache ...`` commands live in ``training/cache_cmd.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.example_cache.index import VectorIndex, unit_vector
from gateway.example_cache.policy import format_examples, utility
from gateway.example_cache.store import StoreBase
from gateway.example_cache.store_memory import InMemoryExampleStore
from gateway.example_cache.types import Embed, Entry, Example, Examples, ExampleStore

if TYPE_CHECKING:
    from gateway.example_cache.store_redis import RedisExampleStore
    from gateway.settings import Settings


def build_example_store(settings: Settings, embed: Embed | None = None) -> ExampleStore | None:
    """The store the gateway should use, or None when the example cache is off (or ``top_k == 0``)."""
    cfg = settings.example_cache
    if not cfg.enabled or cfg.top_k == 0:
        return None
    if cfg.backend == "redis":
        url = cfg.redis_url or settings.redis_url
        if url is None:
            raise ValueError("example_cache.backend = 'redis' needs redis_url (or example_cache.redis_url)")
        from gateway.example_cache.store_redis import RedisExampleStore

        return RedisExampleStore(url, cfg, embed)
    return InMemoryExampleStore(cfg, embed)


def __getattr__(name: str) -> Any:
    """``RedisExampleStore`` on first use: the redis client library is imported only when a Redis store is."""
    if name == "RedisExampleStore":
        from gateway.example_cache.store_redis import RedisExampleStore

        return RedisExampleStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Embed", "Entry", "Example", "ExampleStore", "Examples", "InMemoryExampleStore", "RedisExampleStore",
    "StoreBase", "VectorIndex", "build_example_store", "format_examples", "unit_vector", "utility",
]
