"""What the ``/ui`` dashboard shows (``GET /ui/data``), read from what the gateway already keeps.

Counts, spend and verdicts are the Prometheus metrics' own values (``gateway/metrics.py``: one owner per
number, nothing is counted twice); the latest decisions are the decision log's in-memory records
(``gateway/decision_log.py``). The only state here is ``timeline``: every ``period_s`` (a minute) a sample
of the cumulative per-key spend and always-LLM cost and of the request and escalation counts, the last
``keep`` samples (an hour) — so "over time" needs no Prometheus server. A sample is a few numbers per API
key name; the keys are the configured ones, so the memory is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

NUM_DECISIONS = 50  # latest decisions served


def _samples(metric: Any) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of a prometheus_client Counter or Gauge, all label sets (``_created`` left out)."""
    out = []
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out.append((sample.labels, sample.value))
    return out


def _total(metric: Any) -> float:
    return sum(value for _, value in _samples(metric))


def _by(metric: Any, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in _samples(metric):
        out[labels[label]] = out.get(labels[label], 0.0) + value
    return out


class Dashboard:
    """Built in the app's lifespan; ``start()`` begins sampling, ``data()`` is the JSON of ``/ui/data``."""

    def __init__(self, metrics: Any, decision_log: Any, *, period_s: float = 60.0, keep: int = 60,
                 clock: Callable[[], float] = time.time) -> None:
        if period_s <= 0 or keep < 1:
            raise ValueError("period_s must be > 0 and keep >= 1")
        self.metrics = metrics
        self.decision_log = decision_log
        self.period_s = period_s
        self.timeline: deque[dict[str, Any]] = deque(maxlen=keep)  # oldest first
        self._clock = clock
        self._started = clock()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Sample now, then at every ``period_s`` boundary of the wall clock (on the running loop)."""
        self.sample()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s - self._clock() % self.period_s)
            self.sample()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def sample(self) -> None:
        self.timeline.append(self._point())

    def _point(self) -> dict[str, Any]:
        m = self.metrics
        spend, always = _by(m.key_spend, "key"), _by(m.key_always_llm_cost, "key")
        return {"ts": round(self._clock(), 3), "requests": _total(m.requests), "escalations": _total(m.escalations),
                "spend_usd": {"total": _total(m.cost), "keys": spend},
                "saved_usd": {"total": _total(m.saved),
                              "keys": {k: always.get(k, 0.0) - v for k, v in spend.items()}}}

    def data(self) -> dict[str, Any]:
        """Everything the page draws, as of now (see the README's "Dashboard" section for the fields)."""
        m = self.metrics
        requests = _samples(m.requests)
        by_route: dict[str, float] = {}
        by_pool: dict[str, float] = {}
        by_status: dict[str, float] = {}
        for labels, value in requests:
            by_route[labels["route"]] = by_route.get(labels["route"], 0.0) + value
            by_pool[labels["model"]] = by_pool.get(labels["model"], 0.0) + value
            by_status[labels["status"]] = by_status.get(labels["status"], 0.0) + value
        judged, escalated = _total(m.cascade_judged), _total(m.escalations)
        spend, always = _by(m.key_spend, "key"), _by(m.key_always_llm_cost, "key")
        tokens: dict[str, dict[str, float]] = {}
        for labels, value in _samples(m.key_tokens):
            tokens.setdefault(labels["key"], {})[labels["kind"]] = value
        now = self._point()
        return {
            "now": now["ts"], "started": round(self._started, 3),
            "requests": {"total": sum(by_route.values()), "by_route": by_route, "by_pool": by_pool,
                         "by_status": by_status,
                         "errors": sum(v for s, v in by_status.items() if s.isdigit() and int(s) >= 400)},
            "guard": _by(m.guard, "label"),
            "cascade": {"judged": judged, "escalated": escalated,
                        "escalation_rate": escalated / judged if judged else None},
            "spend": {"cost_usd": now["spend_usd"]["total"], "always_llm_usd": _total(m.always_llm_cost),
                      "saved_usd": now["saved_usd"]["total"]},
            "keys": {key: {"spend_usd": value, "always_llm_usd": always.get(key, 0.0),
                           "saved_usd": always.get(key, 0.0) - value,
                           "prompt_tokens": tokens.get(key, {}).get("prompt", 0.0),
                           "completion_tokens": tokens.get(key, {}).get("completion", 0.0)}
                     for key, value in sorted(spend.items())},
            "timeline": {"period_s": self.period_s, "points": [*self.timeline, now]},
            "decisions": self.decision_log.latest(NUM_DECISIONS),
        }
