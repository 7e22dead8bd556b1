"""Paged KV block accounting: fixed-size blocks, ref counts, hash-chained prefix caching, LRU eviction.

A block is in exactly one of three states:
  * referenced (ref_count > 0) by one or more sequences' block tables;
  * cached: unreferenced but holding a full block whose hash is registered — reusable by a later prefix
    match, evicted least-recently-freed first when a new block is needed;
  * free: unreferenced, no content worth keeping.
``allocate`` returns None when the request doesn't fit; the scheduler decides what to do.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from backends.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given the hash of the block before it (None for the first)."""
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.cached_block_ids: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.hash_to_block_id: dict[int, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # prompt tokens found

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free + evictable cached)."""
        return len(self.free_block_ids) + len(self.cached_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ------------------------------------------------------------------ prefix caching
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of ``seq.token_ids`` (not yet referenced).

        At least one token is always left to compute, so the last token's logits can be produced.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        matched: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent, tokens)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            matched.append(block_id)
            parent = h
        return matched

    # ------------------------------------------------------------------ allocation
    def allocate(self, seq: Sequence, num_new_tokens: int, shared_block_ids: list[int] | None = None) -> list[int] | None:
        """Make ``seq.block_table`` cover ``num_computed_tokens + num_new_tokens`` tokens.

        ``shared_block_ids`` (only when the seq holds no blocks yet): leading full blocks whose KV is
        already valid for this sequence (a prefix match or the parent's prompt blocks); they are
        referenced and ``num_computed_tokens`` jumps past them. Returns the newly allocated block ids,
        or None (and changes nothing) when there are not enough blocks.
        """
        shared = list(shared_block_ids or [])
        if shared and seq.block_table:
            raise ValueError("shared blocks can only be given to a sequence without blocks")
        num_computed = len(shared) * self.block_size if shared else seq.num_computed_tokens
        num_held = len(shared) if shared else len(seq.block_table)
        need = self.blocks_needed(num_computed + num_new_tokens) - num_held
        # shared blocks sitting in the cached (evictable) set stop being available once referenced
        num_shared_cached = sum(1 for b in shared if self.blocks[b].ref_count == 0)
        if need > self.num_free_blocks - num_shared_cached:
            return None
        for block_id in shared:
            self._ref(block_id)
        if shared:
            seq.block_table = shared
            seq.num_computed_tokens = num_computed
            seq.block_hashes = []
            self.commit(seq)
        new_ids = [self._take_block() for _ in range(max(need, 0))]
        seq.block_table.extend(new_ids)
        return new_ids

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            assert block.block_hash is not None, f"block {block_id} is free but was shared"
            del self.cached_block_ids[block_id]
        block.ref_count += 1

    def _take_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:
            block_id, _ = self.cached_block_ids.popitem(last=False)  # evict the least recently freed
            block = self.blocks[block_id]
            if self.hash_to_block_id.get(block.block_hash) == block_id:  # type: ignore[arg-type]
                del self.hash_to_block_id[block.block_hash]  # type: ignore[arg-type]
            block.block_hash, block.token_ids = None, ()
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"block {block_id} handed out while referenced"
        block.ref_count = 1
        return block_id

    def commit(self, seq: Sequence) -> None:
        """Register hashes of blocks that became full (their KV computed) so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[i - 1] if i else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and h not in self.hash_to_block_id:
                block.block_hash, block.token_ids = h, tokens
                self.hash_to_block_id[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references (tail first, so a prefix's tail is evicted before its head)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self.cached_block_ids[block_id] = None
                else:
                    self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.num_prefix_queries += num_prompt_tokens
        self.num_prefix_hits += num_hit_tokens
