"""Spend budgets per API key: ``api_keys[].max_budget_usd`` per ``budget_window`` (``1d`` by default).

The rule (reserve, then settle):
  * at admission the request's worst case is reserved — the price of every pool it may use (SLM and LLM for
    ``auto``, since the cascade can pay both) for the estimated prompt and all of ``max_tokens`` × ``n``;
    when reserved + already spent would pass the budget the request is refused (429 ``budget_exceeded``)
    before any backend is called;
  * when the request ends the reservation is replaced by what it cost (nothing when it failed before a
    backend answered; the whole reservation when the client left mid-answer, whose cost is unknown).
So concurrent requests cannot overshoot: a budget is passed by at most what estimates got wrong.

Windows are fixed and aligned to the epoch (``1d`` = UTC days). In Redis when ``redis_url`` is set (one Lua
script checks and reserves atomically, shared by every gateway replica); in process otherwise, and while
Redis is unreachable or slower than its timeout (counted in ``num_failures``): each replica then counts on
from the window's total it last read from Redis, never from zero, until Redis answers again.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("switchyard.budget")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
WINDOW_PATTERN = r"^[1-9][0-9]*[smhd]$"


def window_seconds(window: str) -> int:
    """``"1d"`` → 86400; ``Ns``, ``Nm``, ``Nh``, ``Nd``. Anything else raises ValueError."""
    if not re.match(WINDOW_PATTERN, window):
        raise ValueError(f"budget_window must look like 30m, 12h or 1d; got {window!r}")
    return int(window[:-1]) * _UNITS[window[-1]]


@dataclass(frozen=True)
class Reservation:
    """A reserved amount in one key's window; ``settle`` replaces it by the actual cost."""

    key_name: str
    window_key: str
    amount_usd: float


# KEYS[1]: the window's counter; ARGV: amount, limit, ttl. Returns {1, total after} when reserved, {0, total}
# when over (totals as strings: Lua numbers in replies are truncated to integers).
_RESERVE = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
if spent + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, tostring(spent)} end
local total = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, total}
"""


class Budgets:
    """Reserve / settle per key and window. ``redis_url`` None: in process only."""

    def __init__(self, redis_url: str | None = None, clock: Any = time.time, timeout_s: float = 0.1) -> None:
        self._clock = clock
        self._local: dict[str, float] = {}  # window key → this process's count (no Redis, or Redis failing)
        self._seen: dict[str, float] = {}  # window key → the total Redis last answered (where a fallback starts)
        self.num_failures = 0
        self._redis = None
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s,
                                                  socket_connect_timeout=timeout_s, retry_on_timeout=False)
            self._script = self._redis.register_script(_RESERVE)

    def _window_key(self, key_name: str, window: str) -> tuple[str, int]:
        seconds = window_seconds(window)
        return f"sy:budget:{key_name}:{window}:{int(self._clock() // seconds)}", seconds

    async def spent(self, key_name: str, window: str) -> float:
        """Spent + reserved in the current window."""
        window_key, _ = self._window_key(key_name, window)
        if self._redis is not None:
            try:
                return self._saw(window_key, float(await self._redis.get(window_key) or 0.0))
            except Exception:  # noqa: BLE001 - fall back to this process's count
                self.num_failures += 1
        return self._fallback(window_key)

    async def reserve(self, key_name: str, window: str, amount_usd: float, limit_usd: float) -> Reservation | None:
        """Reserve ``amount_usd`` unless the window's spend would pass ``limit_usd`` (then None)."""
        window_key, seconds = self._window_key(key_name, window)
        if self._redis is not None:
            try:
                ok, total = await self._script(keys=[window_key], args=[repr(amount_usd), repr(limit_usd), 2 * seconds])
                self._saw(window_key, float(total))
                return Reservation(key_name, window_key, amount_usd) if int(ok) else None
            except Exception as e:  # noqa: BLE001 - Redis down: this process keeps the count meanwhile
                self.num_failures += 1
                log.warning("budgets: Redis unavailable (%s); counting in process", type(e).__name__)
        spent = self._fallback(window_key)
        if spent + amount_usd > limit_usd:
            return None
        self._local[window_key] = spent + amount_usd
        if len(self._local) > 10_000:  # old windows
            self._local = dict(list(self._local.items())[-5_000:])
        return Reservation(key_name, window_key, amount_usd)

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace the reservation by the actual cost (in the window it was reserved in)."""
        delta = actual_usd - reservation.amount_usd
        if delta == 0:
            return
        if self._redis is not None:
            try:
                self._saw(reservation.window_key, float(await self._redis.incrbyfloat(reservation.window_key, delta)))
                return
            except Exception:  # noqa: BLE001
                self.num_failures += 1
        self._local[reservation.window_key] = self._fallback(reservation.window_key) + delta

    def _saw(self, window_key: str, total: float) -> float:
        """Redis answered ``total`` for the window: a later fallback counts on from it."""
        self._seen[window_key] = total
        self._local.pop(window_key, None)
        if len(self._seen) > 10_000:  # old windows
            self._seen = dict(list(self._seen.items())[-5_000:])
        return total

    def _fallback(self, window_key: str) -> float:
        """This process's count for the window: its own since Redis last answered, else what Redis said."""
        local = self._local.get(window_key)
        return local if local is not None else self._seen.get(window_key, 0.0)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
