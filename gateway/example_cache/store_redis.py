"""``RedisExampleStore``: examples in Redis, searched in process; shared by all gateway replicas.

Redis layout (prefix ``switchyard:ex:``; plain Redis 7, no modules):
  ``{ns}:e:{id}`` hash (text, answer, model, created, emb = float16 bytes, uses, kept, escalated; EXPIRE ttl),
  ``{ns}:rank`` zset id -> retention score, ``{ns}:time`` zset id -> created, ``{ns}:floor`` LFU-DA floor,
  ``{ns}:log`` stream of ``add``/``del``/``clear`` ops (capped), ``namespaces`` set. Each gateway replica
  keeps an in-process ``VectorIndex`` per namespace (exact search) and replays the stream before every
  search, so replicas stay in sync. A replica that lags more than ``stream_maxlen`` ops (the stream is
  capped) or finds the stream recreated rebuilds that namespace's index from the hashes (``resyncs`` stat,
  one warning line); a vanished stream (Redis restarted empty) triggers a background reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from redis.exceptions import RedisError, ResponseError

import gateway.example_cache.policy as policy
from gateway.example_cache.index import VectorIndex, unit_vector
from gateway.example_cache.server_index import ServerHit, ServerIndex, has_server_search, namespace_tag
from gateway.example_cache.store import StoreBase
from gateway.example_cache.types import Embed, Entry, Example, Examples

if TYPE_CHECKING:
    from gateway.settings import ExampleCacheSettings

logger = logging.getLogger("switchyard.example_cache")

KEY_PREFIX = "switchyard:ex:"
_REDIS_ERRORS = (RedisError, OSError, ConnectionError)


@dataclass
class _RedisNamespace:
    """One replica's view of a namespace: its index, and how far into the op stream it has read."""

    index: VectorIndex | None = None
    created: dict[str, float] = field(default_factory=dict)
    last_stream_id: str = "0-0"
    num_ops_seen: int = 0  # the stream's ``entries-added`` count up to and including ``last_stream_id``
    is_stale: bool = False
    load_task: asyncio.Task | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _id_tuple(stream_id: bytes | str) -> tuple[int, int]:
    """A stream id ``ms-seq`` as a tuple that orders like the stream."""
    ms, _, seq = (stream_id.decode() if isinstance(stream_id, bytes) else stream_id).partition("-")
    return int(ms), int(seq or 0)


_FEEDBACK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[4])
  redis.call('ZINCRBY', KEYS[2], ARGV[2] * ARGV[4], ARGV[3])
  return 1
end
return 0
"""

_FETCH_FIELDS = ("text", "answer", "model", "created", "uses", "kept", "escalated")


class RedisExampleStore(StoreBase):
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
        self._server: ServerIndex | None = None  # set by start() when server-side search is used
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
        """Detect server-side vector search (Redis Stack / Redis 8 query engine) once, for ``stats``."""
        if self._probed:
            return
        self._probed = True
        with contextlib.suppress(Exception):
            self.stats["server_vector_search"] = int(await has_server_search(r))

    async def start(self) -> None:
        """Start-up check of ``settings.server_search``: ``off`` asks nothing; ``auto`` searches in Redis
        when the server has FT.SEARCH (Redis 8 / Redis Stack), else in process; ``on`` raises ConfigError
        when it is missing or Redis cannot be asked. Never raises for ``off``/``auto``."""
        mode = self.settings.server_search
        if mode == "off":
            return
        from gateway.settings import ConfigError

        try:
            found = await asyncio.wait_for(has_server_search(self._client()), max(self._admit_timeout_s, 1.0))
        except (TimeoutError, *_REDIS_ERRORS) as e:
            if mode == "on":
                raise ConfigError(f"example_cache.server_search = 'on': cannot ask Redis whether it has vector "
                                  f"search ({type(e).__name__}: {e})") from None
            logger.warning("example cache: cannot detect server-side vector search (%s: %s); searching in "
                           "process", type(e).__name__, e)
            found = False
        self._probed = True
        self.stats["server_vector_search"] = int(found)
        if not found and mode == "on":
            raise ConfigError("example_cache.server_search = 'on' but this Redis server has no vector search "
                              "(no FT.* commands: it needs Redis 8 or Redis Stack); use 'auto' or 'off'")
        if found:
            self._server = ServerIndex(KEY_PREFIX)
        logger.info("example cache: vector search %s", "in Redis (FT.SEARCH)" if found else "in process")

    async def _server_search(self, namespace: str, q: np.ndarray, num: int,
                             min_similarity: float) -> list[ServerHit] | None:
        """KNN inside Redis, or None when it is off or just failed (then the in-process index takes over for
        good: ``server_search_fallbacks`` stat, one warning). Connection errors propagate as usual."""
        if self._server is None:
            return None
        try:
            await self._server.ensure(self._client(), q.shape[0])
            return await self._server.search(self._client(), namespace, q, num, min_similarity)
        except (ResponseError, AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            self._server = None
            self._count("server_search_fallbacks")
            logger.warning("example cache: server-side vector search failed (%s: %s); using the in-process "
                           "index from now on", type(e).__name__, e)
            return None

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
            is_complete = await self._catch_up(namespace, st)
        if not is_complete:  # ops were trimmed before this replica read them: rebuild from the hashes
            if st.load_task is None or st.load_task.done():
                self._count("resyncs")
                logger.warning("example cache: namespace %r lost ops from its op stream (trimmed past id %s, "
                               "or the stream was recreated); full resync from Redis", namespace, st.last_stream_id)
                st.load_task = self._spawn(self._load(namespace, st, dim))
            await asyncio.shield(st.load_task)  # concurrent lookups wait for the same resync
        return st

    async def _load(self, namespace: str, st: _RedisNamespace, dim: int) -> None:
        r = self._client()
        await self._probe(r)
        info = await self._stream_info(namespace)  # first: ops after it are replayed by the catch-up below
        last_id = info["last-generated-id"].decode() if info else "0-0"
        num_ops = int(info.get("entries-added") or 0) if info else 0
        ids = [i.decode() for i in await r.zrange(self._key(namespace, "time"), 0, -1)]
        index, created = VectorIndex(dim, capacity=len(ids) + 16), {}
        for start in range(0, len(ids), 1000):
            await self._fetch_vectors(namespace, ids[start : start + 1000], index, created)
        async with st.lock:
            st.index, st.created, st.last_stream_id, st.is_stale = index, created, last_id, False
            st.num_ops_seen = num_ops
            if not await self._catch_up(namespace, st):
                st.is_stale = True  # trimmed while loading (a very busy stream): load again next time
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
            index.add(id_, unit_vector(vec))
            created[id_] = created_at

    async def _catch_up(self, namespace: str, st: _RedisNamespace) -> bool:
        """Replay the namespace's op stream since the last id seen (caller holds ``st.lock``).

        Returns False, changing nothing, when ops this replica never read are gone: the stream was trimmed
        past ``last_stream_id`` (a replica that lagged more than ``stream_maxlen`` ops) or was recreated.
        The index must then be rebuilt from the hashes. True otherwise (also when the stream vanished:
        that marks the namespace stale, for a reload in the background)."""
        r = self._client()
        log_key = self._key(namespace, "log")
        is_first_read = True
        while True:
            pipe = r.pipeline(transaction=False)
            pipe.xread({log_key: st.last_stream_id}, count=5000)
            pipe.xrange(log_key, "-", "+", count=1)
            reply, first = await pipe.execute()
            if not first:
                if st.last_stream_id != "0-0":
                    st.is_stale = True  # the stream vanished: Redis restarted empty, or keys were flushed
                return True
            if (is_first_read and _id_tuple(first[0][0]) > _id_tuple(st.last_stream_id)
                    and await self._missed_ops(namespace, st)):
                return False
            is_first_read = False
            ops = reply[0][1] if reply else []
            if not ops:
                return True
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
                st.num_ops_seen += 1
            await self._fetch_vectors(namespace, added, st.index, st.created)
            if len(ops) < 5000:
                return True

    async def _missed_ops(self, namespace: str, st: _RedisNamespace) -> bool:
        """Whether the stream dropped ops after ``st.last_stream_id`` (its first entry is newer than that).

        Exact on Redis >= 7 (``entries-added``): ops trimmed = entries added - length; more than this replica
        has seen means some were never read, fewer means the stream is not the one it read (recreated).
        Without the counter (Redis 6), any gap counts as missed."""
        info = await self._stream_info(namespace)
        if not info or info.get("entries-added") is None:
            return True
        num_trimmed = int(info["entries-added"]) - int(info["length"])
        return num_trimmed != st.num_ops_seen

    async def _stream_info(self, namespace: str) -> dict[str, Any] | None:
        """XINFO STREAM of the namespace's op log, or None when it does not exist."""
        try:
            return await self._client().xinfo_stream(self._key(namespace, "log"))
        except ResponseError as e:
            if "no such key" in str(e).lower():
                return None
            raise

    def _skip_corrupt(self, namespace: str, id_: str, why: object) -> None:
        self._count("corrupt")
        logger.warning("example cache: skipping corrupt entry %s in namespace %r: %s", id_, namespace, why)

    # --- the protocol ---
    async def lookup(self, namespace: str, text: str, k: int | None = None, *,
                     embedding: np.ndarray | None = None) -> Examples:
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

    async def _lookup(self, namespace: str, q: np.ndarray, k: int) -> Examples:
        now = time.time()
        server_hits = await self._server_search(namespace, q, policy.num_candidates(k), self.settings.min_similarity)
        if server_hits is not None:
            found = [Example(h.id, h.text, h.answer, h.similarity, h.model, policy.utility(h.kept, h.escalated))
                     for h in server_hits if not self._is_expired(h.created_at, now)]
            return self._note_uses(namespace, self._select(found, k))
        st = await self._sync(namespace, q.shape[0])
        hits = [(id_, sim) for id_, sim in st.index.search(q, policy.num_candidates(k), self.settings.min_similarity)
                if not self._is_expired(st.created.get(id_, now), now)]
        if not hits:
            return []
        pipe = self._client().pipeline(transaction=False)
        for id_, _ in hits:
            pipe.hmget(self._key(namespace, "e", id_), *_FETCH_FIELDS)
        found: Examples = []
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
            found.append(Example(id_, text, answer, sim, model, policy.utility(kept, escalated)))
        return self._note_uses(namespace, self._select(found, k))

    def _note_uses(self, namespace: str, chosen: Examples) -> Examples:
        if chosen:  # uses reach Redis in one batch every uses_flush_interval_s, off the request path
            pending = self._pending_uses.setdefault(namespace, {})
            for ex in chosen:
                pending[ex.id] = pending.get(ex.id, 0) + 1
            if self._uses_flush is None or self._uses_flush.done():
                self._uses_flush = self._spawn(self._quietly(self._flush_after(self.uses_flush_interval_s)))
        return chosen

    async def _flush_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.flush()

    async def flush(self) -> None:
        """Write the use counts batched since the last flush to Redis now (lookups otherwise write them
        every ``uses_flush_interval_s``, and ``close`` writes the rest). Raises on Redis errors."""
        pending, self._pending_uses = self._pending_uses, {}
        if not pending:
            return
        pipe = self._client().pipeline(transaction=False)
        for namespace, counts in pending.items():
            for id_, n in counts.items():
                pipe.eval(_FEEDBACK_LUA, 2, self._key(namespace, "e", id_), self._key(namespace, "rank"),
                          "uses", policy.USE_WEIGHT, id_, n)
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
        q = await self._admission_vector(text, answer, finish_reason, guard_ok, embedding)
        if q is None:
            return False
        if not self._is_available():
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
        st: _RedisNamespace | None = None
        duplicates: list[Any] | None = await self._server_search(namespace, q, 1, self.settings.dedup_similarity)
        if duplicates is None:  # no server-side search: the in-process index
            st = await self._sync(namespace, q.shape[0])
            duplicates = st.index.search(q, 1, self.settings.dedup_similarity)
        if duplicates:
            self._count("rejected_duplicate")
            return False
        now = time.time()
        entry = Entry(self._ids.next(now), namespace, text, answer, model, now, embedding=q)
        await self._write(entry)
        if st is not None:
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
            "uses": entry.uses, "kept": entry.kept, "escalated": entry.escalated, "ns": namespace_tag(ns),
        })
        if self.settings.ttl_s is not None:
            remaining = entry.created_at + self.settings.ttl_s - time.time()
            pipe.expire(key, max(1, math.ceil(remaining)))
        pipe.zadd(self._key(ns, "rank"), {entry.id: policy.initial_rank(floor, entry)})
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
        stat, weight = ("escalated", policy.ESCALATED_WEIGHT) if escalated else ("kept", policy.KEPT_WEIGHT)
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
                await asyncio.wait_for(self.flush(), self._admit_timeout_s)
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

    async def _complete_import(self, entry: Entry) -> None:
        """Fill in an imported entry's embedding and id (ValueError when it cannot be embedded)."""
        if entry.embedding is None:
            entry.embedding = await self._embed_one(entry.request_text, None)
            if entry.embedding is None:
                raise ValueError(f"cannot embed entry {entry.id!r}")
        entry.id = entry.id or self._ids.next(entry.created_at)

    async def put(self, entry: Entry) -> None:
        """Store an entry as is (import): no dedup; keeps its id and stats. Evicts over the cap."""
        await self._complete_import(entry)
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
