"""Threshold calibration by RouteLLM's quantile rule, and cost targets from per-model prices.

A request goes to the strong model when its score (P(weak good enough)) is below the threshold, so the
threshold that sends the share ``c`` of traffic to the strong model is the ``c``-quantile of the scores
on representative prompts. Labels are not needed — only prompts.

Rows used by ``switchyard calibrate``: the evaluation split of ``--data`` (never training rows), cut in
two by the id hash: even buckets set the threshold, odd buckets measure the realised share.

The cascade's thresholds (``fit_cascade_rule``, ``calibrate --escalate-share``) follow the same quantile rule
over the SLM answers' log-probabilities; the rule itself is served by ``gateway/cascade.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.cascade import CascadeRule, Confidence

SHARE_GRID = [round(0.05 * i, 2) for i in range(1, 20)]


@dataclass(frozen=True)
class Calibration:
    target_share: float
    threshold: float
    realised_share: float  # on held-out rows (not those that set the threshold)
    num_calibration_rows: int
    num_heldout_rows: int
    max_cost_per_1k: float | None = None
    expected_cost_per_1k: float | None = None

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def threshold_for_share(scores: np.ndarray, share: float) -> float:
    """The threshold t with share(score < t) ≈ ``share`` on ``scores``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"strong share must be in [0, 1], got {share}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("calibration needs at least one score")
    if share <= 0.0:
        return float(s[0])  # nothing is strictly below the minimum
    if share >= 1.0:
        return float(np.nextafter(s[-1], np.inf))
    k = int(round(share * len(s)))
    if k <= 0:
        return float(s[0])
    if k >= len(s):
        return float(np.nextafter(s[-1], np.inf))
    return float((s[k - 1] + s[k]) / 2.0) if s[k - 1] != s[k] else float(s[k])


def share_table(scores: np.ndarray) -> list[list[float]]:
    """``[[share, threshold], ...]`` on ``SHARE_GRID``: lets a request ask for its own strong-call share."""
    return [[c, threshold_for_share(scores, c)] for c in SHARE_GRID]


def share_for_cost(max_cost_per_1k: float, slm_cost_per_1k: float, llm_cost_per_1k: float) -> float:
    """Largest strong share whose expected cost ``(1-c)·slm + c·llm`` stays within the budget."""
    if llm_cost_per_1k <= slm_cost_per_1k:
        raise ValueError(f"the LLM price ({llm_cost_per_1k}) must exceed the SLM price ({slm_cost_per_1k}) "
                         "to set a threshold from a cost budget; use --strong-share")
    if max_cost_per_1k < slm_cost_per_1k:
        raise ValueError(f"--max-cost {max_cost_per_1k} is below the SLM-only cost {slm_cost_per_1k} per 1k requests")
    return float(min(1.0, (max_cost_per_1k - slm_cost_per_1k) / (llm_cost_per_1k - slm_cost_per_1k)))


def calibrate_scores(
    cal_scores: np.ndarray,
    heldout_scores: np.ndarray,
    share: float,
) -> Calibration:
    t = threshold_for_share(cal_scores, share)
    realised = float((np.asarray(heldout_scores) < t).mean()) if len(heldout_scores) else float("nan")
    return Calibration(
        target_share=float(share),
        threshold=t,
        realised_share=realised,
        num_calibration_rows=int(len(cal_scores)),
        num_heldout_rows=int(len(heldout_scores)),
    )


def fit_cascade_rule(
    confidences: Sequence[Confidence],
    escalate_share: float,
    token_quantile: float | None = 0.01,
) -> CascadeRule:
    """Quantile rule: ``min_mean_logprob`` = the ``escalate_share`` quantile of held-out mean log-probs,
    so about that share of answers escalates; ``min_token_logprob`` (optional) = the ``token_quantile``
    quantile of per-answer minimum log-probs (catches a single wild token)."""
    if not 0.0 <= escalate_share <= 1.0:
        raise ValueError(f"escalate_share must be in [0, 1], got {escalate_share}")
    finite = [c for c in confidences if c.num_tokens > 0]
    if not finite:
        raise ValueError("fit_cascade_rule needs at least one non-empty answer")
    means = np.asarray([c.mean_logprob for c in finite])
    mins = np.asarray([c.min_logprob for c in finite])
    mean_t = float(np.quantile(means, escalate_share)) if escalate_share > 0 else None
    token_t = float(np.quantile(mins, token_quantile)) if token_quantile else None
    return CascadeRule(
        min_mean_logprob=None if mean_t is None else min(mean_t, 0.0),
        min_token_logprob=None if token_t is None else min(token_t, 0.0),
    )


def escalation_share(rule: CascadeRule, confidences: Sequence[Confidence]) -> float:
    """The share of ``confidences`` that ``rule`` escalates (0 for none)."""
    if not confidences:
        return 0.0
    return sum(rule.should_escalate(c) for c in confidences) / len(confidences)


# --------------------------------------------------------------------------------------------------
# N-model routers: the quality tolerance for a cost budget
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToleranceCalibration:
    """``tolerance`` = the smallest tolerance whose expected cost on the calibration rows is within the budget
    (the best predicted quality the budget buys: cost only falls as the tolerance grows)."""

    max_cost_per_1k: float
    tolerance: float
    expected_cost_per_1k: float  # on the rows that set the tolerance
    realised_cost_per_1k: float  # on held-out rows
    num_calibration_rows: int
    num_heldout_rows: int
    tolerance_table: list[list[float]]  # [[tolerance, expected cost per 1k], ...] on the calibration rows

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def mean_cost(pred: np.ndarray, prices: np.ndarray, tolerance: float) -> float:
    from routers.scorers import choose_indices

    return float(prices[choose_indices(pred, prices, tolerance)].mean())


def tolerance_for_cost(cal_pred: np.ndarray, heldout_pred: np.ndarray, prices: np.ndarray,
                       max_cost_per_1k: float) -> ToleranceCalibration:
    """``cal_pred`` / ``heldout_pred``: an N-model router's predicted scores ``[n, k]``; ``prices[k]`` in USD
    per 1k requests. Labels are not needed — only prompts. ValueError when even a cheapest model on every row
    costs more than the budget."""
    from training.cost_quality import tolerance_grid

    grid = tolerance_grid(cal_pred)
    costs = np.asarray([mean_cost(cal_pred, prices, float(t)) for t in grid])
    ok = np.nonzero(costs <= max_cost_per_1k + 1e-12)[0]
    if not len(ok):
        raise ValueError(f"--max-cost {max_cost_per_1k:g} is below the cheapest model's cost "
                         f"{float(prices.min()):g} per 1k requests")
    i = int(ok[0])
    tol = float(grid[i]) if np.isfinite(grid[i]) else 1e6  # "a cheapest model", finite for JSON and the config
    keep = np.unique(np.linspace(0, len(grid) - 2, min(len(grid) - 1, 40)).round().astype(int))
    return ToleranceCalibration(
        max_cost_per_1k=float(max_cost_per_1k), tolerance=tol, expected_cost_per_1k=float(costs[i]),
        realised_cost_per_1k=mean_cost(heldout_pred, prices, tol) if len(heldout_pred) else float("nan"),
        num_calibration_rows=len(cal_pred), num_heldout_rows=len(heldout_pred),
        tolerance_table=[[round(float(grid[j]), 6), round(float(costs[j]), 6)] for j in keep])
