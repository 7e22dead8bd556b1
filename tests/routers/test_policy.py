"""RoutePolicy (model auto): hints, no-router cascade, escalate band."""

import pytest

from gateway.settings import CascadeSettings, RoutingSettings
from routers.policy import (
    RouteHint,
    RoutePolicy,
    parse_hint,
    threshold_for_share,
)


class FakeRouter:
    def __init__(self, score, threshold=0.5, share_table=None):
        self._score = score
        self.threshold = threshold
        self.meta = {"calibration": {"share_table": share_table}} if share_table else {}

    def score(self, text):
        return self._score


def policy(score=None, **routing):
    router = None if score is None else FakeRouter(score, share_table=[[0.1, 0.2], [0.5, 0.5], [0.9, 0.8]])
    return RoutePolicy(RoutingSettings(**routing), router=router)


def test_no_router_cascades_or_slm_when_cascade_off():
    assert policy().decide("x").route == "slm_then_escalate"
    off = policy(cascade=CascadeSettings(mode="off"))
    assert off.decide("x").route == "slm"


def test_router_threshold_and_band():
    assert policy(score=0.3).decide("x").route == "llm"
    d = policy(score=0.55).decide("x")
    assert d.route == "slm_then_escalate" and d.pool == "slm" and d.score == 0.55 and d.threshold == 0.5
    assert policy(score=0.7).decide("x").route == "slm"
    assert policy(score=0.55, escalate_band=0.0).decide("x").route == "slm"
    # settings threshold overrides the artifact's
    assert policy(score=0.55, threshold=0.6).decide("x").route == "llm"


def test_quality_hints():
    assert policy(score=0.0).decide("x", RouteHint(quality="low")).route == "slm"
    assert policy(score=0.99).decide("x", RouteHint(quality="high")).route == "llm"
    assert policy(score=0.3).decide("x", RouteHint(quality="medium")).route == "llm"
    # max_strong_share picks the threshold from the calibration table
    p = policy(score=0.3)
    assert p.decide("x", RouteHint(max_strong_share=0.1)).route == "slm_then_escalate"  # t = 0.2
    assert p.decide("x", RouteHint(max_strong_share=0.9)).route == "llm"  # t = 0.8
    assert p.decide("x", RouteHint(max_strong_share=0.0)).route == "slm"
    assert threshold_for_share([[0.1, 0.2], [0.5, 0.5]], 0.3, 0.5) == pytest.approx(0.35)


def test_parse_hint_body_and_header():
    assert parse_hint({"quality": "low"}) == RouteHint(quality="low")
    assert parse_hint({"max_strong_share": 0.25}) == RouteHint(max_strong_share=0.25)
    assert parse_hint(None, {"X-Switchyard-Quality": "HIGH"}) == RouteHint(quality="high")
    assert parse_hint(None, {"x-switchyard-max-strong-share": "0.4"}) == RouteHint(max_strong_share=0.4)
    assert parse_hint({"quality": "low"}, {"x-switchyard-quality": "high"}).quality == "low"  # body wins
    assert parse_hint(None, {"other": "1"}) is None
    for bad in ({"quality": "ultra"}, {"max_strong_share": 2}, {"colour": 1}, "low",
                {"quality": "low", "max_strong_share": 0.1}):
        with pytest.raises(ValueError):
            parse_hint(bad)
    with pytest.raises(ValueError, match="x-switchyard-max-strong-share"):
        parse_hint(None, {"x-switchyard-max-strong-share": "lots"})


class FakeNModelRouter:
    models = ["m-big", "m-mid", "m-tiny"]
    tolerance = 0.05
    threshold = 0.5
    meta: dict = {}

    def __init__(self, predicted):
        self.predicted = predicted

    def predict(self, text):
        return dict(self.predicted)


POOLS = {"m-tiny": ("tiny", 1.0), "m-mid": ("mid", 5.0), "m-big": ("big", 20.0)}


def nmodel_policy(predicted, **routing):
    routing = {"slm_pool": "tiny", "llm_pool": "big", **routing}
    return RoutePolicy(RoutingSettings(**routing), router=FakeNModelRouter(predicted), pools=POOLS)


def test_nmodel_picks_the_cheapest_pool_within_the_tolerance():
    pred = {"m-tiny": 0.70, "m-mid": 0.86, "m-big": 0.90}
    d = nmodel_policy(pred).decide("x")  # the artifact's tolerance 0.05: mid (0.86 >= 0.85) beats big on cost
    assert (d.route, d.pool, d.tolerance) == ("pool", "mid", 0.05)
    assert d.scores == {"tiny": 0.7, "mid": 0.86, "big": 0.9} and d.score is None and d.threshold is None
    assert "within 0.05" in d.reason
    assert nmodel_policy(pred, quality_tolerance=0.0).decide("x").pool == "big"  # the setting wins
    assert nmodel_policy(pred, quality_tolerance=0.2).decide("x").pool == "tiny"
    tie = nmodel_policy({"m-tiny": 0.5, "m-mid": 0.5, "m-big": 0.5}, quality_tolerance=0.0)
    assert tie.decide("x").pool == "tiny"  # equal predictions: the cheaper pool


def test_nmodel_hints():
    p = nmodel_policy({"m-tiny": 0.70, "m-mid": 0.86, "m-big": 0.90})
    assert (p.decide("x", RouteHint(quality="low")).pool, p.decide("x", RouteHint(quality="high")).pool) == (
        "tiny", "big")
    assert p.decide("x", RouteHint(quality="medium")).pool == "mid"
    d = p.decide("x", RouteHint(max_strong_share=0.1))
    assert d.pool == "mid" and "max_strong_share=0.1 ignored" in d.reason
