"""N-gram speculation (prompt lookup, vLLM's ``ngram`` method): draft tokens a sequence's own text predicts.

For a decoding sequence, the proposer finds the longest suffix n-gram of its tokens (n from ``max_n`` down to
``min_n``) that occurred earlier in its prompt + output (the most recent such occurrence) and proposes the
up-to-k tokens that followed it. The scheduler gives a sequence with drafts a chunk of 1 + k tokens starting
at its last committed token; the sampler (``layers/sampler.py`` ``verify``) scores every position in the same
forward pass and commits the accepted drafts plus one token of the target model, so each step commits >= 1.

Adaptive k, per sequence (``DraftState``): after a verification that accepted ``a`` of ``k`` drafts, the next
proposal has up to ``a + 1`` drafts when some were rejected, ``k + 1`` when all were accepted (capped by
``num_draft_tokens``). An exponential moving average of the acceptance rate (weight 0.2 per verification,
starting at 1) turns drafting off for the rest of the sequence once it falls below ``MIN_ACCEPTANCE``
(about 11 consecutive fully rejected drafts): a sequence whose text does not repeat stops paying for it.
Steps where no n-gram matches draft nothing and cost nothing.

Structured output: a draft is cut at the first token its grammar matcher refuses (checked with
``accept_token`` and undone with ``rollback``), and after a token that terminates the grammar; the model
runner fills the grammar mask of every drafted position the same way, so verification samples exactly what
the grammar allows there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MIN_ACCEPTANCE = 0.1  # drafting stops for a sequence whose acceptance-rate average falls below this
EMA_WEIGHT = 0.2


def ngram_lookup(token_ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The up-to-``k`` tokens that followed the most recent earlier occurrence of the longest suffix n-gram
    (``max_n`` >= n >= ``min_n``) of ``token_ids``; [] when none occurs."""
    num = len(token_ids)
    if k < 1 or num < min_n + 1:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, num - 1), min_n - 1, -1):
        windows = sliding_window_view(arr[:-1], n)  # start i <= num-1-n: a token follows every window
        hits = np.flatnonzero((windows == arr[num - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


@dataclass
class DraftState:
    """One sequence's drafting state: the next proposal's size, its acceptance average, whether it drafts."""

    k: int
    acceptance: float = 1.0
    enabled: bool = True
    num_drafted: int = 0
    num_accepted: int = 0


class NgramProposer:
    def __init__(self, num_draft_tokens: int, min_n: int, max_n: int) -> None:
        if num_draft_tokens < 1 or not 1 <= min_n <= max_n:
            raise ValueError(f"need num_draft_tokens >= 1 and 1 <= min_n <= max_n, got {num_draft_tokens}, "
                             f"{min_n}, {max_n}")
        self.num_draft_tokens = num_draft_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, seq, limit: int) -> list[int]:
        """Drafts for ``seq`` (a sequence about to decode its next token), at most ``limit`` of them."""
        state = seq.draft_state
        if state is None:
            state = seq.draft_state = DraftState(self.num_draft_tokens)
        if not state.enabled or limit < 1:
            return []
        drafts = ngram_lookup(seq.token_ids, self.min_n, self.max_n, min(state.k, limit))
        if drafts and seq.grammar is not None:
            drafts = grammar_prefix(seq.grammar, drafts)
        return drafts

    def update(self, seq, num_drafted: int, num_accepted: int) -> None:
        """Adapt the sequence's k and acceptance average after one verification of ``num_drafted`` drafts."""
        state = seq.draft_state
        if state is None or num_drafted == 0:
            return
        state.num_drafted += num_drafted
        state.num_accepted += num_accepted
        state.acceptance = (1 - EMA_WEIGHT) * state.acceptance + EMA_WEIGHT * num_accepted / num_drafted
        if num_accepted == num_drafted:
            state.k = min(self.num_draft_tokens, num_drafted + 1)
        else:
            state.k = min(self.num_draft_tokens, num_accepted + 1)
        if state.acceptance < MIN_ACCEPTANCE:
            state.enabled = False


def grammar_prefix(matcher, drafts: list[int]) -> list[int]:
    """The longest prefix of ``drafts`` the grammar accepts (cut after a token that terminates it); the
    matcher is left as it was."""
    if matcher.is_terminated():
        return []
    kept = 0
    for token in drafts:
        if not matcher.accept_token(token):
            break
        kept += 1
        if matcher.is_terminated():
            break
    if kept:
        matcher.rollback(kept)
    return drafts[:kept]
