"""Agent sessions: who a request belongs to, and what a session keeps between its turns.

Identity (``session_of``): the ``x-session-id`` header, else the body's ``switchyard.session_id``, else
OpenAI's ``prompt_cache_key``, else ``user`` — the first that is set. A multi-agent job's program is the
``x-program-id`` header, else the session. Sessions are scoped by the API key's namespace.

What a session keeps (``SessionState``, for ``sessions.ttl_s`` after its last write):
  * the tier: once a turn routed with ``model: "auto"`` was answered by the LLM (routed there or escalated),
    the session's later ``auto`` turns go to the LLM too (route ``session``) — for the TTL, or for the next
    ``sessions.hold_turns`` turns when set. The tier only moves up;
  * the examples: the example-cache examples its first SLM turn was given, reused on every later SLM turn,
    so turn k+1's prompt extends turn k's and the engine's prefix cache hits.

In Redis when ``redis_url`` is set (every gateway replica sees the same session behind a load balancer), in
process otherwise. A Redis failure degrades to "no session state" for that turn (logged), never an error:
the session is an optimisation of routing and caching, not of correctness.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger("switchyard.sessions")

MAX_SESSION_ID_CHARS = 256


@dataclass(frozen=True)
class SessionKey:
    namespace: str
    session_id: str

    @property
    def redis_key(self) -> str:
        digest = hashlib.sha256(f"{self.namespace}\0{self.session_id}".encode()).hexdigest()[:32]
        return f"sy:session:{digest}"


@dataclass
class SessionState:
    """``tier`` "llm" once held; ``turns_left`` -1 = for the TTL, k >= 0 = that many more ``auto`` turns."""

    tier: str = ""
    turns_left: int = -1
    examples: list[dict[str, Any]] = field(default_factory=list)  # example messages, as first given
    example_ids: list[str] = field(default_factory=list)  # their cache ids (feedback)

    @property
    def holds_llm(self) -> bool:
        return self.tier == "llm" and self.turns_left != 0


def session_of(headers: Any, switchyard_session: str | None, prompt_cache_key: str | None,
               user: str | None) -> tuple[str | None, str | None]:
    """(session id, program id) of a request, by the precedence in the module doc; ids longer than
    ``MAX_SESSION_ID_CHARS`` are cut (they only ever serve as keys)."""
    session = headers.get("x-session-id") or switchyard_session or prompt_cache_key or user or None
    program = headers.get("x-program-id") or session
    if session is not None:
        session = session[:MAX_SESSION_ID_CHARS]
    if program is not None:
        program = program[:MAX_SESSION_ID_CHARS]
    return session, program


class SessionStore(Protocol):
    async def get(self, key: SessionKey) -> SessionState | None: ...

    async def put(self, key: SessionKey, state: SessionState) -> None: ...

    async def close(self) -> None: ...


class MemorySessionStore:
    """In-process: an LRU of at most ``max_entries`` sessions, each kept ``ttl_s`` after its last write."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Any = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[SessionKey, tuple[float, str]] = OrderedDict()

    async def get(self, key: SessionKey) -> SessionState | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, raw = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        return SessionState(**json.loads(raw))

    async def put(self, key: SessionKey, state: SessionState) -> None:
        self._entries[key] = (self._clock() + self.ttl_s, json.dumps(asdict(state)))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        return None


class RedisSessionStore:
    """One Redis string per session (``sy:session:{hash}``, JSON, with the TTL); shared by gateway replicas."""

    def __init__(self, redis_url: str, ttl_s: float, timeout_s: float = 0.5) -> None:
        import redis.asyncio as aioredis

        self.ttl_s = ttl_s
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def get(self, key: SessionKey) -> SessionState | None:
        try:
            raw = await self._redis.get(key.redis_key)
        except Exception as e:  # noqa: BLE001 - any Redis failure: this turn goes without session state
            log.warning("session store: Redis unavailable (%s)", type(e).__name__)
            return None
        return None if raw is None else SessionState(**json.loads(raw))

    async def put(self, key: SessionKey, state: SessionState) -> None:
        try:
            await self._redis.set(key.redis_key, json.dumps(asdict(state)), ex=max(1, int(self.ttl_s)))
        except Exception as e:  # noqa: BLE001
            log.warning("session store: could not store a session (%s)", type(e).__name__)

    async def close(self) -> None:
        await self._redis.aclose()


def build_session_store(settings: Any) -> SessionStore:
    """Redis when ``redis_url`` is set, else in process."""
    cfg = settings.sessions
    if settings.redis_url:
        return RedisSessionStore(settings.redis_url, cfg.ttl_s)
    return MemorySessionStore(cfg.ttl_s, cfg.max_entries)
