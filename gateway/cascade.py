"""The cascade's escalation rule: is the SLM's own answer confident enough to return?

Pure functions and small classes, no I/O — the pipeline (gateway/pipeline.py) collects the SLM answer's
token log-probabilities and asks ``CascadeRule.should_escalate``.

Thresholds come from calibration (``fit_cascade_rule`` in ``training/calibrate.py``: pick ``min_mean_logprob``
so a target share of held-out SLM answers escalates; stored in the router artifact's ``meta["cascade"]``);
gateway settings (``routing.cascade.min_mean_logprob`` / ``min_token_logprob``) override them. With neither, the
``DEFAULT_RULE`` below is used (documented constants, the fallback for a deployment that has not
calibrated yet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Confidence:
    """Summary of an answer's token log-probabilities (natural log)."""

    mean_logprob: float
    min_logprob: float
    num_tokens: int

    @classmethod
    def from_logprobs(cls, logprobs: Sequence[float]) -> Confidence:
        """Empty answers have ``num_tokens = 0`` and mean/min of ``-inf`` (they always escalate).
        Float noise just above 0 (<= 0.01) counts as 0; NaN counts as ``-inf`` (an upstream that sends
        garbage escalates rather than failing the request); larger positive values raise ValueError."""
        vals = []
        for x in logprobs:
            if x is None:
                continue
            v = float(x)
            if math.isnan(v):
                v = -math.inf
            elif v > 0.01:
                raise ValueError(f"log-probabilities must be <= 0, got {v}")
            vals.append(min(v, 0.0))
        if not vals:
            return cls(mean_logprob=-math.inf, min_logprob=-math.inf, num_tokens=0)
        return cls(mean_logprob=sum(vals) / len(vals), min_logprob=min(vals), num_tokens=len(vals))


@dataclass(frozen=True)
class CascadeRule:
    """Escalate when the mean token log-prob is below ``min_mean_logprob`` or any token's log-prob is
    below ``min_token_logprob`` (either threshold may be None = not checked)."""

    min_mean_logprob: float | None = None
    min_token_logprob: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_mean_logprob", "min_token_logprob"):
            v = getattr(self, name)
            if v is not None and (math.isnan(v) or v > 0):
                raise ValueError(f"{name} must be <= 0, got {v}")

    def should_escalate(self, conf: Confidence) -> bool:
        if conf.num_tokens == 0:
            return True
        if self.min_mean_logprob is not None and conf.mean_logprob < self.min_mean_logprob:
            return True
        if self.min_token_logprob is not None and conf.min_logprob < self.min_token_logprob:
            return True
        return False

    def judge(self, deltas: Sequence[Any], tools: list[dict[str, Any]] | None = None) -> str | None:
        """The reason to escalate a whole answer (Deltas of every choice), or None to keep it. Any choice with a
        tool call that does not parse, names a tool not in ``tools`` or fails the tool's schema escalates with
        ``invalid_tool_call``; otherwise any choice whose token log-probabilities (those of its call's tokens
        too) fail the rule escalates. A valid call from a backend that sends no log-probabilities for call
        tokens is kept: its validity is all there is to judge."""
        from backends.tool_calls import invalid_call_reason, tools_of
        from gateway.streaming import ToolCalls

        declared = tools_of(tools)
        for index in sorted({d.index for d in deltas}):
            merged = ToolCalls()
            for d in deltas:
                if d.index == index and d.tool_calls:
                    merged.add(d.tool_calls)
            for call in merged.whole():
                problem = invalid_call_reason(call, declared)
                if problem is not None:
                    return f"invalid_tool_call: {problem}"
            values = [lp.logprob for d in deltas if d.index == index for lp in d.logprobs]
            if merged.calls and not values:
                continue
            if self.should_escalate(Confidence.from_logprobs(values)):
                return "SLM answer unsure (low token log-probabilities)"
        return None

    def as_dict(self) -> dict[str, float | None]:
        return {"min_mean_logprob": self.min_mean_logprob, "min_token_logprob": self.min_token_logprob}


# Uncalibrated fallback: a mean token probability below ~0.45 or a token below ~0.1% probability.
DEFAULT_RULE = CascadeRule(min_mean_logprob=-0.8, min_token_logprob=-7.0)


def resolve_rule(
    settings_mean: float | None,
    settings_token: float | None,
    artifact_cascade: dict | None,
) -> CascadeRule:
    """Settings override the artifact's calibrated thresholds; with neither, ``DEFAULT_RULE``."""
    art = artifact_cascade or {}
    if settings_mean is None and settings_token is None and not art:
        return DEFAULT_RULE
    return CascadeRule(
        min_mean_logprob=settings_mean if settings_mean is not None else art.get("min_mean_logprob"),
        min_token_logprob=settings_token if settings_token is not None else art.get("min_token_logprob"),
    )
