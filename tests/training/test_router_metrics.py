"""APGR / CPT / PGR against hand-computed values, and the deterministic id-hash split."""

import numpy as np
import pytest

from training.data import RoutingRow, eval_bucket, split_rows
from training.evaluate import apgr, cpt, curve, metrics, oracle_scores, random_scores


def test_curve_hand_computed():
    # 4 rows; gains strong-weak = [1, 0, 1, -1]; weak quality 0.5, strong 0.75 (gap 0.25)
    strong = np.array([1, 1, 1, 0])
    weak = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.2, 0.5])  # routing order: row0, row2, row3, row1
    c = curve(scores, strong, weak)
    assert c.shares.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert np.allclose(c.quality, [0.5, 0.75, 1.0, 0.75, 0.75])
    assert np.allclose(c.pgr, [0, 1, 2, 1, 1])
    # trapezoids: 0.25 * (0+1)/2 + 0.25*(1+2)/2 + 0.25*(2+1)/2 + 0.25*(1+1)/2 = 0.125+0.375+0.375+0.25
    assert apgr(c) == pytest.approx(1.125)
    assert cpt(c, 0.5) == 0.25
    assert cpt(c, 2.0) == 0.5
    assert cpt(c, 3.0) == 1.0


def test_ties_move_together_and_constant_scorer_is_diagonal():
    strong = np.array([1, 1, 0, 1])
    weak = np.array([0, 1, 0, 0])
    c = curve(np.zeros(4), strong, weak)
    assert c.shares.tolist() == [0.0, 1.0]
    assert apgr(c) == pytest.approx(0.5)
    assert cpt(c, 0.5) == 1.0
    c2 = curve(np.array([0.0, 0.0, 1.0, 1.0]), strong, weak)
    assert c2.shares.tolist() == [0.0, 0.5, 1.0]
    assert np.allclose(c2.pgr, [0.0, 0.5, 1.0])


def test_random_near_half_oracle_high():
    rng = np.random.default_rng(1)
    strong = (rng.random(5000) < 0.8).astype(float)
    weak = (rng.random(5000) < 0.6).astype(float)
    assert metrics(random_scores(5000, seed=3), strong, weak).apgr == pytest.approx(0.5, abs=0.05)
    o = metrics(oracle_scores(strong, weak), strong, weak)
    assert o.apgr > 1.0 and o.cpt50 < 0.3


def test_threshold_share():
    strong = np.array([1, 1, 1, 1])
    weak = np.array([0, 0, 1, 1])
    m = metrics(np.array([0.1, 0.2, 0.8, 0.9]), strong, weak, threshold=0.5)
    assert m.strong_share_at_threshold == 0.5 and m.quality_at_threshold == 1.0
    # PGR at shares 0, .25, .5, .75, 1 = 0, .5, 1, 1, 1 → trapezoids .0625 + .1875 + .25 + .25
    assert m.apgr == pytest.approx(0.75)


def test_curve_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        curve([0.1, 0.2], np.array([1]), np.array([0, 1]))


def test_split_is_deterministic_by_id_then_prompt():
    rows = [RoutingRow(prompt=f"p{i}", source="s", row_id=f"id{i}", strong_score=1, weak_score=0) for i in range(500)]
    train, held = split_rows(rows, 0.2)
    assert len(train) + len(held) == 500
    assert {r.row_id for r in held} == {r.row_id for r in rows if eval_bucket(r.row_id) < 20}
    assert 60 < len(held) < 140
    no_id = RoutingRow(prompt="what is 2+2", source="s", row_id=None, strong_score=1, weak_score=1)
    assert no_id.split_key == "what is 2+2"
    assert eval_bucket("abc") == eval_bucket("abc") == int(__import__("hashlib").sha1(b"abc").hexdigest(), 16) % 100
