"""The IC-Cache policy's pure parts: how examples are shown, utility, ranks, the token budget, admission."""

from __future__ import annotations

import pytest

from gateway.example_cache.policy import (
    admission_refusal,
    format_examples,
    initial_rank,
    select_within_budget,
    utility,
)
from gateway.example_cache.types import Entry, Example


def test_format_examples_most_similar_last():
    exs = [Example("1", "q1", "a1", 0.9, "llm", 0.5), Example("2", "q2", "a2", 0.8, "llm", 0.5)]
    assert format_examples(exs) == [
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
    ]


def test_utility_and_initial_rank_exact_values():
    assert utility(0, 0) == 0.5 and utility(2, 1) == pytest.approx(3 / 5)
    entry = Entry("id", "t", "q", "a", "llm", 0.0, uses=3, kept=2, escalated=1)
    assert initial_rank(10.0, entry) == 10.0 + 1 + 3 + 2 * 2 - 4  # admission counts as one use


def test_selection_skips_what_does_not_fit_the_token_budget():
    big, small = Example("1", "q" * 40, "a" * 40, 0.9, "m", 0.5), Example("2", "q", "a", 0.8, "m", 0.5)
    assert select_within_budget([big, small], k=2, max_tokens=10) == [small]  # 20 tokens never fit
    assert select_within_budget([small, small, small], k=2, max_tokens=10) == [small, small]


def test_admission_refusals():
    assert admission_refusal("q", "a", "stop", True) is None
    assert admission_refusal("q", "a", "length", True) == "rejected_finish"
    assert admission_refusal("q", "a", "stop", False) == "rejected_guard"
    assert admission_refusal(" ", "a", "stop", True) == "rejected_empty"
