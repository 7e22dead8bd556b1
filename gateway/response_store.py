"""Stored conversations of the Responses API: ``previous_response_id`` → the chat messages so far.

A response created with ``store`` (the default) keeps its conversation — the stored history it continued,
its input and its output as chat messages — under its id for ``responses.ttl_s``. A later request naming it
as ``previous_response_id`` continues that conversation (``instructions`` are not carried over, as in
OpenAI's API). In Redis when ``redis_url`` is set, so every gateway replica sees it; in process otherwise
(bounded by ``responses.max_entries``, oldest first out). A Redis failure is a 503 for the request that
needs the stored conversation, never a silent loss of context.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any, Protocol

log = logging.getLogger("switchyard.responses")


class ResponseStore(Protocol):
    async def get(self, response_id: str) -> list[dict[str, Any]] | None:
        """The stored conversation, or None when unknown or expired."""

    async def put(self, response_id: str, messages: list[dict[str, Any]]) -> None: ...

    async def close(self) -> None: ...


class MemoryResponseStore:
    """In-process: an LRU of at most ``max_entries`` conversations, each kept ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Any = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()

    async def get(self, response_id: str) -> list[dict[str, Any]] | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        expires, messages = entry
        if self._clock() >= expires:
            del self._entries[response_id]
            return None
        return json.loads(json.dumps(messages))  # a copy: callers may extend it

    async def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        self._entries[response_id] = (self._clock() + self.ttl_s, messages)
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        return None


class RedisResponseStore:
    """One Redis string per response (``sy:resp:{id}``, JSON, with the TTL); shared by gateway replicas."""

    def __init__(self, redis_url: str, ttl_s: float, timeout_s: float = 1.0) -> None:
        import redis.asyncio as aioredis

        self.ttl_s = ttl_s
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def get(self, response_id: str) -> list[dict[str, Any]] | None:
        from gateway.errors import ServiceUnavailable

        try:
            raw = await self._redis.get(f"sy:resp:{response_id}")
        except Exception as e:  # noqa: BLE001 - any Redis failure
            log.warning("response store: Redis unavailable (%s)", type(e).__name__)
            raise ServiceUnavailable("The stored conversation cannot be read right now (Redis unavailable).",
                                     code="response_store_unavailable") from None
        return None if raw is None else json.loads(raw)

    async def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        try:
            await self._redis.set(f"sy:resp:{response_id}", json.dumps(messages), ex=max(1, int(self.ttl_s)))
        except Exception as e:  # noqa: BLE001 - the answer is already made: log, the next turn gets a 404
            log.warning("response store: could not store %s (%s)", response_id, type(e).__name__)

    async def close(self) -> None:
        await self._redis.aclose()


def build_response_store(settings: Any) -> ResponseStore:
    """Redis when ``redis_url`` is set, else in process."""
    cfg = settings.responses
    if settings.redis_url:
        return RedisResponseStore(settings.redis_url, cfg.ttl_s)
    return MemoryResponseStore(cfg.ttl_s, cfg.max_entries)
