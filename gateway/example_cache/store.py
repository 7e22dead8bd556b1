"""``StoreBase``: what both example stores share — settings, embedding, the admission checks, the token
budget, the counters in ``stats`` and time-ordered ids. The stores (``store_memory``, ``store_redis``)
add where entries live; the rules they apply are ``gateway/example_cache/policy.py``'s."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from gateway.example_cache.index import unit_vector
from gateway.example_cache.policy import admission_refusal, select_within_budget
from gateway.example_cache.types import Embed, Example, Examples

if TYPE_CHECKING:
    from gateway.settings import ExampleCacheSettings

logger = logging.getLogger("switchyard.example_cache")

STAT_NAMES = (
    "lookups", "hits", "misses", "examples_returned", "timeouts", "redis_errors", "skipped_unavailable",
    "embed_errors", "num_embeds", "embed_ms_total", "admitted", "rejected_finish", "rejected_guard",
    "rejected_empty", "rejected_duplicate", "admit_failures", "evicted", "expired", "corrupt",
    "feedback_kept", "feedback_escalated", "reloads", "resyncs", "server_vector_search", "server_search_fallbacks",
)


class _IdClock:
    """Time-ordered ids (hex ms + sequence + random): lexicographic order = admission order."""

    def __init__(self) -> None:
        self._last_ms = 0
        self._seq = itertools.count()

    def next(self, now: float) -> str:
        ms = max(int(now * 1000), self._last_ms)
        self._last_ms = ms
        return f"{ms:012x}{next(self._seq) % 0x1000000:06x}{secrets.token_hex(2)}"


class StoreBase:
    """What both stores share: settings, embedding, admission checks, token budget, counters."""

    def __init__(self, settings: ExampleCacheSettings, embed: Embed | None = None) -> None:
        self.settings = settings
        self._embed_fn = embed
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._ids = _IdClock()

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def _embedder(self) -> Embed:
        if self._embed_fn is None:  # the real MiniLM, built on first use (never at import)
            from routers.embeddings import MiniLMEmbedder

            self._embed_fn = MiniLMEmbedder().encode
        return self._embed_fn

    async def start(self) -> None:
        """Start-up checks (the Redis store detects server-side vector search); nothing by default."""
        return None

    async def flush(self) -> None:
        """Write what the store batches (the Redis store's use counts) now; nothing by default."""
        return None

    async def embed(self, text: str) -> np.ndarray | None:
        """The unit query vector of ``text``, or None when embedding failed (counted in ``embed_errors``,
        logged; never raises). Pass it to ``lookup`` and ``admit`` as ``embedding=`` so that one request
        (a lookup, then the LLM answer's admission after an escalation) embeds its text once."""
        return await self._embed_one(text, None)

    async def _embed_one(self, text: str, embedding: np.ndarray | None) -> np.ndarray | None:
        if embedding is not None:
            return unit_vector(embedding)
        t0 = time.perf_counter()
        try:
            fn = self._embedder()
            vecs = await asyncio.to_thread(fn, [text])
            vec = unit_vector(np.asarray(vecs)[0])
        except Exception as e:  # noqa: BLE001 - the request must go on without examples
            logger.warning("example cache: embedding failed (%s: %s); skipping", type(e).__name__, e)
            self._count("embed_errors")
            return None
        self._count("num_embeds")
        self._count("embed_ms_total", int(round((time.perf_counter() - t0) * 1000)))
        return vec

    async def _admission_vector(self, text: str, answer: str, finish_reason: str | None, guard_ok: bool,
                                embedding: np.ndarray | None) -> np.ndarray | None:
        """The unit vector to store, or None (counted) when the answer may not be admitted or not embedded."""
        refusal = admission_refusal(text, answer, finish_reason, guard_ok)
        if refusal:
            self._count(refusal)
            return None
        q = await self._embed_one(text, embedding)
        if q is None:
            self._count("admit_failures")
        return q

    def _is_expired(self, created_at: float, now: float) -> bool:
        ttl = self.settings.ttl_s
        return ttl is not None and created_at + ttl < now

    def _select(self, candidates: Iterable[Example], k: int) -> Examples:
        return select_within_budget(candidates, k, self.settings.max_example_tokens)

    def _record_outcome(self, examples: Examples) -> Examples:
        self._count("hits" if examples else "misses")
        self._count("examples_returned", len(examples))
        return examples
