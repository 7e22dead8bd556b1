"""N-model quality vs cost (training/cost_quality.py): the hull, AIQ and the sweeps, on hand-made numbers."""

import numpy as np
import pytest

from routers.scorers import choose_indices, choose_model
from training import cost_quality as cq
from training.calibrate import tolerance_for_cost


def pts(*xy):
    return [cq.Point(c, q, float("nan")) for c, q in xy]


def test_hull_is_upper_convex_and_non_decreasing():
    # (1, 0.2) lies under the chord from (0, 0) to (2, 1); (3, 0.8) is after the best point: dropped
    assert cq.hull(pts((0, 0), (1, 0.2), (2, 1), (3, 0.8))).tolist() == [[0, 0], [2, 1]]
    # a point above the chord stays; of two points at one cost the better one counts
    assert cq.hull(pts((0, 0), (0, 0.3), (1, 0.9), (2, 1))).tolist() == [[0, 0.3], [1, 0.9], [2, 1]]
    assert cq.hull(pts((1, 0.5))).tolist() == [[1, 0.5]]


def test_aiq_quality_at_and_cost_to_reach():
    h = cq.hull(pts((0, 0), (2, 1)))
    assert cq.aiq(h, 0, 2) == pytest.approx(0.5)
    assert cq.aiq(h, 0, 4) == pytest.approx(0.75)  # flat at 1 from cost 2 to 4
    assert cq.quality_at(h, 1) == pytest.approx(0.5) and cq.quality_at(h, 3) == 1
    assert np.isnan(cq.quality_at(h, -1))
    assert cq.cost_to_reach(h, 0.5) == pytest.approx(1.0) and cq.cost_to_reach(h, 1.01) is None
    with pytest.raises(ValueError, match="above the range's start"):
        cq.aiq(h, -1, 2)
    assert cq.aiq(cq.hull(pts((3, 0.4))), 3, 3) == pytest.approx(0.4)  # one price for every model


# three rows, three models priced 1, 2, 4; the middle model is best on average
TRUE = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
PRICES = np.array([1.0, 2.0, 4.0])


def test_single_models_oracle_and_zero_router():
    singles = cq.single_points(TRUE, PRICES)
    assert [(p.cost, p.quality) for p in singles] == [(1, 1 / 3), (2, 2 / 3), (4, 1)]
    oracle = cq.hull(cq.oracle_points(TRUE, PRICES))
    assert oracle[0].tolist() == [1, 1 / 3]  # λ = inf: the cheapest model everywhere
    assert oracle[-1].tolist() == pytest.approx([7 / 3, 1])  # λ = 0: the cheapest model that is right per row
    zero = cq.hull(singles)
    assert cq.aiq(oracle, 1, 4) > cq.aiq(zero, 1, 4)


def test_router_sweep_uses_the_serving_rule():
    pred = np.array([[0.9, 0.95, 1.0], [0.1, 0.9, 0.95], [0.0, 0.2, 0.9]])
    points = cq.router_points(pred, TRUE, PRICES, tolerances=[0.0, 0.1, np.inf])
    assert [(p.cost, p.quality) for p in points] == [(4, 1), pytest.approx((7 / 3, 1)), (1, 1 / 3)]
    for t in (0.0, 0.06, 0.1, 0.75, np.inf):  # one rule: the vectorised picks are choose_model's
        picks = choose_indices(pred, PRICES, t)
        for row, j in zip(pred, picks, strict=True):
            named = dict(zip("abc", row, strict=True))
            assert choose_model(named, dict(zip("abc", PRICES, strict=True)), t).model == "abc"[j]
    assert choose_indices(np.array([[0.5, 0.5, 0.4]]), np.array([1.0, 1.0, 0.5]), 0.0).tolist() == [0]


def test_tolerance_for_cost_is_the_best_quality_the_budget_buys():
    pred = np.array([[0.9, 0.95, 1.0], [0.1, 0.9, 0.95], [0.0, 0.2, 0.9]] * 10)
    c = tolerance_for_cost(pred, pred, PRICES, max_cost_per_1k=2.5)
    assert c.expected_cost_per_1k <= 2.5 and c.realised_cost_per_1k == c.expected_cost_per_1k
    assert c.tolerance > 0.05  # at 0.05 the first row still goes to the dearest model: 4 + 4 + 4
    looser = tolerance_for_cost(pred, pred, PRICES, max_cost_per_1k=1.0)
    assert looser.tolerance > c.tolerance and looser.expected_cost_per_1k == 1.0
    assert tolerance_for_cost(pred, pred, PRICES, max_cost_per_1k=10).tolerance == 0.0
    with pytest.raises(ValueError, match="below the cheapest model's cost"):
        tolerance_for_cost(pred, pred, PRICES, max_cost_per_1k=0.5)


def test_nmodel_select_reads_only_the_training_split(tmp_path, capsys):
    import json

    from tests.training.router_synth import synth_rows
    from training.data import eval_bucket
    from training.nmodel_select import main

    rows = []
    for r in synth_rows(400, seed=5, noise=0.0):
        hard = r["weak_score"] < r["strong_score"]
        if eval_bucket(r["id"]) < 20:  # the eval split says the opposite: a run that read it would be confused
            hard = not hard
        rows.append({"id": r["id"], "prompt": r["prompt"], "model_scores": {"small": 0.2 if hard else 0.9, "big": 0.9}})
    data = tmp_path / "n.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--data", str(data), "--alpha", "0.3", "--alpha", "3", "--folds", "3", "--price", "small=1",
                 "--price", "big=4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["num_rows"] == sum(eval_bucket(r["id"]) >= 20 for r in rows)
    for cand in rep["candidates"].values():
        assert cand["aiq_random"] < cand["aiq_router"] <= cand["aiq_oracle"] + 1e-9
        assert cand["tolerance_matching_best_single"]["cost_per_1k"] < 3.0
