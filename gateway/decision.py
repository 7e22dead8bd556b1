"""What each step of the request path returns, and the ``Decision`` assembled from them once.

The pipeline (``gateway/pipeline.py``) runs the steps in order; each returns its own small type:

    [4] guard     → ``GuardAction``    the verdict's label and what the settings say to do with it
    [5] policy    → ``RouteDecision``  (``routers/policy.py``) the route and pool, the router's score
    [6] examples  → ``Examples``       the in-context examples the SLM gets (none: ``NO_EXAMPLES``)
    [7-9] backend → ``Started``        the first Delta and the rest; the pool that answers after the cascade

``Decision.of`` turns those into what the client and the logs see (the ``x-switchyard-*`` headers, the
``switchyard`` body field, the decision-log record). The only per-request state that changes after the
decisions is what the request measures while it runs: ``Meter`` (time waiting on backends, cost so far).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from backends.types import Delta


@dataclass(frozen=True, slots=True)
class GuardAction:
    """[4] The guard's verdict and what the deployment does with it. ``label``: ``off`` (no guard),
    ``exempt`` (the key skips it), or the verdict (``domain`` | ``ood`` | ``unsafe``). ``action``: ``pass``
    (route normally), ``reject`` (a 400 with ``message``), ``refuse`` (answer ``message`` as a policy
    answer), ``route`` (send to ``pool``)."""

    label: str
    action: Literal["pass", "reject", "refuse", "route"] = "pass"
    message: str = ""
    pool: str | None = None


GUARD_OFF = GuardAction("off")
GUARD_EXEMPT = GuardAction("exempt")


@dataclass(frozen=True, slots=True)
class Examples:
    """[6] The in-context examples an SLM request gets: ``messages`` (formatted, inserted after the system
    messages), the stored examples' ``ids`` (for feedback), the ``similarity`` of the best one, the lookup's
    ``query_embedding`` (reused when the LLM's answer is admitted), and whether they are good enough to keep
    the request on the SLM without a cascade (``keeps_on_slm``)."""

    messages: tuple[dict[str, Any], ...] = ()
    ids: tuple[str, ...] = ()
    similarity: float | None = None
    query_embedding: Any = None
    keeps_on_slm: bool = False

    @property
    def num(self) -> int:
        return len(self.ids)


NO_EXAMPLES = Examples()


@dataclass(frozen=True, slots=True)
class Started:
    """[7-9] A backend answer up to its first Delta (None: the answer was empty). ``pool`` answers it: the
    routed pool, or the LLM when the cascade escalated (``escalated``, with ``reason``); ``judged``: the
    cascade judged an SLM answer or gave its examples feedback (``finish`` then gives none)."""

    first: Delta | None
    rest: AsyncIterator[Delta]
    pool: str
    escalated: bool = False
    judged: bool = False
    reason: str | None = None


@dataclass(slots=True)
class Meter:
    """What one request measures while it runs (the decisions above do not change): seconds spent waiting
    on backends, the cost of the backend calls finished so far (the SLM's when escalated, then the answer's:
    ``Accounting.charge``), and the gateway's own overhead (None until the first Delta)."""

    backend_wait_s: float = 0.0
    cost_usd: float = 0.0
    overhead_s: float | None = None
    _shown: tuple[Any, ...] = field(default=(None, None, 0.0, 0.0), init=False, repr=False, compare=False)

    def shown(self) -> tuple[float, float]:
        """(overhead in ms to 3 decimals, 0 before the first Delta; cost in USD to 10 decimals): what the
        ``switchyard`` field and the decision log show, rounded once while the two values stay the same."""
        memo = self._shown
        if memo[0] != self.overhead_s or memo[1] != self.cost_usd:
            memo = self._shown = (self.overhead_s, self.cost_usd, round_to((self.overhead_s or 0.0) * 1000, 1000),
                                  round_to(self.cost_usd, 10**10))
        return memo[2], memo[3]


def round_to(value: float, scale: int) -> float:
    """``value`` to ``1/scale`` (``scale`` a power of ten: 1000 = 3 decimals) for display and logs: the nearest
    double to that decimal, so JSON prints it short. Unlike ``round(value, ndigits)`` no decimal conversion
    runs (a tie may land one unit apart)."""
    return round(value * scale) / scale


@dataclass(frozen=True, slots=True)
class Decision:
    """What the gateway decided for one request, built once from the steps' results: the ``x-switchyard-*``
    headers, the ``switchyard`` body field and the decision-log record read it. ``routing``: the
    ``RouteDecision`` the request was sent with (its score, threshold, N-model scores); ``pool`` answers it
    (the LLM when the cascade escalated, ``reason`` then says why)."""

    guard: str  # the GuardAction's label
    routing: Any  # routers.policy.RouteDecision
    examples: Examples
    pool: str
    reason: str
    escalated: bool = False

    @classmethod
    def of(cls, guard: GuardAction, routing: Any, examples: Examples, started: Started) -> Decision:
        return cls(guard.label, routing, examples, started.pool,
                   started.reason if started.escalated else routing.reason, started.escalated)

    @property
    def route(self) -> str:
        return self.routing.route

    def info(self, meter: Meter) -> dict[str, Any]:
        """The response's ``switchyard`` field."""
        routing = self.routing
        overhead_ms, cost_usd = meter.shown()
        return {"route": routing.route, "model": self.pool, "guard": self.guard, "score": routing.score,
                "threshold": routing.threshold, "scores": routing.scores, "tolerance": routing.tolerance,
                "escalated": self.escalated, "num_examples": len(self.examples.ids),
                "example_similarity": self.examples.similarity,
                "overhead_ms": overhead_ms, "cost_usd": cost_usd, "reason": self.reason}

    def headers(self, meter: Meter, *, with_cost: bool) -> dict[str, str]:
        """The ``x-switchyard-*`` headers; the cost only when it is known (not on a stream's headers)."""
        h = {"x-switchyard-route": self.routing.route, "x-switchyard-model": self.pool,
             "x-switchyard-guard": self.guard, "x-switchyard-overhead-ms": f"{(meter.overhead_s or 0.0) * 1000:.3f}"}
        if with_cost:
            h["x-switchyard-cost-usd"] = f"{meter.cost_usd:.10f}"
        scores = self.routing.scores
        if scores is not None:
            h["x-switchyard-scores"] = ",".join(f"{alias}={score:.4f}" for alias, score in scores.items())
        return h


__all__ = ["GUARD_EXEMPT", "GUARD_OFF", "NO_EXAMPLES", "Decision", "Examples", "GuardAction", "Meter", "Started"]
