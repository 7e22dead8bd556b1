"""Cost-quality curves (strong-call share vs quality) beside random routing and the oracle; N-model hulls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate import curve, oracle_scores


def plot_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]],
    path: str | Path,
    title: str = "router cost-quality curve",
) -> Path:
    """One panel per source: ``{source: (strong, weak, {system: scores})}`` → PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), squeeze=False)
    for ax, (src, (strong, weak, systems)) in zip(axes[0], curves.items(), strict=True):
        for name, scores in systems.items():
            c = curve(scores, strong, weak)
            ax.plot(c.shares, c.quality, label=name)
        o = curve(oracle_scores(strong, weak), strong, weak)
        ax.plot(o.shares, o.quality, "k:", label="oracle")
        ax.plot([0, 1], [weak.mean(), strong.mean()], "k--", alpha=0.5, label="random")
        ax.set_title(f"{src} (n={len(strong)})")
        ax.set_xlabel("strong-model call share")
        ax.set_ylabel("quality")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_cost_quality(hulls: dict[str, np.ndarray], singles: dict[str, tuple[float, float]], path: str | Path,
                      title: str = "N-model router: quality vs cost") -> Path:
    """Non-decreasing convex hulls ``{system: [[cost, quality], ...]}`` and single models ``{name: (cost,
    quality)}`` (``training.cost_quality``) → PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    c_max = max(c for c, _ in singles.values())
    for name, h in hulls.items():
        xs, ys = list(h[:, 0]) + [c_max], list(h[:, 1]) + [h[-1, 1]]
        ax.plot(xs, ys, marker=".", label=name)
    for name, (c, q) in singles.items():
        ax.plot([c], [q], "kx")
        ax.annotate(name.rsplit("/", 1)[-1], (c, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("cost per 1k requests")
    ax.set_ylabel("quality (mean score)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out, write ``path`` (PNG at 110 dpi), close the figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
