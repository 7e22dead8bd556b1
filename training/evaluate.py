"""Router metrics, exactly as RouteLLM defines them (Ong et al., 2024), and the latency probe.

For a router that sends the share ``c`` of requests to the strong model (the requests it is least
confident the weak model can handle):

- ``quality(c)`` = mean over rows of ``strong_score`` for routed rows, ``weak_score`` otherwise;
- ``PGR(c) = (quality(c) - weak_quality) / (strong_quality - weak_quality)``;
- ``APGR`` = area under PGR(c) for c in [0, 1], by trapezoids over the realised shares (every cut
  between distinct scores; ties move together, so a constant scorer has one segment from 0 to 1);
  random routing ≈ 0.50;
- ``CPT(x)`` = the smallest realised share c with PGR(c) >= x (1.0 when never reached).

A scorer's output is P(weak good enough); higher = keep on the weak model. Strong-call share at a
threshold t is the share of rows with ``score < t``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Curve:
    """The cost-quality curve of one router on one set of rows."""

    shares: np.ndarray  # realised strong-call shares, increasing from 0 to 1
    quality: np.ndarray  # mean score at each share
    pgr: np.ndarray  # performance gap recovered at each share
    weak_quality: float
    strong_quality: float


@dataclass(frozen=True)
class RouterMetrics:
    n: int
    apgr: float
    cpt50: float
    cpt80: float
    weak_quality: float
    strong_quality: float
    strong_share_at_threshold: float | None = None
    quality_at_threshold: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def curve(scores: Sequence[float] | np.ndarray, strong: np.ndarray, weak: np.ndarray) -> Curve:
    """PGR curve from P(weak good enough) ``scores`` (lowest score goes to the strong model first)."""
    s = np.asarray(scores, dtype=np.float64)
    strong = np.asarray(strong, dtype=np.float64)
    weak = np.asarray(weak, dtype=np.float64)
    n = len(s)
    if n == 0 or len(strong) != n or len(weak) != n:
        raise ValueError(f"curve needs equal, non-empty lengths; got {n}, {len(strong)}, {len(weak)}")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    gain = (strong - weak)[order]
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    # realised cuts: 0, every boundary between distinct scores, n
    boundaries = np.nonzero(np.diff(s_sorted))[0] + 1
    ks = np.concatenate([[0], boundaries, [n]])
    weak_q = float(weak.mean())
    strong_q = float(strong.mean())
    quality = weak_q + cum[ks] / n
    gap = strong_q - weak_q
    pgr = (quality - weak_q) / gap if gap != 0 else np.zeros_like(quality)
    return Curve(shares=ks / n, quality=quality, pgr=pgr, weak_quality=weak_q, strong_quality=strong_q)


def apgr(c: Curve) -> float:
    x, y = c.shares, c.pgr
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def cpt(c: Curve, x: float) -> float:
    """Smallest realised strong-call share whose PGR reaches ``x`` (1.0 if never)."""
    hit = np.nonzero(c.pgr >= x - 1e-12)[0]
    return float(c.shares[hit[0]]) if len(hit) else 1.0


def metrics(
    scores: Sequence[float] | np.ndarray,
    strong: np.ndarray,
    weak: np.ndarray,
    threshold: float | None = None,
) -> RouterMetrics:
    c = curve(scores, strong, weak)
    share = q = None
    if threshold is not None:
        routed = np.asarray(scores) < threshold
        share = float(routed.mean())
        q = float(np.where(routed, strong, weak).mean())
    return RouterMetrics(
        n=int(len(np.asarray(scores))),
        apgr=apgr(c),
        cpt50=cpt(c, 0.5),
        cpt80=cpt(c, 0.8),
        weak_quality=c.weak_quality,
        strong_quality=c.strong_quality,
        strong_share_at_threshold=share,
        quality_at_threshold=q,
    )


def oracle_scores(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The oracle's P(weak good enough): route by the true gain, biggest gain first; rows with equal gain
    are ordered by a fixed tiny jitter so the oracle's curve has a point at every share."""
    gain = np.asarray(strong, dtype=np.float64) - np.asarray(weak, dtype=np.float64)
    return -gain + 1e-9 * np.random.default_rng(0).random(len(gain))


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    n: int


def measure_latency(score_one: Callable[[str], float], texts: Sequence[str], warmup: int = 20) -> Latency:
    """Per-query wall time of ``score_one`` on one thread (the caller sets torch/BLAS threads)."""
    if not texts:
        raise ValueError("measure_latency needs at least one text")
    for t in list(texts)[:warmup]:
        score_one(t)
    times = []
    for t in texts:
        t0 = time.perf_counter()
        score_one(t)
        times.append((time.perf_counter() - t0) * 1000.0)
    arr = np.asarray(times)
    return Latency(p50_ms=float(np.percentile(arr, 50)), p99_ms=float(np.percentile(arr, 99)), n=len(arr))
