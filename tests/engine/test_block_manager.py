"""Block manager: exact block ids, ref counts, prefix-cache hits and LRU eviction order."""

from __future__ import annotations

import pytest

from backends.engine.block_manager import BlockManager
from backends.engine.sampling_params import SamplingParams
from backends.engine.sequence import Sequence

_ids = iter(range(10_000))


def seq(tokens: list[int]) -> Sequence:
    return Sequence(seq_id=next(_ids), request_id="r", prompt_token_ids=tokens, params=SamplingParams())


def prefill(bm: BlockManager, s: Sequence) -> list[int]:
    """Allocate the whole remaining prompt (after a prefix match) and mark it computed."""
    shared = bm.match_prefix(s)
    num_new = s.num_tokens - len(shared) * bm.block_size
    new = bm.allocate(s, num_new, shared)
    assert new is not None
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)
    return new


def test_allocate_in_order_and_free_returns_everything():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq(list(range(10)))  # 3 blocks
    assert bm.allocate(a, 10) == [0, 1, 2]
    assert a.block_table == [0, 1, 2]
    assert [b.ref_count for b in bm.blocks] == [1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3
    # one more token fits in block 2 (10 -> 11 tokens): no new block
    a.num_computed_tokens = 10
    assert bm.allocate(a, 1) == []
    a.num_computed_tokens = 11
    assert bm.allocate(a, 2) == [3]  # 13 tokens need a 4th block
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 6
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_doesnt_fit_returns_none_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq(list(range(12)))
    assert bm.allocate(a, 12) is None
    assert a.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(10)))
    assert prefill(bm, a) == [0, 1, 2]
    # two full blocks (0, 1) are hashed; the partial block 2 is not
    assert bm.blocks[0].block_hash is not None and bm.blocks[1].block_hash is not None
    assert bm.blocks[2].block_hash is None
    b = seq(list(range(9)) + [99])
    assert bm.match_prefix(b) == [0, 1]
    assert prefill(bm, b) == [3]
    assert b.block_table == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert b.num_computed_tokens == 10


def test_match_leaves_at_least_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(8)))
    prefill(bm, a)
    b = seq(list(range(8)))
    assert bm.match_prefix(b) == [0]  # not [0, 1]: the last token must run to produce logits


def test_lru_eviction_order_tail_first():
    bm = BlockManager(num_blocks=5, block_size=2)
    a = seq([1, 2, 3, 4, 5])  # blocks 0,1 full (cached on free), block 2 partial
    assert prefill(bm, a) == [0, 1, 2]
    bm.free(a)
    # freed tail first: block 2 (no hash) -> free list; 1 then 0 -> cached, LRU order [1, 0]
    assert list(bm.cached_block_ids) == [1, 0]
    assert list(bm.free_block_ids) == [3, 4, 2]
    assert bm.num_free_blocks == 5
    c = seq([9, 9, 9, 9, 9, 9, 9, 9])  # needs 4 blocks: 3 free ones, then evicts block 1 first
    assert bm.allocate(c, 8) == [3, 4, 2, 1]
    assert list(bm.cached_block_ids) == [0]
    assert bm.blocks[1].block_hash is None
    # block 0 (head of a's prefix) is still cached and matches
    d = seq([1, 2, 7, 7])
    assert bm.match_prefix(d) == [0]


def test_cached_block_reused_is_taken_out_of_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3])
    prefill(bm, a)
    bm.free(a)
    assert list(bm.cached_block_ids) == [0]
    b = seq([1, 2, 4])
    prefill(bm, b)
    assert b.block_table[0] == 0 and bm.blocks[0].ref_count == 1
    assert list(bm.cached_block_ids) == []
    assert bm.num_free_blocks == 2


def test_fit_check_counts_shared_cached_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    prefill(bm, a)
    bm.free(a)  # blocks 0,1 cached, block 2 free
    b = seq([1, 2, 3, 4, 6, 7, 8])  # shares 0,1; needs 2 more blocks but only 1 is really available
    shared = bm.match_prefix(b)
    assert shared == [0, 1]
    assert bm.allocate(b, 3, shared) is None
    assert bm.blocks[0].ref_count == 0 and list(bm.cached_block_ids) == [1, 0]


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3])
    prefill(bm, a)
    assert bm.match_prefix(seq([1, 2, 3])) == []
    bm.free(a)
    assert list(bm.cached_block_ids) == [] and bm.num_free_blocks == 4


def test_misuse_raises():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3])
    bm.allocate(a, 3)
    with pytest.raises(ValueError):
        bm.allocate(a, 1, [3])
