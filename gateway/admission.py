"""Admission: who is calling, may they use this model, are they within their rate limits.

* API keys are configured only as sha256 digests (``switchyard keys hash KEY``); the presented key is
  hashed and compared with ``hmac.compare_digest`` against every configured digest (no early exit).
  With no keys configured the gateway is open (``create_app`` logs a warning at start-up).
* Rate limits are per key over a sliding minute (``SlidingWindow``: the sliding-window counter that
  Cloudflare and most gateways use — the current minute's count plus the previous minute's, weighted by
  how much of it still overlaps the last 60 s, so a key cannot burst 2x its limit across a minute
  boundary the way fixed windows allow). Requests are counted on admission (refused ones are not
  counted), tokens (prompt + completion, from the response's usage) after the response; a key whose last
  minute already holds ``tokens_per_minute`` tokens is refused until enough of them slide out, and the
  429 carries ``retry-after`` for that moment. Counters live in Redis when ``redis_url`` is set (one Lua
  script per admission: check and count atomically, shared by gateway replicas; a Redis failure fails
  *open* and is counted), in process otherwise.
* The model allow list applies to the pool the caller's ``model`` resolves to (a pool's name or the model it
  serves, listed either way; ``auto`` must be listed to use routing).
* The key is checked from the headers before the body is read, and the body's size and read time are
  bounded, by ``gateway.edge.Edge`` (an ASGI middleware); ``admit`` checks the key again (cheap).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import AuthenticationFailed, PermissionDenied, RateLimited
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
    max_budget_usd: float | None = None
    budget_window: str = "1d"


@dataclass(frozen=True)
class LimitCheck:
    """A limiter's answer: ``over`` is None (admitted and counted) or "requests" | "tokens" (refused,
    not counted), with ``retry_after_s`` until the sliding minute would admit the request."""

    over: str | None = None
    retry_after_s: int = 0


class RateLimiter(Protocol):
    async def hit(self, key: str, *, max_requests: int | None, max_tokens: int | None) -> LimitCheck:
        """Admit and count one request, or say which limit it is over."""

    async def add_tokens(self, key: str, num_tokens: int) -> None: ...

    async def close(self) -> None: ...


WINDOW_S = 60


def _window(now: float) -> int:
    return int(now // WINDOW_S)


class SlidingWindow:
    """The sliding-window counter: ``estimate = previous_minute * w + current_minute`` with ``w`` the share
    of the previous minute still inside the last 60 s. Exact when traffic within a minute is even."""

    @staticmethod
    def weight(now: float) -> float:
        return 1.0 - (now % WINDOW_S) / WINDOW_S

    @staticmethod
    def wait_s(prev: float, cur: float, room: float, now: float) -> int | None:
        """None when ``estimate <= room`` now; else whole seconds (≥ 1) until it will be, without new traffic."""
        into = now % WINDOW_S
        if prev * SlidingWindow.weight(now) + cur <= room:
            return None
        if room < 0:  # a zero limit never admits
            return WINDOW_S
        if cur <= room:  # enough of the previous minute has to slide out
            return max(1, math.ceil(WINDOW_S * (1.0 - (room - cur) / prev) - into - 1e-9))
        # the current minute alone is over: after the boundary it is "previous" and slides out in turn
        return max(1, math.ceil(WINDOW_S - into + WINDOW_S * (1.0 - room / cur) - 1e-9))


def _verdict(now: float, req: tuple[float, float], tok: tuple[float, float], max_requests: int | None,
             max_tokens: int | None) -> LimitCheck:
    """One request with (previous, current) minute counts: tokens first (a key whose last minute holds
    ``max_tokens`` is refused whatever its request count), then requests (room for this one)."""
    if max_tokens is not None:
        wait = SlidingWindow.wait_s(tok[0], tok[1], max_tokens - 1e-6, now)
        if wait is not None:
            return LimitCheck("tokens", wait)
    if max_requests is not None:
        wait = SlidingWindow.wait_s(req[0], req[1], max_requests - 1, now)
        if wait is not None:
            return LimitCheck("requests", wait)
    return LimitCheck()


class InProcessRateLimiter:
    """Sliding-window counters in a dict; only this process's traffic counts."""

    def __init__(self, clock: Any = time.time) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}
        self._clock = clock

    def _gc(self, window: int) -> None:
        if len(self._counts) > 10_000:
            self._counts = {k: v for k, v in self._counts.items() if k[2] >= window - 1}

    def _pair(self, key: str, what: str, w: int) -> tuple[float, float]:
        return self._counts.get((key, what, w - 1), 0), self._counts.get((key, what, w), 0)

    async def hit(self, key: str, *, max_requests: int | None, max_tokens: int | None) -> LimitCheck:
        now = self._clock()
        w = _window(now)
        self._gc(w)
        check = _verdict(now, self._pair(key, "req", w), self._pair(key, "tok", w), max_requests, max_tokens)
        if check.over is None:
            self._counts[(key, "req", w)] = self._counts.get((key, "req", w), 0) + 1
        return check

    async def add_tokens(self, key: str, num_tokens: int) -> None:
        k = (key, "tok", _window(self._clock()))
        self._counts[k] = self._counts.get(k, 0) + num_tokens

    async def close(self) -> None:
        return None


# One round trip per admission: read both minutes of both counters, apply _verdict's rule, count the
# request only if admitted. KEYS: req prev, req cur, tok prev, tok cur; ARGV: weight, max requests,
# max tokens (-1 = none), key TTL. Returns {admitted 0/1, the four counts}.
_HIT_SCRIPT = """
local rp = tonumber(redis.call('GET', KEYS[1]) or '0')
local rc = tonumber(redis.call('GET', KEYS[2]) or '0')
local tp = tonumber(redis.call('GET', KEYS[3]) or '0')
local tc = tonumber(redis.call('GET', KEYS[4]) or '0')
local w = tonumber(ARGV[1])
local max_req = tonumber(ARGV[2])
local max_tok = tonumber(ARGV[3])
local ok = 1
if max_tok >= 0 and tp * w + tc >= max_tok then ok = 0 end
if ok == 1 and max_req >= 0 and rp * w + rc + 1 > max_req then ok = 0 end
if ok == 1 then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
end
return {ok, rp, rc, tp, tc}
"""


class RedisRateLimiter:
    """Sliding-window counters in Redis (one Lua script checks and counts atomically), shared by gateway
    replicas. Keys ``sy:rl:{key}:{req|tok}:{minute}`` live three minutes.

    Redis down or slow (> ``timeout_s``, default 100 ms) → the request is admitted and ``num_failures`` grows.
    """

    def __init__(self, redis_url: str, timeout_s: float = 0.1, clock: Any = time.time) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                              retry_on_timeout=False)
        self._script = self._redis.register_script(_HIT_SCRIPT)
        self._clock = clock
        self.num_failures = 0

    async def hit(self, key: str, *, max_requests: int | None, max_tokens: int | None) -> LimitCheck:
        now = self._clock()
        w = _window(now)
        keys = [f"sy:rl:{key}:req:{w - 1}", f"sy:rl:{key}:req:{w}", f"sy:rl:{key}:tok:{w - 1}",
                f"sy:rl:{key}:tok:{w}"]
        args = [repr(SlidingWindow.weight(now)), -1 if max_requests is None else max_requests,
                -1 if max_tokens is None else max_tokens, 3 * WINDOW_S]
        try:
            ok, rp, rc, tp, tc = (int(x) for x in await self._script(keys=keys, args=args))
        except Exception as e:  # noqa: BLE001 - any Redis failure fails open
            self.num_failures += 1
            log.warning("rate limiter: Redis unavailable (%s); admitting", type(e).__name__)
            return LimitCheck()
        if ok:
            return LimitCheck()
        check = _verdict(now, (rp, rc), (tp, tc), max_requests, max_tokens)  # which limit, and how long
        return check if check.over is not None else LimitCheck("requests", 1)  # float rounding at the edge

    async def add_tokens(self, key: str, num_tokens: int) -> None:
        tok_key = f"sy:rl:{key}:tok:{_window(self._clock())}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incrby(tok_key, num_tokens)
                pipe.expire(tok_key, 3 * WINDOW_S)
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


def presented_key(headers: Any) -> str | None:
    """The key a request presents: ``Authorization: Bearer KEY``, else ``api-key`` (Azure style), else
    ``x-api-key`` (Anthropic's SDK). ``headers``: any case-insensitive mapping (Starlette's Headers)."""
    return bearer_token(headers.get("authorization"), headers.get("api-key") or headers.get("x-api-key"))


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
        self.is_open = not self.keys  # no keys configured: anyone may call
        # a key's allow list may name pools or the models they serve: both become pool names here
        self._allowed: dict[str, set[str] | None] = {
            k.name: None if k.models is None else {settings.resolve_model(m) or m for m in k.models}
            for k in self.keys}
        self.limiter = limiter
        self.num_rate_limited = 0


    def _find_key(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).hexdigest().encode()
        found = None
        for key in self.keys:  # compare with every key: timing does not reveal which one matched
            if hmac.compare_digest(digest, key.sha256.encode()) and found is None:
                found = key
        return found

    def authenticate(self, presented_key: str | None) -> ApiKey | None:
        """The configured key matching ``presented_key`` (None: the gateway is open); 401 when missing or wrong."""
        return None if self.is_open else self._authenticate(presented_key)

    def _authenticate(self, presented_key: str | None) -> ApiKey:
        """The configured key matching ``presented_key``; raises 401 when it is missing or wrong."""
        if presented_key is None:
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.",
                                       code="missing_api_key")
        key = self._find_key(presented_key)
        if key is None:
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        return key

    def require_admin(self, presented_key: str | None) -> None:
        """Admin-only reads (the ``/ui`` dashboard's data): returns when the gateway is open or the key has
        ``admin: true``; 401 when the key is missing or wrong, 403 for a key without ``admin``."""
        if self.is_open:
            return
        key = self._authenticate(presented_key)
        if not key.admin:
            raise PermissionDenied(f"API key {key.name!r} is not an admin key (api_keys[].admin: true).",
                                   code="admin_required")

    async def admit(self, presented_key: str | None, pool: str) -> Admission:
        """``pool``: the resolved model (``auto`` or a pool name, ``Settings.resolve_model``)."""
        if self.is_open:
            return Admission(key_name=None, namespace=OPEN_NAMESPACE)
        key = self._authenticate(presented_key)
        allowed = self._allowed.get(key.name)
        if allowed is not None and pool not in allowed:
            raise PermissionDenied(f"API key {key.name!r} may not use model {pool!r}; allowed: {key.models}",
                                   code="model_not_allowed", param="model")
        if key.requests_per_minute is not None or key.tokens_per_minute is not None:
            check = await self.limiter.hit(key.name, max_requests=key.requests_per_minute,
                                           max_tokens=key.tokens_per_minute)
            if check.over is not None:
                self.num_rate_limited += 1
                limit = key.requests_per_minute if check.over == "requests" else key.tokens_per_minute
                raise RateLimited(f"Rate limit reached for key {key.name!r}: {limit} {check.over} per minute "
                                  f"(sliding); retry in {check.retry_after_s} s.",
                                  code=f"rate_limit_{check.over}", headers={"retry-after": str(check.retry_after_s)})
        return Admission(key_name=key.name, namespace=key.namespace or key.name,
                         guard_exempt=key.guard_exempt, tokens_per_minute=key.tokens_per_minute,
                         max_budget_usd=key.max_budget_usd, budget_window=key.budget_window)

    async def allowed_models(self, presented_key: str | None) -> list[str] | None:
        """The aliases this caller may use (None = all); raises 401 like ``admit``."""
        if self.is_open:
            return None
        allowed = self._allowed.get(self._authenticate(presented_key).name)
        return None if allowed is None else sorted(allowed)

    async def record_tokens(self, admission: Admission, num_tokens: int) -> None:
        if admission.key_name is not None and admission.tokens_per_minute is not None and num_tokens > 0:
            await self.limiter.add_tokens(admission.key_name, num_tokens)
