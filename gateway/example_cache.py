"""In-context example cache (IC-Cache): good past (request, LLM answer) pairs handed to the SLM.

Contract (used by ``gateway/pipeline.py``):
  * ``lookup(namespace, text, k)`` returns at most ``k`` examples of *that* namespace, best first, each with
    cosine similarity >= ``min_similarity`` and together within ``max_example_tokens``. It never raises:
    a miss, an embedding failure, Redis down or slower than ``deadline_ms`` all return ``[]`` and are
    counted in ``store.stats``. The deadline covers the store's work (sync, search, fetch); the query
    embedding is computed before it and timed separately (``embed_ms_total`` / ``num_embeds``).
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

Redis layout (prefix ``switchyard:ex:``; plain Redis 7, no modules):
  ``{ns}:e:{id}`` hash (text, answer, model, created, emb = float16 bytes, uses, kept, escalated; EXPIRE ttl),
  ``{ns}:rank`` zset id -> retention score, ``{ns}:time`` zset id -> created, ``{ns}:log`` stream of
  ``add``/``del``/``clear`` ops, ``namespaces`` set. Each gateway replica keeps an in-process vector index
  per namespace (exact search) and replays the stream before every search, so replicas stay in sync.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from gateway.settings import ExampleCacheSettings, Settings

logger = logging.getLogger("switchyard.example_cache")

Embed = Callable[[list[str]], np.ndarray]
"""texts -> float32 array [n, dim], rows L2-normalised (MiniLM in production, anything in tests)."""

USE_WEIGHT = 1.0
KEPT_WEIGHT = 2.0
ESCALATED_WEIGHT = -4.0
KEY_PREFIX = "switchyard:ex:"
_REDIS_ERRORS = (RedisError, OSError, ConnectionError)
STAT_NAMES = (
    "lookups", "hits", "misses", "examples_returned", "timeouts", "redis_errors", "skipped_unavailable",
    "embed_errors", "num_embeds", "embed_ms_total", "admitted", "rejected_finish", "rejected_guard",
    "rejected_empty", "rejected_duplicate", "admit_failures", "evicted", "expired", "corrupt",
    "feedback_kept", "feedback_escalated", "reloads", "server_vector_search",
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
            emb = _unit(np.frombuffer(base64.b64decode(row["embedding_f16"]), np.float16).astype(np.float32))
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


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class _IdClock:
    """Time-ordered ids (hex ms + sequence + random): lexicographic order = admission order."""

    def __init__(self) -> None:
        self._last_ms = 0
        self._seq = itertools.count()

    def next(self, now: float) -> str:
        ms = max(int(now * 1000), self._last_ms)
        self._last_ms = ms
        return f"{ms:012x}{next(self._seq) % 0x1000000:06x}{secrets.token_hex(2)}"


# ------------------------------------------------------------------------------- the index

_blas_controller: Any = None


def _single_threaded_blas() -> Any:
    """A context that holds BLAS to one thread: a matrix-vector product gains nothing from threads, and
    on a busy CPU OpenBLAS's threads turn a 0.1 ms scan into tens of ms (measured; see BENCHMARKS.md)."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas_controller = ThreadpoolController().select(user_api="blas")
        except Exception:  # noqa: BLE001 - optional speed-up only
            _blas_controller = False
    return _blas_controller.limit(limits=1) if _blas_controller else contextlib.nullcontext()



class VectorIndex:
    """Exact top-k cosine search over the unit vectors of one namespace (numpy, in process).

    Rows live in preallocated float32 matrices; removal swaps the last row into the hole. Not thread
    safe: one store owns it and touches it from its event loop only.

    Large namespaces (>= ``rotate_at`` rows) search in two exact stages: rows are kept in a PCA basis
    fitted once on the rows present then (an orthonormal rotation, so dot products are unchanged), split
    into the first ``head_dim`` coordinates and the rest. Stage one scans only the head matrix (small
    enough to stay in the CPU cache) and bounds each row's score by Cauchy-Schwarz:
    ``q.x <= q_head.x_head + |q_tail| |x_tail|``. Stage two scores exactly only the rows whose bound
    reaches the cutoff (the larger of ``min_similarity`` and the k-th best exact score among the head's
    top k); when too many rows pass, it scores all of them. Results equal a full scan.
    """

    def __init__(self, dim: int, capacity: int = 1024, *, head_dim: int = 64, rotate_at: int = 16384) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.head_dim = min(head_dim, dim)
        self.rotate_at = rotate_at
        self.rotation: np.ndarray | None = None  # dim x dim, columns = basis; None = identity
        cap = max(capacity, 16)
        self._head = np.zeros((cap, self.head_dim), dtype=np.float32)
        self._tail = np.zeros((cap, dim - self.head_dim), dtype=np.float32)
        self._tail_norm = np.zeros(cap, dtype=np.float32)
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self.num_exact_rows_last = 0  # rows scored exactly by the last search (for benchmarks)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: str) -> bool:
        return id_ in self._row

    def ids(self) -> list[str]:
        return list(self._ids)

    def add(self, id_: str, vec: np.ndarray) -> None:
        vec = np.asarray(vec, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise ValueError(f"vector has dim {vec.shape[0]}, index has {self.dim}")
        row = self._row.get(id_)
        if row is None:
            row = len(self._ids)
            if row == self._head.shape[0]:
                self._grow(row * 2)
            self._ids.append(id_)
            self._row[id_] = row
        self._set_row(row, vec if self.rotation is None else vec @ self.rotation)
        if self.rotation is None and len(self._ids) >= self.rotate_at:
            self._fit_rotation()

    def _set_row(self, row: int, rotated: np.ndarray) -> None:
        self._head[row] = rotated[: self.head_dim]
        self._tail[row] = rotated[self.head_dim :]
        self._tail_norm[row] = np.linalg.norm(rotated[self.head_dim :])

    def _grow(self, cap: int) -> None:
        n = len(self._ids)
        for name in ("_head", "_tail", "_tail_norm"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), dtype=np.float32)
            new[:n] = old[:n]
            setattr(self, name, new)

    def _fit_rotation(self) -> None:
        """Principal axes of the rows present (uncentred second moments), largest first; rotate all rows."""
        n = len(self._ids)
        rows = np.hstack([self._head[:n], self._tail[:n]])
        sample = rows[:: max(1, n // 8192)]
        _, eigvecs = np.linalg.eigh(sample.T @ sample)
        basis = np.ascontiguousarray(eigvecs[:, ::-1], dtype=np.float32)
        rotated = rows @ basis
        self.rotation = basis
        self._head[:n] = rotated[:, : self.head_dim]
        self._tail[:n] = rotated[:, self.head_dim :]
        self._tail_norm[:n] = np.linalg.norm(rotated[:, self.head_dim :], axis=1)

    def remove(self, id_: str) -> bool:
        row = self._row.pop(id_, None)
        if row is None:
            return False
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._head[row] = self._head[last]
            self._tail[row] = self._tail[last]
            self._tail_norm[row] = self._tail_norm[last]
            self._ids[row] = moved
            self._row[moved] = row
        self._ids.pop()
        return True

    def search(self, query: np.ndarray, k: int, min_similarity: float = -1.0) -> list[tuple[str, float]]:
        """Top ``k`` (id, cosine) with cosine >= ``min_similarity``, best first."""
        if len(self._ids) == 0 or k <= 0:
            return []
        with _single_threaded_blas():
            return self._search(query, k, min_similarity)

    def _search(self, query: np.ndarray, k: int, min_similarity: float) -> list[tuple[str, float]]:
        n = len(self._ids)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if self.rotation is not None:
            q = q @ self.rotation
        q_head, q_tail = q[: self.head_dim], q[self.head_dim :]
        partial = self._head[:n] @ q_head
        rows: np.ndarray | None = None
        if self.rotation is not None:
            probe = np.argpartition(-partial, k - 1)[:k] if k < n else np.arange(n)
            probe_scores = partial[probe] + self._tail[probe] @ q_tail
            cutoff = float(min_similarity)
            if len(probe) == k:
                cutoff = max(cutoff, float(probe_scores.min()))
            bound = partial + float(np.linalg.norm(q_tail)) * self._tail_norm[:n]
            passing = np.flatnonzero(bound >= cutoff - 1e-5)
            if len(passing) <= n // 4:
                rows = passing
        if rows is None:
            scores, rows = partial + self._tail[:n] @ q_tail, np.arange(n)
        else:
            scores = partial[rows] + self._tail[rows] @ q_tail
        self.num_exact_rows_last = len(rows)
        if k < len(rows):
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(rows))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self._ids[rows[i]], float(scores[i])) for i in top if scores[i] >= min_similarity]


# ---------------------------------------------------------------------------- the protocol


@runtime_checkable
class ExampleStore(Protocol):
    stats: dict[str, int]

    async def lookup(self, namespace: str, text: str, k: int | None = None) -> list[Example]: ...

    async def admit(self, namespace: str, text: str, answer: str, model: str, finish_reason: str | None,
                    guard_ok: bool = True) -> bool: ...

    async def feedback(self, namespace: str, example_ids: Sequence[str], escalated: bool) -> None: ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...


class _StoreBase:
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
            from routers.features import MiniLMEmbedder

            self._embed_fn = MiniLMEmbedder().encode
        return self._embed_fn

    async def _embed_one(self, text: str, embedding: np.ndarray | None) -> np.ndarray | None:
        if embedding is not None:
            return _unit(embedding)
        t0 = time.perf_counter()
        try:
            fn = self._embedder()
            vecs = await asyncio.to_thread(fn, [text])
            vec = _unit(np.asarray(vecs)[0])
        except Exception as e:  # noqa: BLE001 - the request must go on without examples
            logger.warning("example cache: embedding failed (%s: %s); skipping", type(e).__name__, e)
            self._count("embed_errors")
            return None
        self._count("num_embeds")
        self._count("embed_ms_total", int(round((time.perf_counter() - t0) * 1000)))
        return vec

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


# ------------------------------------------------------------------------ in-memory store


@dataclass
class _MemNamespace:
    index: VectorIndex | None = None
    entries: dict[str, Entry] = field(default_factory=dict)
    floor: float = 0.0


class InMemoryExampleStore(_StoreBase):
    """The embedded default: one process, no persistence. Same contract as ``RedisExampleStore``."""

    def __init__(self, settings: ExampleCacheSettings, embed: Embed | None = None) -> None:
        super().__init__(settings, embed)
        self._ns: dict[str, _MemNamespace] = {}

    def _space(self, namespace: str, dim: int) -> _MemNamespace:
        space = self._ns.setdefault(namespace, _MemNamespace())
        if space.index is None:
            space.index = VectorIndex(dim)
        return space

    async def lookup(self, namespace: str, text: str, k: int | None = None, *,
                     embedding: np.ndarray | None = None) -> list[Example]:
        self._count("lookups")
        k = self.settings.top_k if k is None else k
        if k <= 0 or not text or namespace not in self._ns:
            return self._record_outcome([])
        q = await self._embed_one(text, embedding)
        if q is None:
            return self._record_outcome([])
        space = self._space(namespace, q.shape[0])
        now = time.time()
        found: list[Example] = []
        for id_, sim in space.index.search(q, self._num_candidates(k), self.settings.min_similarity):
            e = space.entries[id_]
            if self._is_expired(e.created_at, now):
                self._drop(space, id_, "expired")
                continue
            found.append(Example(e.id, e.request_text, e.answer, sim, e.model, e.utility))
        chosen = self._select(found, k)
        for ex in chosen:
            space.entries[ex.id].uses += 1
            space.entries[ex.id].rank += USE_WEIGHT
        return self._record_outcome(chosen)

    async def admit(self, namespace: str, text: str, answer: str, model: str, finish_reason: str | None,
                    guard_ok: bool = True, *, embedding: np.ndarray | None = None) -> bool:
        refusal = self._admission_refusal(text, answer, finish_reason, guard_ok)
        if refusal:
            self._count(refusal)
            return False
        q = await self._embed_one(text, embedding)
        if q is None:
            self._count("admit_failures")
            return False
        space = self._space(namespace, q.shape[0])
        self._sweep_expired(space, time.time())
        if space.index.search(q, 1, self.settings.dedup_similarity):
            self._count("rejected_duplicate")
            return False
        now = time.time()
        entry = Entry(self._ids.next(now), namespace, text, answer, model, now, embedding=q)
        self._insert(space, entry)
        self._count("admitted")
        self._evict(space)
        return entry.id in space.entries  # the newcomer itself may be the lowest rank

    async def feedback(self, namespace: str, example_ids: Sequence[str], escalated: bool) -> None:
        space = self._ns.get(namespace)
        for id_ in example_ids:
            e = space.entries.get(id_) if space else None
            if e is None:
                continue
            if escalated:
                e.escalated += 1
                e.rank += ESCALATED_WEIGHT
            else:
                e.kept += 1
                e.rank += KEPT_WEIGHT
        self._count("feedback_escalated" if escalated else "feedback_kept", len(example_ids))

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    # --- admin (CLI, tests) ---
    async def namespaces(self) -> list[str]:
        return sorted(ns for ns, space in self._ns.items() if space.entries)

    async def entries(self, namespace: str) -> list[Entry]:
        space = self._ns.get(namespace)
        return sorted(space.entries.values(), key=lambda e: e.id) if space else []

    async def put(self, entry: Entry) -> None:
        """Store an entry as is (import): no dedup; keeps its id and stats."""
        if entry.embedding is None:
            entry.embedding = await self._embed_one(entry.request_text, None)
            if entry.embedding is None:
                raise ValueError(f"cannot embed entry {entry.id!r}")
        entry.id = entry.id or self._ids.next(entry.created_at)
        space = self._space(entry.namespace, entry.embedding.shape[0])
        self._insert(space, entry)
        self._evict(space)

    async def remove(self, namespace: str, ids: Sequence[str]) -> int:
        space = self._ns.get(namespace)
        return sum(self._drop(space, id_, None) for id_ in ids) if space else 0

    async def clear(self, namespace: str) -> int:
        space = self._ns.pop(namespace, None)
        return len(space.entries) if space else 0

    def _insert(self, space: _MemNamespace, entry: Entry) -> None:
        entry.rank = initial_rank(space.floor, entry)
        space.entries[entry.id] = entry
        space.index.add(entry.id, entry.embedding)

    def _drop(self, space: _MemNamespace, id_: str, stat: str | None) -> bool:
        if space.entries.pop(id_, None) is None:
            return False
        space.index.remove(id_)
        if stat:
            self._count(stat)
        return True

    def _sweep_expired(self, space: _MemNamespace, now: float) -> None:
        if self.settings.ttl_s is None:
            return
        for e in [e for e in space.entries.values() if self._is_expired(e.created_at, now)]:
            self._drop(space, e.id, "expired")

    def _evict(self, space: _MemNamespace) -> None:
        over = len(space.entries) - self.settings.max_entries_per_namespace
        if over <= 0:
            return
        batch = over + self.settings.max_entries_per_namespace // 100  # amortise the O(n) scan
        order = sorted(space.entries.values(), key=lambda e: (e.rank, e.id))
        for e in order[:batch]:
            space.floor = max(space.floor, e.rank)
            self._drop(space, e.id, "evicted")


# ---------------------------------------------------------------------------- Redis store


@dataclass
class _RedisNamespace:
    index: VectorIndex | None = None
    created: dict[str, float] = field(default_factory=dict)
    last_stream_id: str = "0-0"
    is_stale: bool = False
    load_task: asyncio.Task | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_FEEDBACK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[4])
  redis.call('ZINCRBY', KEYS[2], ARGV[2] * ARGV[4], ARGV[3])
  return 1
end
return 0
"""

_FETCH_FIELDS = ("text", "answer", "model", "created", "uses", "kept", "escalated")


class RedisExampleStore(_StoreBase):
    """Examples in Redis, searched in process; safe to share between gateway replicas.

    Redis down or slow: lookups and admits return ``[]``/``False`` within the deadline, counted in
    ``stats``; after an error the store waits a short, growing back-off before trying again and then
    reloads its indexes in the background, so a restarted (empty) Redis is picked up by itself.
    """

    def __init__(self, redis_url: str, settings: ExampleCacheSettings, embed: Embed | None = None, *,
                 stream_maxlen: int | None = None, admit_timeout_s: float = 2.0,
                 max_backoff_s: float = 2.0) -> None:
        super().__init__(settings, embed)
        if not redis_url or not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {redis_url!r}")
        self.redis_url = redis_url
        self._stream_maxlen = stream_maxlen or 4 * settings.max_entries_per_namespace + 1000
        self._admit_timeout_s = admit_timeout_s
        self._max_backoff_s = max_backoff_s
        self._redis: Any = None
        self._ns: dict[str, _RedisNamespace] = {}
        self._down_until = 0.0
        self._backoff_s = 0.0
        self._probed = False
        self._tasks: set[asyncio.Task] = set()
        self._pending_uses: dict[str, dict[str, int]] = {}  # namespace → id → uses not yet in Redis
        self._uses_flush: asyncio.Task | None = None
        self.uses_flush_interval_s = 0.1

    # --- plumbing ---
    @property
    def _deadline_s(self) -> float:
        return self.settings.deadline_ms / 1000.0

    def _client(self) -> Any:
        if self._redis is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            timeout = max(self._deadline_s, 0.05)
            self._redis = Redis.from_url(
                self.redis_url, socket_timeout=max(timeout, self._admit_timeout_s),
                socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), decode_responses=False,
            )
        return self._redis

    def _key(self, namespace: str, *parts: str) -> str:
        return KEY_PREFIX + namespace + ":" + ":".join(parts)

    def _is_available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _on_error(self, e: BaseException) -> None:
        self._count("redis_errors")
        self._backoff_s = min(self._max_backoff_s, max(0.05, self._backoff_s * 2))
        self._down_until = time.monotonic() + self._backoff_s
        logger.warning("example cache: redis error (%s: %s); retrying in %.2fs", type(e).__name__, e,
                       self._backoff_s)
        for st in self._ns.values():  # Redis may come back empty or with ops we missed
            st.is_stale = True

    def _on_success(self) -> None:
        self._backoff_s = 0.0

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # whoever awaited it has counted it
            logger.debug("example cache: background task failed: %r", task.exception())

    async def _quietly(self, coro: Any) -> None:
        try:
            await coro
        except _REDIS_ERRORS as e:
            self._on_error(e)

    async def _probe(self, r: Any) -> None:
        """Detect server-side vector search (Redis Stack / Redis 8 query engine) once."""
        if self._probed:
            return
        self._probed = True
        with contextlib.suppress(Exception):
            info = await r.execute_command("COMMAND", "INFO", "FT.SEARCH")
            self.stats["server_vector_search"] = int(bool(info and info[0]))

    # --- sync ---
    async def _sync(self, namespace: str, dim: int) -> _RedisNamespace:
        st = self._ns.setdefault(namespace, _RedisNamespace())
        if st.index is None or st.index.dim != dim:
            if st.load_task is None or st.load_task.done():
                st.load_task = self._spawn(self._load(namespace, st, dim))
            await asyncio.shield(st.load_task)  # a timeout leaves the load running in the background
            return st
        if st.is_stale and (st.load_task is None or st.load_task.done()):
            st.load_task = self._spawn(self._load(namespace, st, dim))  # keep serving the old index
        async with st.lock:
            await self._catch_up(namespace, st)
        return st

    async def _load(self, namespace: str, st: _RedisNamespace, dim: int) -> None:
        r = self._client()
        await self._probe(r)
        last = await r.xrevrange(self._key(namespace, "log"), "+", "-", count=1)
        last_id = last[0][0].decode() if last else "0-0"
        ids = [i.decode() for i in await r.zrange(self._key(namespace, "time"), 0, -1)]
        index, created = VectorIndex(dim, capacity=len(ids) + 16), {}
        for start in range(0, len(ids), 1000):
            await self._fetch_vectors(namespace, ids[start : start + 1000], index, created)
        async with st.lock:
            st.index, st.created, st.last_stream_id, st.is_stale = index, created, last_id, False
            await self._catch_up(namespace, st)
        self._count("reloads")
        self._on_success()

    async def _fetch_vectors(self, namespace: str, ids: list[str], index: VectorIndex,
                             created: dict[str, float]) -> None:
        if not ids:
            return
        pipe = self._client().pipeline(transaction=False)
        for id_ in ids:
            pipe.hmget(self._key(namespace, "e", id_), "emb", "created")
        now = time.time()
        for id_, (emb, ts) in zip(ids, await pipe.execute(), strict=True):
            if emb is None and ts is None:
                continue  # expired or evicted meanwhile
            try:
                vec = np.frombuffer(emb, dtype=np.float16)
                if vec.shape[0] != index.dim or not np.all(np.isfinite(vec)):
                    raise ValueError(f"embedding has {vec.shape[0]} finite-checked dims, want {index.dim}")
                created_at = float(ts)
            except (TypeError, ValueError) as e:
                self._skip_corrupt(namespace, id_, e)
                continue
            if self._is_expired(created_at, now):
                continue
            index.add(id_, _unit(vec))
            created[id_] = created_at

    async def _catch_up(self, namespace: str, st: _RedisNamespace) -> None:
        """Replay the namespace's op stream since the last id seen (caller holds ``st.lock``)."""
        r = self._client()
        log_key = self._key(namespace, "log")
        while True:
            pipe = r.pipeline(transaction=False)
            pipe.xread({log_key: st.last_stream_id}, count=5000)
            pipe.exists(log_key)
            reply, exists = await pipe.execute()
            if not exists and st.last_stream_id != "0-0":
                st.is_stale = True  # the stream vanished: Redis restarted empty, or keys were flushed
                return
            ops = reply[0][1] if reply else []
            if not ops:
                return
            added: list[str] = []
            for stream_id, fields in ops:
                op, id_ = fields.get(b"op", b"").decode(), fields.get(b"id", b"").decode()
                if op == "add" and id_ not in st.index:
                    added.append(id_)
                elif op == "del":
                    st.index.remove(id_)
                    st.created.pop(id_, None)
                elif op == "clear":
                    st.index, st.created, added = VectorIndex(st.index.dim), {}, []
                st.last_stream_id = stream_id.decode()
            await self._fetch_vectors(namespace, added, st.index, st.created)
            if len(ops) < 5000:
                return

    def _skip_corrupt(self, namespace: str, id_: str, why: object) -> None:
        self._count("corrupt")
        logger.warning("example cache: skipping corrupt entry %s in namespace %r: %s", id_, namespace, why)

    # --- the protocol ---
    async def lookup(self, namespace: str, text: str, k: int | None = None, *,
                     embedding: np.ndarray | None = None) -> list[Example]:
        self._count("lookups")
        k = self.settings.top_k if k is None else k
        if k <= 0 or not text:
            return self._record_outcome([])
        q = await self._embed_one(text, embedding)
        if q is None:
            return self._record_outcome([])
        if not self._is_available():
            self._count("skipped_unavailable")
            return self._record_outcome([])
        try:
            found = await asyncio.wait_for(self._lookup(namespace, q, k), self._deadline_s)
        except TimeoutError:
            self._count("timeouts")
            return self._record_outcome([])
        except _REDIS_ERRORS as e:
            self._on_error(e)
            return self._record_outcome([])
        self._on_success()
        return self._record_outcome(found)

    async def _lookup(self, namespace: str, q: np.ndarray, k: int) -> list[Example]:
        st = await self._sync(namespace, q.shape[0])
        now = time.time()
        hits = [(id_, sim) for id_, sim in st.index.search(q, self._num_candidates(k), self.settings.min_similarity)
                if not self._is_expired(st.created.get(id_, now), now)]
        if not hits:
            return []
        pipe = self._client().pipeline(transaction=False)
        for id_, _ in hits:
            pipe.hmget(self._key(namespace, "e", id_), *_FETCH_FIELDS)
        found: list[Example] = []
        for (id_, sim), values in zip(hits, await pipe.execute(), strict=True):
            if all(v is None for v in values):
                st.index.remove(id_)  # expired or evicted by another replica
                st.created.pop(id_, None)
                continue
            try:
                text, answer, model = (v.decode() for v in values[:3])
                kept, escalated = int(values[5] or 0), int(values[6] or 0)
            except (AttributeError, UnicodeDecodeError, ValueError) as e:
                self._skip_corrupt(namespace, id_, e)
                continue
            found.append(Example(id_, text, answer, sim, model, utility(kept, escalated)))
        chosen = self._select(found, k)
        if chosen:  # uses reach Redis in one batch every uses_flush_interval_s, off the request path
            pending = self._pending_uses.setdefault(namespace, {})
            for ex in chosen:
                pending[ex.id] = pending.get(ex.id, 0) + 1
            if self._uses_flush is None or self._uses_flush.done():
                self._uses_flush = self._spawn(self._quietly(self._flush_uses(self.uses_flush_interval_s)))
        return chosen

    async def _flush_uses(self, delay_s: float = 0.0) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        pending, self._pending_uses = self._pending_uses, {}
        if not pending:
            return
        pipe = self._client().pipeline(transaction=False)
        for namespace, counts in pending.items():
            for id_, n in counts.items():
                pipe.eval(_FEEDBACK_LUA, 2, self._key(namespace, "e", id_), self._key(namespace, "rank"),
                          "uses", USE_WEIGHT, id_, n)
        await pipe.execute()

    async def _bump(self, namespace: str, ids: Sequence[str], stat: str, weight: float) -> None:
        r = self._client()
        pipe = r.pipeline(transaction=False)
        for id_ in ids:
            pipe.eval(_FEEDBACK_LUA, 2, self._key(namespace, "e", id_), self._key(namespace, "rank"),
                      stat, weight, id_, 1)
        await pipe.execute()

    async def admit(self, namespace: str, text: str, answer: str, model: str, finish_reason: str | None,
                    guard_ok: bool = True, *, embedding: np.ndarray | None = None) -> bool:
        refusal = self._admission_refusal(text, answer, finish_reason, guard_ok)
        if refusal:
            self._count(refusal)
            return False
        q = await self._embed_one(text, embedding)
        if q is None or not self._is_available():
            self._count("admit_failures")
            return False
        try:
            stored = await asyncio.wait_for(self._admit(namespace, text, answer, model, q), self._admit_timeout_s)
        except TimeoutError:
            self._count("timeouts")
            self._count("admit_failures")
            return False
        except _REDIS_ERRORS as e:
            self._on_error(e)
            self._count("admit_failures")
            return False
        self._on_success()
        return stored

    async def _admit(self, namespace: str, text: str, answer: str, model: str, q: np.ndarray) -> bool:
        st = await self._sync(namespace, q.shape[0])
        if st.index.search(q, 1, self.settings.dedup_similarity):
            self._count("rejected_duplicate")
            return False
        now = time.time()
        entry = Entry(self._ids.next(now), namespace, text, answer, model, now, embedding=q)
        await self._write(entry)
        st.index.add(entry.id, q)
        st.created[entry.id] = now
        self._count("admitted")
        await self._sweep_expired(namespace, st, now)
        evicted = await self._evict(namespace, st)
        return entry.id not in evicted  # the newcomer itself may be the lowest rank

    async def _write(self, entry: Entry) -> None:
        floor = float(await self._client().get(self._key(entry.namespace, "floor")) or 0.0)
        pipe = self._client().pipeline(transaction=True)
        self._queue_write(pipe, entry, floor)
        await pipe.execute()

    def _queue_write(self, pipe: Any, entry: Entry, floor: float) -> None:
        ns = entry.namespace
        key = self._key(ns, "e", entry.id)
        pipe.hset(key, mapping={
            "text": entry.request_text, "answer": entry.answer, "model": entry.model,
            "created": repr(entry.created_at), "emb": np.asarray(entry.embedding, np.float16).tobytes(),
            "uses": entry.uses, "kept": entry.kept, "escalated": entry.escalated,
        })
        if self.settings.ttl_s is not None:
            remaining = entry.created_at + self.settings.ttl_s - time.time()
            pipe.expire(key, max(1, math.ceil(remaining)))
        pipe.zadd(self._key(ns, "rank"), {entry.id: initial_rank(floor, entry)})
        pipe.zadd(self._key(ns, "time"), {entry.id: entry.created_at})
        pipe.xadd(self._key(ns, "log"), {"op": "add", "id": entry.id}, maxlen=self._stream_maxlen,
                  approximate=True)
        pipe.sadd(KEY_PREFIX + "namespaces", ns)

    async def _delete(self, namespace: str, ids: Sequence[str], st: _RedisNamespace | None) -> None:
        if not ids:
            return
        pipe = self._client().pipeline(transaction=True)
        for id_ in ids:
            pipe.delete(self._key(namespace, "e", id_))
            pipe.xadd(self._key(namespace, "log"), {"op": "del", "id": id_}, maxlen=self._stream_maxlen,
                      approximate=True)
        pipe.zrem(self._key(namespace, "rank"), *ids)
        pipe.zrem(self._key(namespace, "time"), *ids)
        await pipe.execute()
        if st is not None and st.index is not None:
            for id_ in ids:
                st.index.remove(id_)
                st.created.pop(id_, None)

    async def _sweep_expired(self, namespace: str, st: _RedisNamespace | None, now: float) -> None:
        if self.settings.ttl_s is None:
            return
        r = self._client()
        old = await r.zrangebyscore(self._key(namespace, "time"), "-inf", now - self.settings.ttl_s,
                                    start=0, num=500)
        ids = [i.decode() for i in old]
        await self._delete(namespace, ids, st)
        self._count("expired", len(ids))

    async def _evict(self, namespace: str, st: _RedisNamespace | None) -> list[str]:
        """Pop the lowest ranks over the cap (atomic: replicas never evict the same entry twice)."""
        r = self._client()
        over = await r.zcard(self._key(namespace, "rank")) - self.settings.max_entries_per_namespace
        if over <= 0:
            return []
        popped = await r.zpopmin(self._key(namespace, "rank"), over)
        if not popped:
            return []
        ids = [member.decode() for member, _ in popped]
        floor_key = self._key(namespace, "floor")
        floor = max(float(await r.get(floor_key) or 0.0), max(score for _, score in popped))
        await r.set(floor_key, repr(floor))
        await self._delete(namespace, ids, st)
        self._count("evicted", len(ids))
        return ids

    async def feedback(self, namespace: str, example_ids: Sequence[str], escalated: bool) -> None:
        if not example_ids:
            return
        self._count("feedback_escalated" if escalated else "feedback_kept", len(example_ids))
        if not self._is_available():
            self._count("skipped_unavailable")
            return
        stat, weight = ("escalated", ESCALATED_WEIGHT) if escalated else ("kept", KEPT_WEIGHT)
        try:
            await asyncio.wait_for(self._bump(namespace, example_ids, stat, weight), self._admit_timeout_s)
        except TimeoutError:
            self._count("timeouts")
        except _REDIS_ERRORS as e:
            self._on_error(e)

    async def health(self) -> bool:
        try:
            await asyncio.wait_for(self._client().ping(), max(self._deadline_s, 0.2))
        except (TimeoutError, *_REDIS_ERRORS):
            return False
        return True

    async def close(self) -> None:
        """Writes pending use counts (best effort, within the admit timeout), then stops everything."""
        if self._pending_uses and self._redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_uses(), self._admit_timeout_s)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    # --- admin (CLI, tests, start-up): these raise on Redis errors ---
    async def preload(self, namespace: str, dim: int) -> int:
        """Build (or refresh) a namespace's in-process index now, without a deadline; returns its size."""
        st = await self._sync(namespace, dim)
        return len(st.index)

    async def namespaces(self) -> list[str]:
        """Namespaces that hold at least one entry."""
        r = self._client()
        names = sorted(n.decode() for n in await r.smembers(KEY_PREFIX + "namespaces"))
        pipe = r.pipeline(transaction=False)
        for ns in names:
            pipe.zcard(self._key(ns, "time"))
        return [ns for ns, n in zip(names, await pipe.execute(), strict=True) if n]

    async def entries(self, namespace: str) -> list[Entry]:
        """Every live entry of a namespace, oldest first; corrupt ones are skipped with a log line."""
        r = self._client()
        ids = [i.decode() for i in await r.zrange(self._key(namespace, "time"), 0, -1)]
        out: list[Entry] = []
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            pipe = r.pipeline(transaction=False)
            for id_ in chunk:
                pipe.hmget(self._key(namespace, "e", id_), *_FETCH_FIELDS, "emb")
            for id_, v in zip(chunk, await pipe.execute(), strict=True):
                if all(x is None for x in v):
                    continue
                try:
                    emb = np.frombuffer(v[7], dtype=np.float16).astype(np.float32) if v[7] else None
                    out.append(Entry(id_, namespace, v[0].decode(), v[1].decode(), v[2].decode(), float(v[3]),
                                     int(v[4] or 0), int(v[5] or 0), int(v[6] or 0), embedding=emb))
                except (AttributeError, TypeError, UnicodeDecodeError, ValueError) as e:
                    self._skip_corrupt(namespace, id_, e)
        return out

    async def put(self, entry: Entry) -> None:
        """Store an entry as is (import): no dedup; keeps its id and stats. Evicts over the cap."""
        if entry.embedding is None:
            entry.embedding = await self._embed_one(entry.request_text, None)
            if entry.embedding is None:
                raise ValueError(f"cannot embed entry {entry.id!r}")
        entry.id = entry.id or self._ids.next(entry.created_at)
        if self._is_expired(entry.created_at, time.time()):
            return
        await self._write(entry)
        await self._evict(entry.namespace, self._ns.get(entry.namespace))

    async def put_many(self, entries: Sequence[Entry], batch_size: int = 1000) -> int:
        """Bulk ``put`` (import, benchmarks): entries need embeddings; pipelined; evicts once per namespace."""
        r = self._client()
        now, stored = time.time(), 0
        for start in range(0, len(entries), batch_size):
            pipe = r.pipeline(transaction=False)
            for entry in entries[start : start + batch_size]:
                if entry.embedding is None:
                    raise ValueError(f"entry {entry.id!r} has no embedding")
                if self._is_expired(entry.created_at, now):
                    continue
                entry.id = entry.id or self._ids.next(entry.created_at)
                self._queue_write(pipe, entry, 0.0)
                stored += 1
            await pipe.execute()
        for ns in sorted({e.namespace for e in entries}):
            await self._evict(ns, self._ns.get(ns))
        return stored

    async def remove(self, namespace: str, ids: Sequence[str]) -> int:
        r = self._client()
        present = [i for i in ids if await r.exists(self._key(namespace, "e", i))]
        await self._delete(namespace, present, self._ns.get(namespace))
        return len(present)

    async def clear(self, namespace: str) -> int:
        r = self._client()
        ids = [i.decode() for i in await r.zrange(self._key(namespace, "time"), 0, -1)]
        pipe = r.pipeline(transaction=True)
        for start in range(0, len(ids), 1000):
            pipe.delete(*[self._key(namespace, "e", i) for i in ids[start : start + 1000]])
        pipe.delete(self._key(namespace, "rank"), self._key(namespace, "time"), self._key(namespace, "floor"))
        pipe.xadd(self._key(namespace, "log"), {"op": "clear", "id": ""}, maxlen=self._stream_maxlen,
                  approximate=True)
        pipe.srem(KEY_PREFIX + "namespaces", namespace)
        await pipe.execute()
        return len(ids)


def build_example_store(settings: Settings, embed: Embed | None = None) -> ExampleStore | None:
    """The store the gateway should use, or None when the example cache is off (or ``top_k == 0``)."""
    cfg = settings.example_cache
    if not cfg.enabled or cfg.top_k == 0:
        return None
    if cfg.backend == "redis":
        url = cfg.redis_url or settings.redis_url
        if url is None:
            raise ValueError("example_cache.backend = 'redis' needs redis_url (or example_cache.redis_url)")
        return RedisExampleStore(url, cfg, embed)
    return InMemoryExampleStore(cfg, embed)
