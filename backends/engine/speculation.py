"""N-gram speculation (prompt lookup, vLLM's ``ngram`` method, plus a shared table of recent outputs).

For a decoding sequence, the proposer finds the longest suffix n-gram of its tokens (n from ``max_n`` down to
``min_n``) that occurred earlier in its prompt + output (the most recent such occurrence) and proposes the
up-to-k tokens that followed it. When its own text has no match and the engine keeps a ``SharedDraftTable``
(``SpeculationConfig.shared_context``), the proposal comes from the n-grams of recent outputs of finished
requests in the sequence's namespace (longest n first): agents of one tenant repeat each other's tool calls.
The scheduler gives a sequence with drafts a chunk of 1 + k tokens starting at its last committed token; the
sampler (``layers/sampler.py`` ``verify``) scores every position in the same forward pass and commits the
accepted drafts plus one token of the target model, so each step commits >= 1.

How many drafts, per proposal: a verify pass of k drafts costs more than a plain decode step (on a CPU each
scored row is real compute), so a draft is worth sending only when its expected gain beats that cost. With
``p`` the estimated chance that a draft token is accepted given the ones before it were, k drafts commit
1 + p + ... + p^k tokens on average, for ``VerifyCost.relative[k]`` plain steps of time; the proposer sends the
k (0 to the proposal's length) with the best ratio, and nothing when no k beats a plain step (ratio 1).

* ``p`` is per proposal kind (own text or shared table, and match length n: long matches are right far more
  often than short ones): the sequence's recent record with that kind (counts decayed by ``RECENCY`` per
  verification) blended with ``PRIOR_WEIGHT`` pseudo-counts of the engine's record with it. A sequence
  whose short matches keep failing stops sending them; one that enters a copied passage (a long match)
  drafts again.
* ``VerifyCost`` learns ``relative[k]`` from the engine's own steps: the wall time of single-sequence steps
  with k drafts over that of single-sequence plain decode steps (moving averages), starting from
  ``1 + PRIOR_DRAFT_COST * k``. ``SpeculationConfig.verify_cost`` fixes it at ``1 + verify_cost * k`` instead
  (0: every proposal is sent whole).

Steps where no n-gram matches draft nothing and cost nothing.

Structured output: a draft is cut at the first token its grammar matcher refuses (checked with
``accept_token`` and undone with ``rollback``), and after a token that terminates the grammar; the model
runner fills the grammar mask of every drafted position the same way, so verification samples exactly what
the grammar allows there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from backends.engine.args import SpeculationConfig

RECENCY = 0.8  # a sequence's acceptance counts are multiplied by this at each verification
PRIOR_WEIGHT = 1.0  # pseudo-counts of the engine-wide acceptance of the proposal's kind in a sequence's estimate
PRIOR_DRAFT_COST = 0.3  # a draft's cost in plain steps until the engine has measured it
COST_AVERAGE = 0.1  # weight of a new step time in VerifyCost's moving averages
MAX_NAMESPACES = 64  # a shared draft table keeps this many namespaces at most (least recently used dropped)


def ngram_lookup(token_ids: list[int], min_n: int, max_n: int, k: int) -> tuple[list[int], int]:
    """The up-to-``k`` tokens that followed the most recent earlier occurrence of the longest suffix n-gram
    (``max_n`` >= n >= ``min_n``) of ``token_ids``, and that n; ([], 0) when none occurs."""
    num = len(token_ids)
    if k < 1 or num < min_n + 1:
        return [], 0
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, num - 1), min_n - 1, -1):
        windows = sliding_window_view(arr[:-1], n)  # start i <= num-1-n: a token follows every window
        hits = np.flatnonzero((windows == arr[num - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist(), n
    return [], 0


@dataclass
class DraftState:
    """One sequence's drafting state: its recent acceptance and the kind of its pending proposal."""

    # per proposal kind (from the shared table, match length n): [drafts accepted, drafts compared with the
    # target (the accepted ones and the first rejected one)], decayed by RECENCY at each verification of that kind
    recent: dict[tuple[bool, int], list[float]] = field(default_factory=dict)
    kind: tuple[bool, int] = (False, 0)  # the pending proposal's
    num_drafted: int = 0
    num_accepted: int = 0
    num_shared_drafted: int = 0  # of num_drafted / num_accepted, those from the shared table
    num_shared_accepted: int = 0

    @property
    def is_shared(self) -> bool:
        """The pending proposal came from the shared table."""
        return self.kind[0]


class VerifyCost:
    """``relative[k]``: the time of a verify pass of k drafts in plain decode steps (``relative[0]`` = 1).
    Learned from single-sequence steps (``observe``) unless fixed at ``1 + per_draft * k``."""

    def __init__(self, max_drafts: int, per_draft: float | None = None) -> None:
        self.fixed = per_draft is not None
        cost = PRIOR_DRAFT_COST if per_draft is None else per_draft
        self.relative = [1.0 + cost * k for k in range(max_drafts + 1)]
        self.plain_step_s: float | None = None  # moving average of a single-sequence plain decode step

    def observe(self, num_drafts: int, seconds: float) -> None:
        """One single-sequence decode step that verified ``num_drafts`` drafts (0: a plain step) took
        ``seconds``."""
        if self.fixed or num_drafts >= len(self.relative):
            return
        if num_drafts == 0:
            self.plain_step_s = seconds if self.plain_step_s is None else (
                (1 - COST_AVERAGE) * self.plain_step_s + COST_AVERAGE * seconds)
        elif self.plain_step_s:
            ratio = max(1.0, seconds / self.plain_step_s)
            self.relative[num_drafts] = (1 - COST_AVERAGE) * self.relative[num_drafts] + COST_AVERAGE * ratio


def best_num_drafts(p: float, relative: list[float], most: int) -> int:
    """The k in 0..``most`` with the most expected tokens per unit of time, (1 + p + ... + p^k) / relative[k];
    0 when no k beats a plain step."""
    best, best_rate, expected, term = 0, 1.0, 1.0, 1.0
    for k in range(1, min(most, len(relative) - 1) + 1):
        term *= p
        expected += term
        rate = expected / relative[k]
        if rate > best_rate:
            best, best_rate = k, rate
    return best


# A table entry: (uses, next token ids) — uses = insertions of the n-gram plus lookups that found it, halved by
# each eviction sweep. A plain tuple of ints: the garbage collector stops tracking it.
_Entry = tuple[int, tuple[int, ...]]


class SharedDraftTable:
    """Per-namespace n-gram → the tokens that followed it in the most recent output that had it.

    Bounded: at most ``max_entries`` n-grams per namespace and ``max_namespaces`` namespaces. When an ``add``
    leaves a namespace over its cap, one sweep evicts the least frequently used n-grams (fewest uses, then
    least recently inserted) down to ``max_entries - max_entries // 4`` and halves the survivors' counts
    (rounding up), so n-grams that were popular long ago give way to current ones; a sweep costs O(entries)
    and comes once per ``max_entries // 4`` new n-grams. The least recently used namespace is dropped when a
    new one would exceed ``max_namespaces``. Not thread-safe (the engine's thread owns it).
    """

    def __init__(self, min_n: int, max_n: int, num_next_tokens: int, max_entries: int,
                 max_namespaces: int = MAX_NAMESPACES) -> None:
        if not 1 <= min_n <= max_n or num_next_tokens < 1 or max_entries < 1 or max_namespaces < 1:
            raise ValueError(f"need 1 <= min_n <= max_n and num_next_tokens, max_entries, max_namespaces >= 1; got "
                             f"{min_n}, {max_n}, {num_next_tokens}, {max_entries}, {max_namespaces}")
        self.min_n, self.max_n = min_n, max_n
        self.num_next_tokens = num_next_tokens
        self.max_entries = max_entries
        self.max_namespaces = max_namespaces
        self._spaces: OrderedDict[str, dict[tuple[int, ...], _Entry]] = OrderedDict()

    def add(self, namespace: str, context_token_ids: list[int], output_token_ids: list[int]) -> None:
        """Record the n-grams of one output: every n-gram that ends in ``output_token_ids`` or in the last
        ``max_n`` tokens of ``context_token_ids`` (its prompt) and is followed by an output token, mapped to
        the (up to ``num_next_tokens``) output tokens that followed it."""
        if not output_token_ids:
            return
        space = self._spaces.get(namespace)
        if space is None:
            space = self._spaces[namespace] = {}
            if len(self._spaces) > self.max_namespaces:
                self._spaces.popitem(last=False)
        self._spaces.move_to_end(namespace)
        tail = list(context_token_ids[-self.max_n:])
        tokens = tail + list(output_token_ids)
        for p in range(len(tail), len(tokens)):
            next_ids = tuple(tokens[p:p + self.num_next_tokens])
            for n in range(self.min_n, min(self.max_n, p) + 1):
                key = tuple(tokens[p - n:p])
                entry = space.pop(key, None)  # re-inserted last: insertion order = recency
                space[key] = (entry[0] + 1 if entry is not None else 1, next_ids)
        if len(space) > self.max_entries:
            self._evict(space)

    def lookup(self, namespace: str, token_ids: list[int], k: int) -> tuple[list[int], int]:
        """Up to ``k`` tokens that followed the longest suffix n-gram of ``token_ids`` found in the namespace's
        table, and that n (([], 0) when none); a hit counts as a use."""
        space = self._spaces.get(namespace)
        if space is None or k < 1:
            return [], 0
        self._spaces.move_to_end(namespace)
        for n in range(min(self.max_n, len(token_ids)), self.min_n - 1, -1):
            key = tuple(token_ids[-n:])
            entry = space.get(key)
            if entry is not None:
                space[key] = (entry[0] + 1, entry[1])  # an update in place: the insertion order stays
                return list(entry[1][:k]), n
        return [], 0

    def num_entries(self, namespace: str) -> int:
        space = self._spaces.get(namespace)
        return 0 if space is None else len(space)

    @property
    def namespaces(self) -> list[str]:
        """Namespaces held, least recently used first."""
        return list(self._spaces)

    def _evict(self, space: dict[tuple[int, ...], _Entry]) -> None:
        num_evict = len(space) - self.max_entries + self.max_entries // 4  # rare sweeps: O(entries) each
        keys = list(space)  # insertion order: least recently inserted first
        counts = [count for count, _ in space.values()]
        # a stable sort by count in C keeps the insertion order within a count (fewest uses, then oldest)
        for i in sorted(range(len(keys)), key=counts.__getitem__)[:num_evict]:
            del space[keys[i]]
        for key, (count, next_ids) in space.items():
            if count > 1:  # (1 + 1) // 2 == 1: most entries need no new tuple
                space[key] = ((count + 1) // 2, next_ids)


class NgramProposer:
    """Drafts for decoding sequences: their own text first, then (when given) the shared table of their
    namespace, as many as pay for their verification; ``record`` feeds a finished sequence's output to that
    table."""

    def __init__(self, num_draft_tokens: int, min_n: int, max_n: int, shared: SharedDraftTable | None = None,
                 verify_cost: float | None = None) -> None:
        if num_draft_tokens < 1 or not 1 <= min_n <= max_n:
            raise ValueError(f"need num_draft_tokens >= 1 and 1 <= min_n <= max_n, got {num_draft_tokens}, "
                             f"{min_n}, {max_n}")
        self.num_draft_tokens = num_draft_tokens
        self.min_n = min_n
        self.max_n = max_n
        self.shared = shared
        self.cost = VerifyCost(num_draft_tokens, verify_cost)
        # engine-wide [accepted, tried] per proposal kind (from the shared table, match length n)
        self.kinds: dict[tuple[bool, int], list[int]] = {}

    @classmethod
    def from_config(cls, config: SpeculationConfig) -> NgramProposer | None:
        """The proposer a ``SpeculationConfig`` describes; None when speculation is off."""
        if config.method != "ngram":
            return None
        shared = (SharedDraftTable(config.min_n, config.max_n, config.num_draft_tokens, config.shared_max_entries)
                  if config.shared_context else None)
        return cls(config.num_draft_tokens, config.min_n, config.max_n, shared, config.verify_cost)

    def acceptance(self, state: DraftState, kind: tuple[bool, int]) -> float:
        """The estimated chance that a draft of this kind is accepted, given the drafts before it were."""
        accepted, tried = self.kinds.get(kind, (0, 0))
        prior = (accepted + 1) / (tried + 2)
        own_accepted, own_tried = state.recent.get(kind, (0.0, 0.0))
        return (own_accepted + PRIOR_WEIGHT * prior) / (own_tried + PRIOR_WEIGHT)

    def propose(self, seq, limit: int) -> list[int]:
        """Drafts for ``seq`` (a sequence about to decode its next token), at most ``limit`` of them."""
        state = seq.draft_state
        if state is None:
            state = seq.draft_state = DraftState()
        k = min(self.num_draft_tokens, limit)
        if k < 1:
            return []
        drafts, n = ngram_lookup(seq.token_ids, self.min_n, self.max_n, k)
        state.kind = (False, n)
        if not drafts and self.shared is not None and seq.namespace is not None:
            drafts, n = self.shared.lookup(seq.namespace, seq.token_ids, k)
            state.kind = (True, n)
        if drafts:
            drafts = drafts[:best_num_drafts(self.acceptance(state, state.kind), self.cost.relative, len(drafts))]
        if drafts and seq.grammar is not None:
            drafts = grammar_prefix(seq.grammar, drafts)
        return drafts

    def update(self, seq, num_drafted: int, num_accepted: int) -> None:
        """Learn from one verification of ``num_drafted`` drafts of ``seq``, ``num_accepted`` accepted."""
        state = seq.draft_state
        if state is None or num_drafted == 0:
            return
        state.num_drafted += num_drafted
        state.num_accepted += num_accepted
        if state.is_shared:
            state.num_shared_drafted += num_drafted
            state.num_shared_accepted += num_accepted
        tried = num_accepted + (num_accepted < num_drafted)  # the drafts after the first rejection were not tried
        recent = state.recent.setdefault(state.kind, [0.0, 0.0])
        recent[0] = RECENCY * recent[0] + num_accepted
        recent[1] = RECENCY * recent[1] + tried
        counts = self.kinds.setdefault(state.kind, [0, 0])
        counts[0] += num_accepted
        counts[1] += tried

    def observe(self, batch, seconds: float) -> None:
        """One engine step took ``seconds``: a single sequence decoding (with or without drafts) teaches
        ``cost`` what a draft costs."""
        if len(batch.scheduled) != 1:
            return
        item = batch.scheduled[0]
        if item.is_sampling and item.num_new_tokens == 1 + len(item.draft_token_ids) and item.seq.num_output_tokens:
            self.cost.observe(len(item.draft_token_ids), seconds)

    def record(self, seq) -> None:
        """A finished sequence: its output joins its namespace's shared table (when there is one)."""
        if self.shared is not None and seq.namespace is not None:
            self.shared.add(seq.namespace, seq.prompt_token_ids, seq.output_token_ids)


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
