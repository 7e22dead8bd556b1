"""Choosing the N-model router's settings without test data: K folds of the training split.

The eval split (``sha1(id) mod 100 < eval_percent``) is what ``switchyard eval router`` reports on; this
module never reads its scores. The training split is cut into ``--folds`` folds by a second hash
(``sha1(id + "#fold") mod K``); for each candidate ridge ``--alpha`` each fold is predicted by a router
(TF-IDF + per-model ridge heads, exactly as ``switchyard train router --kind nmodel`` fits it) trained on
the other folds. On these out-of-fold predictions, at the given prices:

- the router's AIQ beside the zero router's and the oracle's (``training.cost_quality``);
- ``tolerance_at_best_single_cost``: the smallest tolerance whose cost is at most the best single model's
  (what ``switchyard calibrate --max-cost`` would set for that budget), and the quality it reaches;
- ``tolerance_matching_best_single``: the largest tolerance (the cheapest setting) whose quality still
  reaches the best single model's, and its cost (tolerance null = infinite: a cheapest model on every row);
- the mean squared error of the predicted scores.

Run: ``python -m training.nmodel_select --data F --alpha 1 --alpha 3 --price MODEL=USD ... [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from training import cost_quality as cq
from training.data import eval_bucket, eval_percent_of, is_eval_row, load_routing_rows
from training.router_cmd import model_prices


def out_of_fold(texts: list[str], scores: np.ndarray, fold: np.ndarray, alphas: Sequence[float],
                models: list[str]) -> dict[float, np.ndarray]:
    """``{alpha: predicted scores [n, k]}``, each row predicted by a router fitted without its fold."""
    from routers.features import HashedTfidf
    from routers.scorers import NModelScorer

    out = {a: np.zeros_like(scores) for a in alphas}
    for f in np.unique(fold):
        train, held = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        fit_texts = [texts[i] for i in train]
        tfidf = HashedTfidf(n_features=2**18).fit(fit_texts)
        held_texts = [texts[i] for i in held]
        for a in alphas:
            nm = NModelScorer(models, alpha=a).fit(fit_texts, scores[train], tfidf)
            out[a][held] = nm.predict_batch(held_texts)
        print(f"  fold {int(f)}: fitted on {len(train)} rows, predicted {len(held)}", file=sys.stderr)
    return out


def assess(pred: np.ndarray, true: np.ndarray, prices: np.ndarray) -> dict:
    """The figures of one candidate on out-of-fold predictions (see the module docstring)."""

    c_min, c_max = float(prices.min()), float(prices.max())
    singles = cq.single_points(true, prices)
    best = max(singles, key=lambda p: p.quality)
    points = cq.router_points(pred, true, prices)
    router_hull = cq.hull(points)
    within = [p for p in points if p.cost <= best.cost + 1e-12]
    eq = min(within, key=lambda p: p.setting)
    reach = [p for p in points if p.quality >= best.quality]
    match = max(reach, key=lambda p: p.setting) if reach else None
    return {
        "mse": round(float(((pred - true) ** 2).mean()), 5),
        "aiq_router": round(cq.aiq(router_hull, c_min, c_max), 4),
        "aiq_random": round(cq.aiq(cq.hull(singles), c_min, c_max), 4),
        "aiq_oracle": round(cq.aiq(cq.hull(cq.oracle_points(true, prices)), c_min, c_max), 4),
        "best_single": {"cost_per_1k": round(best.cost, 6), "quality": round(best.quality, 4)},
        "router_hull_quality_at_best_single_cost": round(cq.quality_at(router_hull, best.cost), 4),
        "tolerance_at_best_single_cost": _setting(eq),
        "tolerance_matching_best_single": None if match is None else _setting(match),
    }


def _setting(p: cq.Point) -> dict:
    """A router setting as JSON: tolerance null = infinite (a cheapest model on every row)."""
    return {"tolerance": round(p.setting, 6) if np.isfinite(p.setting) else None,
            "cost_per_1k": round(p.cost, 6), "quality": round(p.quality, 4)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.nmodel_select", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="rows with model_scores (only the training split is read)")
    p.add_argument("--alpha", action="append", type=float, default=[], help="candidate ridge alpha (repeatable)")
    p.add_argument("--price", action="append", default=[], metavar="MODEL=USD", help="USD per 1k requests")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--eval-fraction", type=float, default=0.2, help="as at train time: these rows are never read")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    alphas = args.alpha or [3.0]
    pct = eval_percent_of(args.eval_fraction)
    rows = [r for r in load_routing_rows(args.data, require="models") if not is_eval_row(r, pct)]
    models = sorted({m for r in rows for m in r.model_scores})
    prices_by = model_prices(args, models)
    if set(prices_by) != set(models):
        raise SystemExit(f"price every model (--price MODEL=USD); missing {sorted(set(models) - set(prices_by))}")
    prices = np.asarray([prices_by[m] for m in models], dtype=np.float64)
    texts = [r.prompt for r in rows]
    true = np.asarray([[r.model_scores[m] for m in models] for r in rows], dtype=np.float64)
    fold = np.asarray([eval_bucket(r.split_key + "#fold") % args.folds for r in rows])
    preds = out_of_fold(texts, true, fold, alphas, models)
    report = {"num_rows": len(rows), "folds": args.folds, "models": models, "prices_per_1k": prices_by,
              "candidates": {f"alpha={a:g}": assess(preds[a], true, prices) for a in alphas}}
    print(f"{'candidate':<14} {'mse':>8} {'AIQ':>7} {'random':>7} {'oracle':>7} {'q@best$':>8} "
          f"{'tol@best$':>10} {'q':>7} {'tol=best q':>11} {'cost':>8}")
    for name, r in report["candidates"].items():
        eq, match = r["tolerance_at_best_single_cost"], r["tolerance_matching_best_single"]
        print(f"{name:<14} {r['mse']:>8.5f} {r['aiq_router']:>7.4f} {r['aiq_random']:>7.4f} {r['aiq_oracle']:>7.4f} "
              f"{r['router_hull_quality_at_best_single_cost']:>8.4f} {_tol(eq['tolerance']):>10} {eq['quality']:>7.4f} "
              f"{'never' if match is None else _tol(match['tolerance']):>11} "
              f"{'' if match is None else format(match['cost_per_1k'], '.4g'):>8}")
    if args.json:
        print(json.dumps(report))
    return 0


def _tol(t: float | None) -> str:
    return "inf" if t is None else format(t, ".4g")


if __name__ == "__main__":
    sys.exit(main())
