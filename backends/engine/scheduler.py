"""Continuous batching: which sequences run this step and how many tokens each computes.

One step has a token budget (``max_num_batched_tokens``). Running sequences go first in priority/FCFS
order (a decode costs 1 token, an unfinished chunked prefill takes what the budget allows); when blocks run
out, the lowest-priority, latest running sequence is preempted (its blocks freed; it is recomputed later).
Then waiting sequences are admitted in order while budget, sequence slots and blocks last. A sequence
that fits an empty pool is always eventually scheduled: nothing is dropped and nothing deadlocks.

Admission order is (priority, arrival). With ``program_scheduling`` (Continuum's program FCFS), within
one priority the waiting sequences are taken in three classes:
  0. any sequence that has waited longer than ``program_max_wait_s`` (the starvation bound), by arrival;
  1. a sequence whose program is *continuing* — has a sequence running, or one that finished within the
     last ``program_window_s`` (the KV retention time: its context is likely still pinned) — ordered by
     the arrival of its program's first request, then its own arrival;
  2. everything else (a new program's first request, or a request with no program), by arrival.
Running sequences are kept in the same program order (``_running_key``): an older program's prefill
chunks take the step's budget first, and a newer program's sequence is preempted first.
Agent sessions: a finishing choice 0 that carries a session id hands its blocks to the block manager's
retention before they are freed, and the session's next request lets that retention go once admitted.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.engine.block_manager import BlockManager
from backends.engine.sequence import Sequence, SequenceStatus
from backends.engine.speculation import NgramProposer


@dataclass
class ScheduledSeq:
    """``num_new_tokens`` positions of ``seq`` computed this step; with ``draft_token_ids`` (speculation) the
    chunk is the last committed token followed by the drafts (``num_new_tokens`` = 1 + len(drafts))."""

    seq: Sequence
    num_new_tokens: int
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def is_sampling(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids) == self.seq.num_tokens


@dataclass
class ScheduledBatch:
    """What the model runner computes in one step: decodes (1 token) first, then prefill chunks (and the
    1 + k token chunks of sequences verifying k speculative drafts)."""

    decodes: list[ScheduledSeq] = field(default_factory=list)
    prefills: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, *,
                 program_scheduling: bool = False, program_window_s: float = 0.0, program_max_wait_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, proposer: NgramProposer | None = None,
                 max_model_len: int | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if program_window_s < 0 or program_max_wait_s <= 0:
            raise ValueError("program_window_s must be >= 0 and program_max_wait_s > 0")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.program_scheduling = program_scheduling
        self.program_window_s = program_window_s
        self.program_max_wait_s = program_max_wait_s
        self.clock = clock
        self.proposer = proposer  # speculation: drafts for decoding sequences (None = off)
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by _running_key
        self.num_preemptions = 0
        self.program_arrival: dict[str, int] = {}  # program → arrival of its first request (program FCFS)
        self.program_finished_at: dict[str, float] = {}  # program → clock time its last sequence finished

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        keys = [s.sort_key for s in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, seq.sort_key), seq)
        if self.program_scheduling and seq.program_id is not None:
            self.program_arrival.setdefault(seq.program_id, seq.arrival)
        if seq.num_preemptions == 0:
            self.block_manager.session_returned(seq.session_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and free its blocks at once (also used for abort)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.session_id is not None and seq.index == 0 and reason != "abort":
            self.block_manager.retain(seq.session_id, seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self.program_scheduling and seq.program_id is not None:
            self.program_finished_at[seq.program_id] = self.clock()

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)
        self.add(seq)

    def _shared_blocks(self, seq: Sequence) -> list[int] | None:
        """Blocks a waiting seq starts with; None when it must wait for its parent's prompt."""
        parent = seq.parent
        forked: list[int] = []
        if parent is not None and not parent.is_finished:
            if parent.num_computed_tokens < parent.num_prompt_tokens:
                return None  # share the parent's prompt blocks once they are computed
            bs = self.block_manager.block_size
            num_shared = min(seq.num_prompt_tokens // bs, (seq.num_tokens - 1) // bs)  # prompt-only full blocks
            forked = parent.block_table[:num_shared]
        cached = self.block_manager.load_from_host(seq, self.block_manager.match_prefix(seq))
        return cached if len(cached) >= len(forked) else forked

    def _running_key(self, seq: Sequence) -> tuple[int, int, int]:
        """The order running sequences get the step's token budget (and the reverse of the preemption order):
        (priority, arrival); with program scheduling, (priority, arrival of the program's first request,
        arrival), so an older program's prefill chunks go first and a newer program's are preempted first."""
        program = self.program_arrival.get(seq.program_id) if self.program_scheduling and seq.program_id else None
        return (seq.priority, seq.arrival if program is None else program, seq.arrival)

    def _admission_order(self) -> list[Sequence]:
        """The waiting sequences in the order admission tries them (the module docstring)."""
        if not self.program_scheduling:
            return list(self.waiting)
        now = self.clock()
        live = {s.program_id for s in self.running}
        for program, finished_at in list(self.program_finished_at.items()):  # forget programs gone idle
            if now - finished_at > self.program_window_s:
                del self.program_finished_at[program]
                if program not in live and all(s.program_id != program for s in self.waiting):
                    self.program_arrival.pop(program, None)
        continuing = live | set(self.program_finished_at)

        def key(s: Sequence) -> tuple[int, int, int, int]:
            if now - s.arrival_time > self.program_max_wait_s:
                return (s.priority, 0, s.arrival, s.arrival)
            if s.program_id is not None and s.program_id in continuing:
                return (s.priority, 1, self.program_arrival.get(s.program_id, s.arrival), s.arrival)
            return (s.priority, 2, s.arrival, s.arrival)

        return sorted(self.waiting, key=key)

    def schedule(self) -> ScheduledBatch:
        self.block_manager.release_expired()
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. running sequences, highest priority first; preempt from the tail when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, f"running seq {seq.seq_id} has nothing to compute"
            drafts = self._drafts(seq, budget, num_others=len(self.running) - i - 1) if num_new == 1 else []
            if drafts and self.block_manager.allocate(seq, 1 + len(drafts)) is not None:
                self._add_to_batch(batch, ScheduledSeq(seq, 1 + len(drafts), drafts))
                budget -= 1 + len(drafts)
                i += 1
                continue  # drafts that do not fit are dropped rather than preempting anyone for them
            while self.block_manager.allocate(seq, num_new) is None:
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            self._add_to_batch(batch, ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        # 2. waiting sequences, in order, unless this step already had to preempt
        if batch.preempted:
            return batch
        for seq in self._admission_order():
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            shared = self._shared_blocks(seq)
            if shared is None:
                continue
            num_computed = len(shared) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if self.block_manager.allocate(seq, num_new, shared) is None:
                break  # head of the queue doesn't fit: wait for blocks (FCFS, no overtaking)
            if seq.num_preemptions == 0 and seq.parent is None:
                self.block_manager.record_prefix_lookup(seq.num_prompt_tokens, shared)
                self.block_manager.release(seq.session_id, shared)  # the session is back: its pin ends here
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_computed
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            keys = [self._running_key(s) for s in self.running]
            self.running.insert(bisect.bisect_right(keys, self._running_key(seq)), seq)
            self._add_to_batch(batch, ScheduledSeq(seq, num_new))
            budget -= num_new
        return batch

    def _drafts(self, seq: Sequence, budget: int, num_others: int) -> list[int]:
        """Speculative drafts for a decoding ``seq`` within the step's token budget, the sequence's
        remaining ``max_tokens`` (the step commits at most drafts + 1) and the model's context. Drafts only
        take blocks that leave one free block for each of the ``num_others`` running sequences after it, so
        speculation never preempts anyone."""
        if self.proposer is None:
            return []
        limit = min(budget - 1, seq.params.max_tokens - seq.num_output_tokens - 1)
        if self.max_model_len is not None:
            limit = min(limit, self.max_model_len - seq.num_tokens - 1)
        drafts = self.proposer.propose(seq, limit) if limit > 0 else []
        if drafts:
            bm = self.block_manager
            need = bm.blocks_needed(seq.num_computed_tokens + 1 + len(drafts)) - len(seq.block_table)
            if bm.num_free_blocks - need < num_others:
                return []
        return drafts

    @staticmethod
    def _add_to_batch(batch: ScheduledBatch, item: ScheduledSeq) -> None:
        if item.num_new_tokens == 1 and not item.draft_token_ids:
            batch.decodes.append(item)
        else:
            batch.prefills.append(item)
