"""Scheduler: token budget, chunked prefill mixed with decodes, priorities, preemption, no deadlock."""

from __future__ import annotations

from backends.engine.block_manager import BlockManager
from backends.engine.sampling_params import SamplingParams
from backends.engine.scheduler import ScheduledBatch, Scheduler
from backends.engine.sequence import Sequence, SequenceStatus

_ids = iter(range(10_000))


def seq(n: int, priority: int = 0, arrival: int | None = None, first: int = 0) -> Sequence:
    sid = next(_ids)
    return Sequence(seq_id=sid, request_id=f"r{sid}", prompt_token_ids=list(range(first, first + n)),
                    params=SamplingParams(), priority=priority, arrival=sid if arrival is None else arrival)


def advance(sched: Scheduler, batch: ScheduledBatch, token: int = 7) -> None:
    """What the engine does after running a batch: commit computed tokens, append sampled ones."""
    for item in batch.scheduled:
        sampled = item.is_sampling
        item.seq.num_computed_tokens += item.num_new_tokens
        sched.block_manager.commit(item.seq)
        if sampled:
            item.seq.token_ids.append(token)


def summary(batch: ScheduledBatch) -> list[tuple[int, int]]:
    return [(s.seq.seq_id, s.num_new_tokens) for s in batch.scheduled]


def test_chunked_prefill_mixed_with_decodes():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    a, b = seq(5), seq(12)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert summary(batch) == [(a.seq_id, 5), (b.seq_id, 3)]  # b's prefill is chunked
    assert [s.is_sampling for s in batch.scheduled] == [True, False]
    advance(sched, batch)
    batch = sched.schedule()
    # a decodes (1 token, listed first), b continues its prefill with the remaining budget
    assert [s.seq.seq_id for s in batch.decodes] == [a.seq_id]
    assert summary(batch) == [(a.seq_id, 1), (b.seq_id, 7)]
    advance(sched, batch)
    batch = sched.schedule()
    assert summary(batch) == [(a.seq_id, 1), (b.seq_id, 2)]
    assert batch.scheduled[1].is_sampling


def test_priority_then_fcfs():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    low, high, high2 = seq(3, priority=5), seq(3, priority=0), seq(3, priority=0)
    for s in (low, high, high2):
        sched.add(s)
    batch = sched.schedule()
    assert [s.seq.seq_id for s in batch.scheduled] == [high.seq_id, high2.seq_id]  # max_num_seqs = 2
    assert low.status == SequenceStatus.WAITING


def test_preemption_by_recompute_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(4), seq(4)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    advance(sched, batch)  # both now have 5 tokens; a needs a 3rd block: none left
    batch = sched.schedule()
    assert batch.preempted == [b]  # the latest arrival is preempted
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert summary(batch) == [(a.seq_id, 1)]
    assert a.block_table == [0, 1, 3]
    advance(sched, batch)
    sched.finish(a, "stop")
    batch = sched.schedule()
    assert summary(batch) == [(b.seq_id, 5)]  # recompute prompt + its generated token
    assert b.num_preemptions == 1


def test_head_of_queue_waits_for_blocks_no_overtaking():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, big, small = seq(6), seq(6), seq(1)
    for s in (a, big, small):
        sched.add(s)
    batch = sched.schedule()
    assert summary(batch) == [(a.seq_id, 6)]  # big doesn't fit; small must not overtake it
    assert [s.seq_id for s in sched.waiting] == [big.seq_id, small.seq_id]


def test_many_sequences_tiny_pool_all_finish():
    """Random-ish load on a tiny pool: every sequence finishes, no block leaks, no deadlock."""
    bm = BlockManager(num_blocks=6, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=5)
    seqs = [seq(1 + (i * 5) % 7, priority=i % 2, first=i) for i in range(12)]
    for s in seqs:
        sched.add(s)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert not batch.is_empty
        advance(sched, batch)
        for s in list(sched.running):
            if s.num_output_tokens >= 4:
                sched.finish(s, "length")
    assert not sched.has_unfinished()
    assert all(s.num_output_tokens == 4 for s in seqs)
    assert bm.num_free_blocks == 6 and all(b.ref_count == 0 for b in bm.blocks)


def test_forked_choice_waits_for_parent_prompt_then_shares_blocks():
    bm = BlockManager(num_blocks=16, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    parent = seq(5)
    child = Sequence(seq_id=next(_ids), request_id=parent.request_id, prompt_token_ids=parent.prompt_token_ids,
                     params=SamplingParams(), index=1, arrival=parent.arrival, parent=parent)
    sched.add(parent)
    sched.add(child)
    batch = sched.schedule()
    assert summary(batch) == [(parent.seq_id, 5)]
    advance(sched, batch)
    batch = sched.schedule()
    # child shares the parent's two full prompt blocks and computes only the last prompt token
    assert child.block_table[:2] == parent.block_table[:2]
    assert bm.blocks[parent.block_table[0]].ref_count == 2
    assert (child.seq_id, 1) in summary(batch)


def test_preemption_picks_lowest_priority_even_if_earlier():
    bm = BlockManager(num_blocks=5, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    low = seq(4, priority=5)
    sched.add(low)
    advance(sched, sched.schedule())  # low: 5 tokens, 2 blocks
    high = seq(4, priority=0)
    sched.add(high)
    batch = sched.schedule()
    assert summary(batch) == [(low.seq_id, 1), (high.seq_id, 4)]  # low takes a 3rd block, high 2: pool full
    advance(sched, batch)
    assert [s.seq_id for s in sched.running] == [high.seq_id, low.seq_id]
    # high's next token needs a 3rd block: the lower-priority seq is preempted although it arrived first
    batch = sched.schedule()
    assert batch.preempted == [low]
    assert summary(batch) == [(high.seq_id, 1)]
