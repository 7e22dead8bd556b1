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

Eviction is LFU with dynamic aging (LFU-DA) and utility aware: an entry's rank starts at the namespace's
``floor`` + 1 (its admission counts as one use) and moves by +1 per retrieval, +2 per kept answer, -4 per
escalated answer. When a namespace is over ``max_entries_per_namespace`` the lowest rank goes first, ties
oldest first (ids are time ordered), and the floor rises to the evicted rank, so proven examples stay
while a full cache still turns over. Entries older than ``ttl_s`` are never returned and are swept on admit.

Where things live (this module is the public face; import from here):
  ``gateway/example_cache.py``        the contract: ``ExampleStore``, ``Example``/``Entry``, ranks, ``StoreBase``
                                      (what both stores share), ``format_examples``, ``build_example_store``
  ``gateway/example_index.py``        ``VectorIndex``: exact in-process top-k cosine search (two-stage at scale)
  ``gateway/example_store_memory.py`` ``InMemoryExampleStore`` (embedded default)
  ``gateway/example_store_redis.py``  ``RedisExampleStore`` (Redis layout, replica sync, failure handling)
  ``gateway/example_cache_cli.py``    ``switchyard cache ...`` handlers
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from gateway.example_index import VectorIndex, unit_vector

if TYPE_CHECKING:
    from gateway.example_store_memory import InMemoryExampleStore
    from gateway.example_store_redis import RedisExampleStore
    from gateway.settings import ExampleCacheSettings, Settings

logger = logging.getLogger("switchyard.example_cache")

Embed = Callable[[list[str]], np.ndarray]
"""texts -> float32 array [n, dim], rows L2-normalised (MiniLM in production, anything in tests)."""

USE_WEIGHT = 1.0
KEPT_WEIGHT = 2.0
ESCALATED_WEIGHT = -4.0
KEY_PREFIX = "switchyard:ex:"
STAT_NAMES = (
    "lookups", "hits", "misses", "examples_returned", "timeouts", "redis_errors", "skipped_unavailable",
    "embed_errors", "num_embeds", "embed_ms_total", "admitted", "rejected_finish", "rejected_guard",
    "rejected_empty", "rejected_duplicate", "admit_failures", "evicted", "expired", "corrupt",
    "feedback_kept", "feedback_escalated", "reloads", "resyncs", "server_vector_search", "server_search_fallbacks",
)


# ------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class Example:
    """One retrieved example, ready to be shown to the SLM."""

    id: str
    request_text: str
    answer: str
    similarity: float
    model: str
    utility: float


@dataclass
class Entry:
    """One stored example: the unit of export and import. ``embedding`` is float32 [dim], unit norm."""

    id: str
    namespace: str
    request_text: str
    answer: str
    model: str
    created_at: float
    uses: int = 0
    kept: int = 0
    escalated: int = 0
    embedding: np.ndarray | None = field(default=None, repr=False)
    rank: float = 0.0  # eviction rank (see module docstring); set by the store

    @property
    def utility(self) -> float:
        """Posterior mean of P(kept) under a Beta(1, 1) prior: 0.5 when nothing is known."""
        return utility(self.kept, self.escalated)

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id, "namespace": self.namespace, "request_text": self.request_text,
            "answer": self.answer, "model": self.model, "created_at": self.created_at,
            "uses": self.uses, "kept": self.kept, "escalated": self.escalated,
        }
        if self.embedding is not None:
            row["embedding_f16"] = base64.b64encode(np.asarray(self.embedding, np.float16).tobytes()).decode()
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Entry:
        """Raises ValueError naming the missing/bad field."""
        if not isinstance(row, dict):
            raise ValueError(f"entry must be an object, got {type(row).__name__}")
        for key in ("request_text", "answer"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"entry field {key!r} must be a non-empty string")
        emb = None
        if row.get("embedding_f16"):
            emb = unit_vector(np.frombuffer(base64.b64decode(row["embedding_f16"]), np.float16).astype(np.float32))
        return cls(
            id=str(row.get("id") or ""), namespace=str(row.get("namespace") or ""),
            request_text=row["request_text"], answer=row["answer"], model=str(row.get("model") or ""),
            created_at=float(row.get("created_at") or time.time()), uses=int(row.get("uses") or 0),
            kept=int(row.get("kept") or 0), escalated=int(row.get("escalated") or 0), embedding=emb,
        )


def utility(kept: int, escalated: int) -> float:
    return (kept + 1.0) / (kept + escalated + 2.0)


def retention_score(uses: int, kept: int, escalated: int) -> float:
    """What an entry's statistics add to its eviction rank (lowest rank is evicted first)."""
    return USE_WEIGHT * uses + KEPT_WEIGHT * kept + ESCALATED_WEIGHT * escalated


def initial_rank(floor: float, entry: Entry) -> float:
    return floor + USE_WEIGHT + retention_score(entry.uses, entry.kept, entry.escalated)


def approx_tokens(text: str) -> int:
    """Token estimate without a tokenizer (~4 characters per token for English BPE vocabularies)."""
    return max(1, (len(text) + 3) // 4)


def format_examples(examples: Sequence[Example]) -> list[dict[str, str]]:
    """Chat messages to prepend before the caller's messages: one user/assistant pair per example,
    the most similar last (closest to the real question)."""
    messages: list[dict[str, str]] = []
    for ex in reversed(list(examples)):
        messages.append({"role": "user", "content": ex.request_text})
        messages.append({"role": "assistant", "content": ex.answer})
    return messages


class _IdClock:
    """Time-ordered ids (hex ms + sequence + random): lexicographic order = admission order."""

    def __init__(self) -> None:
        self._last_ms = 0
        self._seq = itertools.count()

    def next(self, now: float) -> str:
        ms = max(int(now * 1000), self._last_ms)
        self._last_ms = ms
        return f"{ms:012x}{next(self._seq) % 0x1000000:06x}{secrets.token_hex(2)}"


# ---------------------------------------------------------------------------- the protocol


@runtime_checkable
class ExampleStore(Protocol):
    """See the module docstring. ``embedding=`` (from ``embed``) skips embedding ``text`` again."""

    stats: dict[str, int]

    async def start(self) -> None: ...

    async def embed(self, text: str) -> np.ndarray | None: ...

    async def lookup(self, namespace: str, text: str, k: int | None = None, *,
                     embedding: np.ndarray | None = None) -> list[Example]: ...

    async def admit(self, namespace: str, text: str, answer: str, model: str, finish_reason: str | None,
                    guard_ok: bool = True, *, embedding: np.ndarray | None = None) -> bool: ...

    async def feedback(self, namespace: str, example_ids: Sequence[str], escalated: bool) -> None: ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...


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
        refusal = self._admission_refusal(text, answer, finish_reason, guard_ok)
        if refusal:
            self._count(refusal)
            return None
        q = await self._embed_one(text, embedding)
        if q is None:
            self._count("admit_failures")
        return q

    async def _complete_import(self, entry: Entry) -> None:
        """Fill in an imported entry's embedding and id (ValueError when it cannot be embedded)."""
        if entry.embedding is None:
            entry.embedding = await self._embed_one(entry.request_text, None)
            if entry.embedding is None:
                raise ValueError(f"cannot embed entry {entry.id!r}")
        entry.id = entry.id or self._ids.next(entry.created_at)

    def _admission_refusal(self, text: str, answer: str, finish_reason: str | None, guard_ok: bool) -> str | None:
        if finish_reason != "stop":
            return "rejected_finish"
        if not guard_ok:
            return "rejected_guard"
        if not text.strip() or not answer.strip():
            return "rejected_empty"
        return None

    def _is_expired(self, created_at: float, now: float) -> bool:
        ttl = self.settings.ttl_s
        return ttl is not None and created_at + ttl < now

    def _select(self, candidates: Iterable[Example], k: int) -> list[Example]:
        """Best-first candidates → at most k within the token budget (one that doesn't fit is skipped)."""
        budget = self.settings.max_example_tokens
        chosen: list[Example] = []
        for ex in candidates:
            if len(chosen) >= k:
                break
            cost = approx_tokens(ex.request_text) + approx_tokens(ex.answer)
            if cost > budget:
                continue
            budget -= cost
            chosen.append(ex)
        return chosen

    def _num_candidates(self, k: int) -> int:
        return 4 * k + 8

    def _record_outcome(self, examples: list[Example]) -> list[Example]:
        self._count("hits" if examples else "misses")
        self._count("examples_returned", len(examples))
        return examples


def build_example_store(settings: Settings, embed: Embed | None = None) -> ExampleStore | None:
    """The store the gateway should use, or None when the example cache is off (or ``top_k == 0``)."""
    cfg = settings.example_cache
    if not cfg.enabled or cfg.top_k == 0:
        return None
    if cfg.backend == "redis":
        url = cfg.redis_url or settings.redis_url
        if url is None:
            raise ValueError("example_cache.backend = 'redis' needs redis_url (or example_cache.redis_url)")
        from gateway.example_store_redis import RedisExampleStore

        return RedisExampleStore(url, cfg, embed)
    from gateway.example_store_memory import InMemoryExampleStore

    return InMemoryExampleStore(cfg, embed)


def __getattr__(name: str) -> Any:
    """The two stores, re-exported lazily: their modules import this one's types, so an eager import here
    would be circular. ``from gateway.example_cache import RedisExampleStore`` keeps working."""
    if name == "InMemoryExampleStore":
        from gateway.example_store_memory import InMemoryExampleStore

        return InMemoryExampleStore
    if name == "RedisExampleStore":
        from gateway.example_store_redis import RedisExampleStore

        return RedisExampleStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ESCALATED_WEIGHT", "KEPT_WEIGHT", "KEY_PREFIX", "STAT_NAMES", "USE_WEIGHT", "Embed", "Entry", "Example",
    "ExampleStore", "InMemoryExampleStore", "RedisExampleStore", "StoreBase", "VectorIndex", "approx_tokens",
    "build_example_store", "format_examples", "initial_rank", "retention_score", "unit_vector", "utility",
]
