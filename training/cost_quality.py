"""Quality vs cost of N-model routing, as RouterBench defines it (Hu et al., 2024, "RouterBench: A Benchmark
for Multi-LLM Routing System", section 3).

Rows carry every model's score (``true[n, k]``, higher = better) and each model has a price (USD per 1k
requests, ``prices[k]``). A system that answers each row with one model sits at one point: (mean cost per 1k
requests, mean score of the models it picked). A system with a knob has one point per setting:

- **router**: the serving rule (``routers.scorers.choose_indices``) at each quality tolerance, from 0 (the best
  predicted model) to ``inf`` (a cheapest model);
- **oracle**: per row, the model that maximises ``score - λ·price``, λ from 0 (the best model of each row,
  ties to the cheaper) to ``inf`` (a cheapest model, ties to the better);
- **single models**: one point each; **zero router** (RouterBench's baseline, "random" in our tables): a
  random choice between single models, i.e. every mix of their points.

Picking between two settings at random per request reaches every point on the segment between them, so a
system is judged by its **non-decreasing convex hull**: the upper convex hull of its points, held flat to
the right of its best point (paying more never has to lower quality).

**AIQ** (average improvement in quality) = the hull's mean height over the cost range of the single models,
``1 / (c_max - c_min) · ∫ hull(c) dc`` from ``c_min`` (the cheapest model's cost) to ``c_max`` (the dearest
model's), each hull extended flat from its last point to ``c_max``. Every system here reaches ``c_min`` (a
cheapest model on every row), so the integral is defined over the whole range. It is in the scores' units:
an AIQ above the zero router's means better quality per cost on average over the budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from routers.scorers import choose_indices


@dataclass(frozen=True)
class Point:
    cost: float  # mean cost per 1k requests (the prices' unit)
    quality: float  # mean score of the picked models
    setting: float  # the knob: the router's tolerance, the oracle's λ (nan for a fixed system)


def point(picks: np.ndarray, true: np.ndarray, prices: np.ndarray, setting: float = float("nan")) -> Point:
    """The (cost, quality) of answering row i with model ``picks[i]``."""
    rows = np.arange(len(picks))
    return Point(float(prices[picks].mean()), float(true[rows, picks].mean()), setting)


def tolerance_grid(pred: np.ndarray, num: int = 200) -> np.ndarray:
    """Tolerances where the router's choices change: 0, the quantiles of the gaps between each model's
    predicted score and its row's best, and ``inf``."""
    gaps = (pred.max(axis=1, keepdims=True) - pred).ravel()
    inner = np.quantile(gaps[gaps > 0], np.linspace(0, 1, num)) if (gaps > 0).any() else np.zeros(0)
    return np.unique(np.concatenate([[0.0], inner, [np.inf]]))


def router_points(pred: np.ndarray, true: np.ndarray, prices: np.ndarray,
                  tolerances: Sequence[float] | np.ndarray | None = None) -> list[Point]:
    grid = tolerance_grid(pred) if tolerances is None else tolerances
    return [point(choose_indices(pred, prices, float(t)), true, prices, float(t)) for t in grid]


def oracle_points(true: np.ndarray, prices: np.ndarray, num: int = 200) -> list[Point]:
    """The oracle's choices for λ from 0 to ``inf`` (log-spaced in between, scaled to the data)."""
    spread_q = float(np.ptp(true)) or 1.0
    spread_c = float(np.ptp(prices)) or 1.0
    lambdas = np.concatenate([[0.0], np.geomspace(1e-4, 1e4, num) * spread_q / spread_c, [np.inf]])
    out = []
    for lam in lambdas:
        if np.isinf(lam):  # a cheapest model, ties to the better score
            utility = np.where(prices[None, :] == prices.min(), true, -np.inf)
        else:
            utility = true - lam * prices[None, :] - 1e-12 * prices[None, :]  # ties to the cheaper
        out.append(point(utility.argmax(axis=1), true, prices, float(lam)))
    return out


def single_points(true: np.ndarray, prices: np.ndarray) -> list[Point]:
    return [point(np.full(len(true), j), true, prices) for j in range(true.shape[1])]


def hull(points: Sequence[Point]) -> np.ndarray:
    """The non-decreasing convex hull ``[[cost, quality], ...]`` (cost increasing) of ``points``."""
    if not points:
        raise ValueError("hull needs at least one point")
    best_at: dict[float, float] = {}  # per cost, the best quality
    for p in points:
        best_at[p.cost] = max(p.quality, best_at.get(p.cost, -np.inf))
    xy = np.asarray(sorted(best_at.items()), dtype=np.float64)
    upper: list[np.ndarray] = []
    for p in xy[::-1]:  # monotone chain from the right: the upper hull, leftwards
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    up = np.asarray(upper[::-1])
    best = int(np.argmax(up[:, 1]))  # the upper hull rises then falls: keep it up to its best point
    return up[: best + 1]


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def quality_at(h: np.ndarray, cost: float) -> float:
    """The hull's quality at ``cost`` (flat after its last point; nan below its first)."""
    if cost < h[0, 0] - 1e-12:
        return float("nan")
    return float(np.interp(cost, h[:, 0], h[:, 1]))


def cost_to_reach(h: np.ndarray, quality: float) -> float | None:
    """The least cost at which the hull reaches ``quality`` (None when it never does)."""
    if quality > h[-1, 1] + 1e-12:
        return None
    if quality <= h[0, 1]:
        return float(h[0, 0])
    i = int(np.argmax(h[:, 1] >= quality - 1e-12))
    (c0, q0), (c1, q1) = h[i - 1], h[i]
    return float(c0 + (quality - q0) * (c1 - c0) / (q1 - q0))


def aiq(h: np.ndarray, c_min: float, c_max: float) -> float:
    """Mean height of hull ``h`` over [c_min, c_max] (extended flat to ``c_max``). With one price for every
    model the range is a point: the hull's quality there."""
    if h[0, 0] > c_min + 1e-9:
        raise ValueError(f"the hull starts at cost {h[0, 0]:g}, above the range's start {c_min:g}")
    if c_max <= c_min:
        return quality_at(h, c_min)
    xs = np.unique(np.concatenate([[c_min, c_max], h[:, 0][(h[:, 0] > c_min) & (h[:, 0] < c_max)]]))
    ys = np.asarray([quality_at(h, x) for x in xs])
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0) / (c_max - c_min))
