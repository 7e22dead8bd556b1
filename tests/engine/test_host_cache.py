"""The host KV tier (``kv_offload_gb``, issue 20): blocks LRU evicts from the pool are copied to host memory by
prefix hash and copied back by a later prefix match instead of being recomputed.

Exact entries and KV contents on ``HostKVCache``; block ids, ref counts and hit counters on the block manager;
then the tiny engine: turn 2 hits turn 1's context after a burst that evicts it from the pool (no pinning), with the
same greedy tokens as a recompute; 64 concurrent sessions leak no block and never exceed the tier's capacity; the
gateway's metrics. Time is a controllable clock; nothing here measures wall-clock time.
"""

from __future__ import annotations

import pytest
import torch

from backends.engine.args import EngineArgs
from backends.engine.async_engine import AsyncEngine
from backends.engine.block_manager import BlockManager, chain_hash
from backends.engine.host_cache import HostKVCache
from tests.engine.helpers import prompts, tiny_engine
from tests.engine.test_kv_retention import (
    Clock,
    Recorder,
    _wait_for,
    assert_consistent,
    burst,
    prefill,
    run_turn,
    seq,
    two_turn_agents,
)


def pool(num_blocks: int, block_size: int = 2) -> torch.Tensor:
    """A KV pool tensor [2, layers, blocks, block_size, heads, head_dim] whose every block is distinguishable."""
    return torch.zeros(2, 3, num_blocks, block_size, 1, 2)


def fill(kv: torch.Tensor, block_id: int, value: float) -> None:
    kv[:, :, block_id] = value


# ------------------------------------------------------------------------------------ HostKVCache


def test_the_tier_keeps_at_most_its_capacity_overwrites_the_least_recently_used_and_round_trips_the_kv():
    kv = pool(4)
    for b in range(4):
        fill(kv, b, 10 + b)
    host = HostKVCache(kv, num_blocks=2)
    assert host.storage.shape == (2, 3, 2, 2, 1, 2)
    host.save(101, (1, 2), 0)
    host.save(102, (3, 4), 1)
    host.save(101, (1, 2), 0)  # already there: no copy, now the most recently used
    assert (host.num_saved_blocks, list(host.entries)) == (2, [102, 101])
    host.save(103, (5, 6), 2)  # full: 102 (least recently used) is overwritten
    assert list(host.entries) == [101, 103] and host.num_used_blocks == 2 == host.num_blocks
    assert host.contains(101, (1, 2)) and not host.contains(102, (3, 4)) and not host.contains(101, (9, 9))
    host.load(103, 3)
    assert torch.equal(kv[:, :, 3], torch.full_like(kv[:, :, 3], 12))  # block 2's KV, now in block 3
    assert host.num_loaded_blocks == 1 and list(host.entries) == [101, 103]
    assert HostKVCache.num_blocks_for(kv, 1.0) == (1 << 30) // (2 * 3 * 2 * 1 * 2 * 4)
    with pytest.raises(ValueError, match="num_blocks"):
        HostKVCache(kv, 0)


# ------------------------------------------------------------------------------------ block manager


def test_evicted_blocks_go_to_the_tier_and_a_later_prefix_match_loads_them_back():
    kv = pool(4)
    host = HostKVCache(kv, num_blocks=8)
    bm = BlockManager(num_blocks=4, block_size=2, host_cache=host)
    a = seq([1, 2, 3, 4, 5, 6, 7])
    prefill(bm, a)  # 7 tokens: 3 full hashed blocks + 1 partial
    assert a.block_table == [0, 1, 2, 3]
    for b in range(4):
        fill(kv, b, 10 + b)
    bm.free(a)
    # a burst takes every block: the three hashed ones are evicted, copied to the tier first
    burst_seq = seq([9] * 8)
    assert bm.allocate(burst_seq, 8) == [3, 2, 1, 0]
    assert host.num_saved_blocks == 3 and bm.match_prefix(seq([1, 2, 3, 4, 5, 6, 7, 8])) == []
    for b in range(4):
        fill(kv, b, -1)  # the burst overwrites the pool's KV
    # while every pool block is referenced, nothing can be loaded
    turn2 = seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.load_from_host(turn2, []) == []
    bm.free(burst_seq)
    shared = bm.load_from_host(turn2, bm.match_prefix(turn2))
    assert len(shared) == 3 and host.num_loaded_blocks == 3
    for i, b in enumerate(shared):
        assert torch.equal(kv[:, :, b], torch.full_like(kv[:, :, b], 10 + i))  # each block's own KV came back
    assert bm.match_prefix(turn2) == shared  # registered under their hashes, cached (unreferenced)
    assert all(bm.blocks[b].ref_count == 0 for b in shared)
    assert bm.allocate(turn2, turn2.num_tokens - 6, shared) is not None and turn2.num_computed_tokens == 6
    bm.record_prefix_lookup(turn2.num_prompt_tokens, shared)
    assert (bm.num_host_hits, bm.num_prefix_hits) == (6, 6)
    bm.record_prefix_lookup(turn2.num_prompt_tokens, shared)  # hit again: now an ordinary pool hit
    assert (bm.num_host_hits, bm.num_prefix_hits) == (6, 12)
    assert_consistent(bm, [turn2])


def test_loading_stops_where_the_tier_lost_a_block_and_never_evicts_the_matched_prefix():
    kv = pool(6)
    host = HostKVCache(kv, num_blocks=8)
    bm = BlockManager(num_blocks=6, block_size=2, host_cache=host)
    a = seq([1, 2, 3, 4, 5, 6, 7])
    prefill(bm, a)
    hashes = list(a.block_hashes)
    bm.free(a)
    other = seq([8] * 12)
    bm.allocate(other, 12)  # evicts all three of a's blocks
    bm.free(other)
    del host.entries[hashes[1]]  # the tier lost the middle block: only the first can come back
    turn2 = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    shared = bm.load_from_host(turn2, bm.match_prefix(turn2))
    assert len(shared) == 1 and bm.blocks[shared[0]].block_hash == hashes[0] == chain_hash(None, (1, 2))
    # with the first block in the pool, the match continues from it in the tier once the block is back there
    host.save(hashes[1], (3, 4), shared[0])
    assert bm.load_from_host(turn2, bm.match_prefix(turn2))[:1] == shared
    assert_consistent(bm)


def test_a_tier_entry_overwritten_while_taking_its_pool_block_is_not_loaded():
    kv = pool(4)
    host = HostKVCache(kv, num_blocks=1)
    bm = BlockManager(num_blocks=4, block_size=2, host_cache=host)
    a = seq([1, 2, 3])
    prefill(bm, a)
    bm.free(a)
    d = seq([30, 31, 32, 33, 34, 35, 36, 37])
    prefill(bm, d)  # takes the 3 free blocks, then evicts a's block into the tier
    assert list(host.entries) == [a.block_hashes[0]] if a.block_hashes else len(host.entries) == 1
    bm.free(d)  # the pool is now 4 cached blocks of d
    turn2 = seq([1, 2, 3, 4])
    # taking a pool block evicts one of d's into the one-entry tier, overwriting the entry being loaded
    assert bm.load_from_host(turn2, bm.match_prefix(turn2)) == []
    assert host.num_loaded_blocks == 0 and len(bm.free_block_ids) == 1
    assert_consistent(bm)


def test_without_a_tier_or_prefix_caching_nothing_is_saved_or_loaded():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    prefill(bm, a)
    bm.free(a)
    assert bm.load_from_host(seq([1, 2, 3, 4, 5, 6]), [7]) == [7]
    off = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False, host_cache=HostKVCache(pool(4), 4))
    assert off.host_cache is None


# ------------------------------------------------------------------------------------ engine


def test_turn_two_hits_turn_one_from_the_tier_after_a_burst_with_the_same_tokens_as_a_recompute(tiny_model_dir):
    folder = tiny_model_dir("llama")
    results = {}
    for offload_gb in (0.01, 0.0):
        clock, recorder = Clock(), Recorder()
        engine = tiny_engine(folder, stat_loggers=[recorder], clock=clock, num_kv_blocks=64, block_size=4,
                             max_num_seqs=4, kv_offload_gb=offload_gb)
        [turn1] = prompts(1, [60], seed=5)
        answer, _ = run_turn(engine, turn1, "agent-1")
        turn2 = turn1 + answer + prompts(1, [9], seed=6)[0]
        clock.t = 20
        burst(engine, seed=7)  # 2x the pool: evicts turn 1's blocks from it
        tokens2, cached2 = run_turn(engine, turn2, "agent-1")
        results[offload_gb] = dict(cached=cached2, tokens=tokens2, stats=engine.stats(), recorder=recorder,
                                   engine=engine, n=len(turn1) + len(answer))
    on, off = results[0.01], results[0.0]
    computed = on["n"] - 1  # the answer's last token was sampled, never fed
    assert off["cached"] == 0 and off["stats"].num_offload_saved_blocks_total == 0
    assert on["cached"] == computed // 4 * 4 >= on["n"] - 4  # prompt + answer minus one block
    assert on["stats"].num_offload_hits_total == on["cached"]
    assert on["tokens"] == off["tokens"]  # the copied-back KV gives the same greedy continuation as a recompute
    host = on["engine"].block_manager.host_cache
    assert 0 < host.num_used_blocks <= host.num_blocks and on["stats"].num_offload_blocks == host.num_used_blocks
    steps = on["recorder"].steps
    assert sum(s.offload_hits for s in steps) == on["cached"]
    assert sum(s.offload_saved_blocks for s in steps) == host.num_saved_blocks > 0
    assert steps[-1].num_offload_blocks == host.num_used_blocks
    assert_consistent(on["engine"].block_manager)


async def test_64_concurrent_sessions_with_pinning_and_a_small_tier_leak_no_block_and_respect_its_capacity(
        tiny_model_dir):
    folder = tiny_model_dir("llama")
    kv = tiny_engine(folder, num_kv_blocks=64, block_size=4).model_runner.kv_cache
    per_block = kv[:, :, 0].numel() * kv.element_size()
    gb = (48.5 * per_block) / (1 << 30)  # a tier of 48 blocks: far fewer than 64 sessions' contexts
    clock = Clock()
    engine = tiny_engine(folder, clock=clock, num_kv_blocks=160, block_size=4, max_num_seqs=16,
                         max_num_batched_tokens=128, kv_retain_s=30, kv_retain_max_share=0.25,
                         program_scheduling=True, kv_offload_gb=gb)
    bm = engine.block_manager
    host = bm.host_cache
    assert host.num_blocks == 48
    high_water = []
    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        cached = await two_turn_agents(aengine, lambda: high_water.append(host.num_used_blocks))
        assert sum(cached) > 0 and not engine.requests
        assert host.num_saved_blocks > 48  # the tier filled and overwrote its oldest entries
        assert max(high_water) <= 48 and host.num_used_blocks == 48 == len(host.entries)
        assert sorted(slot for slot, _ in host.entries.values()) == list(range(48)) and not host.free_slots
        clock.t = 31
        await _wait_for(lambda: not bm.retentions)
        assert_consistent(bm)
        assert bm.num_used_blocks == 0 and all(b.ref_count == 0 for b in bm.blocks)
    finally:
        await aengine.shutdown()


def test_engine_args_validate_the_tier_size():
    assert EngineArgs().kv_offload_gb == 0
    with pytest.raises(ValueError, match="kv_offload_gb"):
        EngineArgs(kv_offload_gb=-1)


def test_the_gateway_turns_the_tier_stats_into_prometheus_metrics():
    from backends.engine.stats import IterationStats, SchedulerStats
    from tests.gateway.test_metrics_naming import engine_metrics_text, replica_values

    base = dict(num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.5, num_kv_blocks=64)
    values = replica_values(engine_metrics_text(
        (SchedulerStats(**base, num_offload_blocks=7, offload_saved_blocks=7, offload_hits=16), IterationStats()),
        (SchedulerStats(**base, num_offload_blocks=9, offload_saved_blocks=2), IterationStats())))
    assert values["switchyard_kv_offload_used_blocks"] == 9
    assert values["switchyard_kv_offload_saved_blocks_total"] == 9
    assert values["switchyard_external_prefix_cache_hits_total"] == 16
