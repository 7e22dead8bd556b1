"""Cascade escalation rule: confidence summary, thresholds, precedence of settings over the artifact."""

import math

import pytest

from gateway.cascade import (
    DEFAULT_RULE,
    CascadeRule,
    Confidence,
    resolve_rule,
)


def test_confidence_from_logprobs():
    c = Confidence.from_logprobs([-0.1, -0.5, -2.4])
    assert c.num_tokens == 3 and c.min_logprob == -2.4 and c.mean_logprob == pytest.approx(-1.0)
    empty = Confidence.from_logprobs([])
    assert empty.num_tokens == 0 and empty.mean_logprob == -math.inf
    with pytest.raises(ValueError):
        Confidence.from_logprobs([0.5])
    assert Confidence.from_logprobs([1e-7, -1.0]).mean_logprob == pytest.approx(-0.5)
    assert Confidence.from_logprobs([float("nan"), -1.0]).min_logprob == -math.inf


def test_rule_mean_and_min():
    rule = CascadeRule(min_mean_logprob=-1.0, min_token_logprob=-5.0)
    assert not rule.should_escalate(Confidence(-0.5, -3.0, 4))
    assert rule.should_escalate(Confidence(-1.5, -3.0, 4))
    assert rule.should_escalate(Confidence(-0.5, -6.0, 4))
    assert rule.should_escalate(Confidence.from_logprobs([]))
    assert not CascadeRule().should_escalate(Confidence(-9.0, -20.0, 3))
    with pytest.raises(ValueError):
        CascadeRule(min_mean_logprob=0.3)


def test_settings_override_artifact():
    art = {"min_mean_logprob": -1.2, "min_token_logprob": -6.0}
    assert resolve_rule(None, None, None) == DEFAULT_RULE
    assert resolve_rule(None, None, art) == CascadeRule(-1.2, -6.0)
    assert resolve_rule(-0.5, None, art) == CascadeRule(-0.5, -6.0)
