"""RoutePolicy: explicit model wins, hints, no-router cascade, escalate band."""

import pytest

from gateway.settings import CascadeSettings, RoutingSettings, settings_from_dict
from routers.policy import (
    RouteDecision,
    RouteHint,
    RoutePolicy,
    UnknownModel,
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


def test_explicit_model_always_wins():
    d = policy(score=0.0).decide("hard question", "llm", hint="low")
    assert d == RouteDecision("explicit", "llm", None, None, "explicit model 'llm'")
    with pytest.raises(UnknownModel, match="does not exist"):
        policy().decide("x", "gpt-9")


def test_no_router_cascades_or_slm_when_cascade_off():
    assert policy().decide("x", "auto").route == "slm_then_escalate"
    off = policy(cascade=CascadeSettings(mode="off"))
    assert off.decide("x", "auto").route == "slm"


def test_router_threshold_and_band():
    assert policy(score=0.3).decide("x", "auto").route == "llm"
    d = policy(score=0.55).decide("x", "auto")
    assert d.route == "slm_then_escalate" and d.pool == "slm" and d.score == 0.55 and d.threshold == 0.5
    assert policy(score=0.7).decide("x", "auto").route == "slm"
    assert policy(score=0.55, escalate_band=0.0).decide("x", "auto").route == "slm"
    # settings threshold overrides the artifact's
    assert policy(score=0.55, threshold=0.6).decide("x", "auto").route == "llm"


def test_quality_hints():
    assert policy(score=0.0).decide("x", "auto", hint="low").route == "slm"
    assert policy(score=0.99).decide("x", "auto", hint="high").route == "llm"
    assert policy(score=0.3).decide("x", "auto", hint="medium").route == "llm"
    # max_strong_share picks the threshold from the calibration table
    p = policy(score=0.3)
    assert p.decide("x", "auto", RouteHint(max_strong_share=0.1)).route == "slm_then_escalate"  # t = 0.2
    assert p.decide("x", "auto", RouteHint(max_strong_share=0.9)).route == "llm"  # t = 0.8
    assert p.decide("x", "auto", RouteHint(max_strong_share=0.0)).route == "slm"
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


def test_from_settings_maps_model_names_to_pools():
    s = settings_from_dict({"pools": [{"name": "slm", "model": "smollm2-135m"},
                                      {"name": "llm", "model": "gemma3-270m",
                                       "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}}]})
    p = RoutePolicy.from_settings(s)
    assert p.decide("x", "gemma3-270m").pool == "llm"
    assert p.decide("x", "slm").pool == "slm"
    assert p.prices["llm"] == pytest.approx(1000 * (500 * 1.0 + 500 * 2.0) / 1e6)
