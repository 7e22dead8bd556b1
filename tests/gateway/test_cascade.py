"""Cascade escalation rule: confidence summary, thresholds, precedence of settings over the artifact."""

import math

import pytest

from backends.types import Delta, TokenLogprob
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


# ------------------------------------------------------------------------------------------- tool calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _call_deltas(name: str, arguments: str, logprob: float | None) -> list[Delta]:
    """A call streamed in OpenAI pieces: id + name first, then the arguments in two fragments."""
    lps = (TokenLogprob(token="x", logprob=logprob),) if logprob is not None else ()
    half = len(arguments) // 2
    return [Delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": name, "arguments": ""}}], logprobs=lps),
            Delta(tool_calls=[{"index": 0, "function": {"arguments": arguments[:half]}}], logprobs=lps),
            Delta(tool_calls=[{"index": 0, "function": {"arguments": arguments[half:]}}], logprobs=lps,
                  finish_reason="tool_calls", is_final=True)]


@pytest.mark.parametrize(("name", "arguments", "problem"), [
    ("get_weather", '{"city": "Paris"', "not JSON"),
    ("get_wether", '{"city": "Paris"}', "unknown tool"),
    ("get_weather", '{"town": "Paris"}', "fail its schema"),
])
def test_an_invalid_tool_call_escalates(name, arguments, problem):
    reason = DEFAULT_RULE.judge(_call_deltas(name, arguments, -0.01), TOOLS)
    assert reason is not None and reason.startswith("invalid_tool_call") and problem in reason


def test_a_valid_tool_call_is_judged_by_its_own_token_logprobs():
    good = '{"city": "Paris"}'
    assert DEFAULT_RULE.judge(_call_deltas("get_weather", good, -0.01), TOOLS) is None
    unsure = DEFAULT_RULE.judge(_call_deltas("get_weather", good, -3.0), TOOLS)
    assert unsure is not None and "log-prob" in unsure
    # a backend that sends no logprobs for call tokens: a valid call is kept (was: always escalated)
    assert DEFAULT_RULE.judge(_call_deltas("get_weather", good, None), TOOLS) is None
