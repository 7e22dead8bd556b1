"""Calibration by quantile: the cascade's thresholds hit a target escalation share on held-out answers."""

import numpy as np
import pytest

from gateway.cascade import Confidence
from training.calibrate import escalation_share, fit_cascade_rule


def test_fit_hits_target_share_on_heldout():
    rng = np.random.default_rng(0)

    def sample(n):
        return [Confidence.from_logprobs(-rng.gamma(1.0, 0.4, size=rng.integers(5, 40))) for _ in range(n)]

    rule = fit_cascade_rule(sample(3000), escalate_share=0.2, token_quantile=None)
    assert rule.min_token_logprob is None
    assert escalation_share(rule, sample(3000)) == pytest.approx(0.2, abs=0.02)
    with pytest.raises(ValueError):
        fit_cascade_rule([], 0.2)
