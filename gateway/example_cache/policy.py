"""The IC-Cache policy: which answers are admitted, which examples are shown, and which entries go first.

Admission: only answers with ``finish_reason == "stop"`` that passed the guard and have non-blank text
(``admission_refusal`` names the stat of a refused one); near-duplicates are the store's check.

Selection: the index's candidates, best first, are taken while they fit the token budget; one that does not
fit is skipped (``select_within_budget``). ``format_examples`` shows them to the SLM, the most similar last.

Eviction is LFU with dynamic aging (LFU-DA) and utility aware: an entry's rank starts at the namespace's
``floor`` + 1 (its admission counts as one use) and moves by +1 per retrieval, +2 per kept answer, -4 per
escalated answer. When a namespace is over ``max_entries_per_namespace`` the lowest rank goes first, ties
oldest first (ids are time ordered), and the floor rises to the evicted rank, so proven examples stay
while a full cache still turns over. An example's ``utility`` is the posterior mean of P(kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gateway.example_cache.types import Entry, Example

USE_WEIGHT = 1.0
KEPT_WEIGHT = 2.0
ESCALATED_WEIGHT = -4.0


def utility(kept: int, escalated: int) -> float:
    """Posterior mean of P(kept) under a Beta(1, 1) prior: 0.5 when nothing is known."""
    return (kept + 1.0) / (kept + escalated + 2.0)


def retention_score(uses: int, kept: int, escalated: int) -> float:
    """What an entry's statistics add to its eviction rank (lowest rank is evicted first)."""
    return USE_WEIGHT * uses + KEPT_WEIGHT * kept + ESCALATED_WEIGHT * escalated


def initial_rank(floor: float, entry: Entry) -> float:
    return floor + USE_WEIGHT + retention_score(entry.uses, entry.kept, entry.escalated)


def admission_refusal(text: str, answer: str, finish_reason: str | None, guard_ok: bool) -> str | None:
    """The stat that counts why an answer may not be admitted, or None when it may."""
    if finish_reason != "stop":
        return "rejected_finish"
    if not guard_ok:
        return "rejected_guard"
    if not text.strip() or not answer.strip():
        return "rejected_empty"
    return None


def approx_tokens(text: str) -> int:
    """Token estimate without a tokenizer (~4 characters per token for English BPE vocabularies)."""
    return max(1, (len(text) + 3) // 4)


def num_candidates(k: int) -> int:
    """How many nearest neighbours to fetch for ``k`` examples (some are skipped: expired, over budget)."""
    return 4 * k + 8


def select_within_budget(candidates: Iterable[Example], k: int, max_tokens: int) -> list[Example]:
    """Best-first candidates → at most k within ``max_tokens`` (one that doesn't fit is skipped)."""
    budget = max_tokens
    chosen: list[Example] = []
    for ex in candidates:
        if len(chosen) >= k:
            break
        cost = approx_tokens(ex.request_text) + approx_tokens(ex.answer)
        if cost > budget:
            continue
        budget -= cost
        chosen.append(ex)
    return chosen


def format_examples(examples: Sequence[Example]) -> list[dict[str, str]]:
    """Chat messages to prepend before the caller's messages: one user/assistant pair per example,
    the most similar last (closest to the real question)."""
    messages: list[dict[str, str]] = []
    for ex in reversed(list(examples)):
        messages.append({"role": "user", "content": ex.request_text})
        messages.append({"role": "assistant", "content": ex.answer})
    return messages
