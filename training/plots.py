"""Cost-quality curves (strong-call share vs quality) beside random routing and the oracle."""

from __future__ import annotations

from pathlib import Path

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
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
