"""Route policy: from the router's score, the thresholds and the request's hints to a ``RouteDecision``.

``decide`` is asked only for ``model: "auto"`` (a request naming a pool goes there: the gateway resolves
model names, once, before admission). Precedence (first match wins):

1. **per-request hint** (see ``parse_hint``):
   - quality ``low``  → ``slm`` (cheapest; no escalation);
   - quality ``high`` → ``llm``;
   - quality ``medium`` or no hint → the router as below;
   - ``max_strong_share`` x in [0, 1] → the router with the threshold that sends about the share x of
     traffic to the LLM (from the artifact's calibration table).
2. **no router artifact** → ``slm_then_escalate`` (the cascade decides on SLM confidence), or ``slm``
   when the cascade is off.
3. **router**: ``score < threshold`` → ``llm``; ``threshold <= score < threshold + escalate_band`` →
   ``slm_then_escalate`` (``slm`` when the cascade is off); else ``slm``.
3'. **N-model router** (an ``nmodel`` artifact, its models mapped to pools by the gateway): route ``pool``
   to the cheapest pool whose predicted score is within ``tolerance`` of the best predicted score
   (``routing.quality_tolerance``, else the artifact's calibrated ``tolerance``; ties on cost go to the
   better predicted). Quality hints keep their meaning (low → ``slm_pool``, high → ``llm_pool``);
   ``max_strong_share`` is a two-pool notion and is ignored (the reason says so). No cascade.

Hints reach the gateway two ways (the body wins when both are given):

- body extra field ``"switchyard": {"quality": "low"|"medium"|"high"}`` or
  ``"switchyard": {"max_strong_share": 0.2}``  (openai SDK: ``extra_body={"switchyard": {...}}``);
- header ``x-switchyard-quality: low|medium|high`` or ``x-switchyard-max-strong-share: 0.2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from routers.scorers import choose_model

QUALITY_LEVELS = ("low", "medium", "high")
HINT_BODY_FIELD = "switchyard"
HINT_HEADER = "x-switchyard-quality"
SHARE_HEADER = "x-switchyard-max-strong-share"

Route = Literal["slm", "slm_then_escalate", "llm", "pool"]


@dataclass(frozen=True)
class RouteDecision:
    route: Route
    pool: str
    score: float | None  # P(SLM good enough), None when no two-pool router ran
    threshold: float | None
    reason: str
    scores: dict[str, float] | None = None  # N-model router: predicted score per pool alias
    tolerance: float | None = None  # N-model router: the tolerance the choice used


@dataclass(frozen=True)
class RouteHint:
    """A request's cost/quality preference; at most one of the two is set."""

    quality: Literal["low", "medium", "high"] | None = None
    max_strong_share: float | None = None


def parse_hint(body_value: Any = None, headers: Mapping[str, str] | None = None) -> RouteHint | None:
    """Read the hint from the body's ``switchyard`` field and/or the headers. Bad values raise ValueError
    with a message naming the field (the gateway answers 400)."""
    if body_value is not None:
        if not isinstance(body_value, dict):
            raise ValueError(f"'{HINT_BODY_FIELD}' must be an object like {{\"quality\": \"low\"}}")
        unknown = set(body_value) - {"quality", "max_strong_share"}
        if unknown:
            raise ValueError(f"'{HINT_BODY_FIELD}' has unknown keys {sorted(unknown)}; "
                             "valid: quality, max_strong_share")
        if "quality" in body_value and "max_strong_share" in body_value:
            raise ValueError(f"'{HINT_BODY_FIELD}': give either quality or max_strong_share, not both")
        if "quality" in body_value:
            return RouteHint(quality=_quality(body_value["quality"], f"{HINT_BODY_FIELD}.quality"))
        if "max_strong_share" in body_value:
            return RouteHint(max_strong_share=_share(body_value["max_strong_share"],
                                                     f"{HINT_BODY_FIELD}.max_strong_share"))
    if headers:
        # starlette's Headers look names up case-insensitively already; a plain dict is lowered here
        lower = {k.lower(): v for k, v in headers.items()} if isinstance(headers, dict) else headers
        if HINT_HEADER in lower:
            return RouteHint(quality=_quality(lower[HINT_HEADER].strip().lower(), HINT_HEADER))
        if SHARE_HEADER in lower:
            try:
                value = float(lower[SHARE_HEADER])
            except ValueError:
                raise ValueError(f"{SHARE_HEADER} must be a number in [0, 1], "
                                 f"got {lower[SHARE_HEADER]!r}") from None
            return RouteHint(max_strong_share=_share(value, SHARE_HEADER))
    return None


def _quality(value: Any, where: str) -> Literal["low", "medium", "high"]:
    if value not in QUALITY_LEVELS:
        raise ValueError(f"{where} must be one of {', '.join(QUALITY_LEVELS)}; got {value!r}")
    return value


def _share(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}")
    return float(value)


def threshold_for_share(share_table: list[list[float]] | None, share: float, default: float) -> float:
    """Interpolate the calibration table ``[[strong_share, threshold], ...]`` (sorted by share)."""
    if not share_table:
        return default
    xs = np.asarray([p[0] for p in share_table], dtype=np.float64)
    ys = np.asarray([p[1] for p in share_table], dtype=np.float64)
    if share <= 0.0:
        return float(-np.inf)  # nothing scores below -inf: everything stays on the SLM
    if share >= 1.0:
        return float(np.inf)
    return float(np.interp(share, xs, ys))


class RoutePolicy:
    """Builds RouteDecisions for ``model: "auto"``. Construct once (create_app/lifespan); ``decide`` is pure
    and thread-safe.

    ``pools`` (N-model routers only, given by the gateway): ``{artifact model: (pool alias, cost)}`` for
    every model of the router; cost is any scale where lower = cheaper (the gateway uses the pool's price).
    """

    def __init__(self, routing, router=None,  # gateway.settings.RoutingSettings, routers.router.Router
                 pools: Mapping[str, tuple[str, float]] | None = None) -> None:
        self.routing = routing
        self.router = router
        self.pools = dict(pools) if pools is not None else None
        assert self.pools is not None or not getattr(router, "is_nmodel", False), \
            "an nmodel router needs pools: {model: (pool, cost)} (gateway.settings.Settings.router_pools)"
        if self.pools is not None:
            assert router is not None and set(self.pools) == set(router.models), \
                "an N-model policy maps every model of its router to a pool"
            self.costs = {m: float(cost) for m, (_, cost) in self.pools.items()}
            tol = routing.quality_tolerance
            self.tolerance = float(router.tolerance if tol is None else tol)
        self.cascade_on = routing.cascade.mode != "off"
        if routing.threshold is not None:
            self.threshold: float | None = float(routing.threshold)
        elif router is not None:
            self.threshold = float(router.threshold)
        else:
            self.threshold = None
        cal = (router.meta.get("calibration") or {}) if router is not None else {}
        self.share_table: list[list[float]] | None = cal.get("share_table")

    def needs_score(self, hint: RouteHint | None = None) -> bool:
        """Whether ``decide`` with this hint reads the two-pool router's score (a caller that scores texts
        in batches passes it in as ``score``). An N-model router's prediction is made inside ``decide``."""
        return (self.router is not None and self.pools is None
                and (hint is None or hint.quality not in ("low", "high")))

    def decide(self, text: str, hint: RouteHint | None = None, score: float | None = None) -> RouteDecision:
        """The route of ``text``; ``score``: the router's score of ``text`` when the caller has it already
        (None: ``decide`` asks the router when it needs one)."""
        slm, llm = self.routing.slm_pool, self.routing.llm_pool
        threshold = self.threshold
        if hint is not None and hint.quality == "low":
            return RouteDecision("slm", slm, None, None, "hint quality=low")
        if hint is not None and hint.quality == "high":
            return RouteDecision("llm", llm, None, None, "hint quality=high")
        if self.pools is not None:
            ignored = (f"; max_strong_share={hint.max_strong_share:g} ignored (two-pool routing only)"
                       if hint is not None and hint.max_strong_share is not None else "")
            return self._choose_pool(text, ignored)
        if hint is not None and hint.max_strong_share is not None:
            if self.router is None:
                route: Route = "slm_then_escalate" if self.cascade_on and hint.max_strong_share > 0 else "slm"
                return RouteDecision(route, slm, None, None,
                                     f"hint max_strong_share={hint.max_strong_share:g}; no router artifact")
            threshold = threshold_for_share(self.share_table, hint.max_strong_share,
                                            default=self.threshold or 0.5)
        if self.router is None:
            if self.cascade_on:
                return RouteDecision("slm_then_escalate", slm, None, None,
                                     "no router artifact: cascade on SLM confidence")
            return RouteDecision("slm", slm, None, None, "no router artifact, cascade off")
        assert threshold is not None, "a router always has a threshold"
        score = float(self.router.score(text) if score is None else score)
        if score < threshold:
            return RouteDecision("llm", llm, score, threshold, f"score {score:.3f} < threshold {threshold:.3f}")
        if score < threshold + self.routing.escalate_band and self.cascade_on:
            return RouteDecision("slm_then_escalate", slm, score, threshold,
                                 f"score {score:.3f} within {self.routing.escalate_band:g} of threshold")
        return RouteDecision("slm", slm, score, threshold, f"score {score:.3f} >= threshold {threshold:.3f}")

    def _choose_pool(self, text: str, note: str = "") -> RouteDecision:
        """The N-model rule: cheapest pool predicted within the tolerance of the best."""
        predicted = self.router.predict(text)
        choice = choose_model(predicted, self.costs, self.tolerance)
        scores = {self.pools[m][0]: round(p, 4) for m, p in predicted.items()}
        alias = self.pools[choice.model][0]
        gap = choice.best_predicted - predicted[choice.model]
        reason = (f"cheapest pool predicted within {self.tolerance:g} of the best "
                  f"({predicted[choice.model]:.3f} vs {choice.best_predicted:.3f}, gap {gap:.3f}){note}")
        return RouteDecision("pool", alias, None, None, reason, scores=scores, tolerance=self.tolerance)
