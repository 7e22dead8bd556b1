"""Admission: who is calling, may they use this model, are they within their rate limits.

* API keys are configured only as sha256 digests (``switchyard keys hash KEY``); the presented key is
  hashed and compared with ``hmac.compare_digest`` against every configured digest (no early exit).
  With no keys configured the gateway is open (``create_app`` logs a warning at start-up).
* Rate limits are per key and per minute (fixed windows): requests are counted on admission, tokens
  (prompt + completion, from the response's usage) after the response. A key whose window already holds
  ``tokens_per_minute`` tokens is refused until the window ends. Counters live in Redis when
  ``redis_url`` is set (shared by gateway replicas; a Redis failure fails *open* and is counted), in
  process otherwise.
* The model allow list applies to the ``model`` the caller names (``auto`` must be listed to use routing).
* Body size is checked by ``BodyLimit`` (an ASGI middleware) before the body is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import AuthenticationFailed, PayloadTooLarge, PermissionDenied, RateLimited
from gateway.settings import ApiKey, Settings

log = logging.getLogger("switchyard.admission")

OPEN_NAMESPACE = "default"


@dataclass(frozen=True)
class Admission:
    """The caller, as admitted. ``key_name`` None = the gateway is open (no keys configured)."""

    key_name: str | None
    namespace: str  # example-cache namespace
    guard_exempt: bool = False
    tokens_per_minute: int | None = None


class RateLimiter(Protocol):
    async def hit(self, key: str, *, max_requests: int | None, max_tokens: int | None) -> str | None:
        """Count one request; return why it is over a limit ("requests" | "tokens") or None if admitted."""

    async def add_tokens(self, key: str, num_tokens: int) -> None: ...

    async def close(self) -> None: ...


def _window(now: float) -> int:
    return int(now // 60)


class InProcessRateLimiter:
    """Fixed one-minute windows in a dict; only this process's traffic counts."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}

    def _gc(self, window: int) -> None:
        if len(self._counts) > 10_000:
            self._counts = {k: v for k, v in self._counts.items() if k[2] >= window}

    async def hit(self, key: str, *, max_requests: int | None, max_tokens: int | None) -> str | None:
        w = _window(time.time())
        self._gc(w)
        if max_tokens is not None and self._counts.get((key, "tok", w), 0) >= max_tokens:
            return "tokens"
        n = self._counts.get((key, "req", w), 0) + 1
        self._counts[(key, "req", w)] = n
        if max_requests is not None and n > max_requests:
            return "requests"
        return None

    async def add_tokens(self, key: str, num_tokens: int) -> None:
        k = (key, "tok", _window(time.time()))
        self._counts[k] = self._counts.get(k, 0) + num_tokens

    async def close(self) -> None:
        return None


class RedisRateLimiter:
    """Fixed one-minute windows as Redis counters (``INCR`` + ``EXPIRE``), shared by gateway replicas.

    Redis down or slow (> ``timeout_s``, default 100 ms) → the request is admitted and ``num_failures`` grows.
    """

    def __init__(self, redis_url: str, timeout_s: float = 0.1) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                              retry_on_timeout=False)
        self.num_failures = 0

    async def hit(self, key: str, *, max_requests: int | None, max_tokens: int | None) -> str | None:
        w = _window(time.time())
        req_key, tok_key = f"sy:rl:{key}:req:{w}", f"sy:rl:{key}:tok:{w}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(req_key)
                pipe.expire(req_key, 120)
                pipe.get(tok_key)
                n, _, tokens = await pipe.execute()
        except Exception as e:  # noqa: BLE001 - any Redis failure fails open
            self.num_failures += 1
            log.warning("rate limiter: Redis unavailable (%s); admitting", type(e).__name__)
            return None
        if max_tokens is not None and int(tokens or 0) >= max_tokens:
            return "tokens"
        if max_requests is not None and int(n) > max_requests:
            return "requests"
        return None

    async def add_tokens(self, key: str, num_tokens: int) -> None:
        tok_key = f"sy:rl:{key}:tok:{_window(time.time())}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incrby(tok_key, num_tokens)
                pipe.expire(tok_key, 120)
                await pipe.execute()
        except Exception:  # noqa: BLE001
            self.num_failures += 1

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:  # noqa: BLE001
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def bearer_token(authorization: str | None, api_key_header: str | None = None) -> str | None:
    """The key from ``Authorization: Bearer KEY`` (or ``api-key: KEY``); None when absent."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if api_key_header:
        return api_key_header.strip() or None
    return None


class Admitter:
    """Turns request credentials + requested model into an ``Admission`` or raises 401/403/429."""

    def __init__(self, settings: Settings, limiter: RateLimiter) -> None:
        self.keys: list[ApiKey] = list(settings.api_keys)
        self.limiter = limiter
        self.num_rate_limited = 0

    @property
    def is_open(self) -> bool:
        return not self.keys

    def _find_key(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).hexdigest().encode()
        found = None
        for key in self.keys:  # compare with every key: timing does not reveal which one matched
            if hmac.compare_digest(digest, key.sha256.encode()) and found is None:
                found = key
        return found

    def _authenticate(self, presented_key: str | None) -> ApiKey:
        """The configured key matching ``presented_key``; raises 401 when it is missing or wrong."""
        if presented_key is None:
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.",
                                       code="missing_api_key")
        key = self._find_key(presented_key)
        if key is None:
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        return key

    async def admit(self, presented_key: str | None, model: str) -> Admission:
        if self.is_open:
            return Admission(key_name=None, namespace=OPEN_NAMESPACE)
        key = self._authenticate(presented_key)
        if key.models is not None and model not in key.models:
            raise PermissionDenied(f"API key {key.name!r} may not use model {model!r}; allowed: {key.models}",
                                   code="model_not_allowed", param="model")
        if key.requests_per_minute is not None or key.tokens_per_minute is not None:
            over = await self.limiter.hit(key.name, max_requests=key.requests_per_minute,
                                          max_tokens=key.tokens_per_minute)
            if over is not None:
                self.num_rate_limited += 1
                retry = str(max(1, 60 - int(time.time() % 60)))
                limit = key.requests_per_minute if over == "requests" else key.tokens_per_minute
                raise RateLimited(f"Rate limit reached for key {key.name!r}: {limit} {over} per minute.",
                                  code=f"rate_limit_{over}", headers={"retry-after": retry})
        return Admission(key_name=key.name, namespace=key.namespace or key.name,
                         guard_exempt=key.guard_exempt, tokens_per_minute=key.tokens_per_minute)

    async def allowed_models(self, presented_key: str | None) -> list[str] | None:
        """The aliases this caller may use (None = all); raises 401 like ``admit``."""
        if self.is_open:
            return None
        return self._authenticate(presented_key).models

    async def record_tokens(self, admission: Admission, num_tokens: int) -> None:
        if admission.key_name is not None and admission.tokens_per_minute is not None and num_tokens > 0:
            await self.limiter.add_tokens(admission.key_name, num_tokens)


class BodyLimit:
    """ASGI middleware: a request body over ``max_body_bytes`` gets 413 before anything parses it.

    Also stamps ``scope["state"]["t_start"]`` (perf_counter) for the overhead measurement.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["t_start"] = time.perf_counter()
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_too_large(send, limit)
                    return
        received = 0
        responded = False

        async def limited_receive() -> dict:
            nonlocal received, responded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    responded = True
                    await _send_too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not responded:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _send_too_large(send: Any, limit: int) -> None:
    body = PayloadTooLarge(f"Request body is larger than {limit} bytes (limits.max_body_bytes).",
                           code="request_too_large").body_bytes()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
