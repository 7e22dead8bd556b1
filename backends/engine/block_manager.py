"""Paged KV block accounting: fixed-size blocks, ref counts, hash-chained prefix caching, LRU eviction,
and blocks pinned for agent sessions paused on a tool call.

A block is in exactly one of three states:
  * referenced (ref_count > 0) by one or more sequences' block tables and/or session retentions;
  * cached: unreferenced but holding a full block whose hash is registered — reusable by a later prefix
    match, evicted least-recently-freed first when a new block is needed;
  * free: unreferenced, no content worth keeping.
``allocate`` returns None when the request doesn't fit; the scheduler decides what to do.

Retention (``retain_s`` > 0, prefix caching on): when a session's request finishes, ``retain`` pins the
hashed full blocks of its computed tokens (prompt + output except the last sampled token, which was never
fed) — each pin is one reference, so LRU cannot evict them while the agent's tool runs. A retention ends
  * on expiry (``release_expired``: ``retain_s`` after it was pinned);
  * when the session's next request is admitted (``release``, after that request referenced the blocks
    its prefix match found — turn k+1's prompt extends turn k's, so it hits them);
  * when memory is short: ``allocate`` drops retentions before it answers None, and ``retain`` drops them
    to stay under the cap (``retain_max_share`` of the pool's blocks). Released blocks become ordinary
    cached blocks (tail first), still matchable until LRU evicts them.

Which retention is dropped when memory is short — InferCept's waste comparison, kept simple: keeping
retention r wastes ``reclaimable(r) × expected_pause(r)`` block-seconds (its blocks nobody else
references, idle until the session returns); dropping it wastes the recompute of its ``num_tokens``
context tokens when it does. The dropped one is the one whose recompute is cheapest per block-second kept:
smallest ``num_tokens / (reclaimable(r) × expected_pause(r))``. Tool latencies are heavy-tailed, so a pause
that has lasted t is expected to last about t more: ``expected_pause(r) = now − pinned_at``; once the
session's next request is queued (``session_returned``) the pause is over and the retention is dropped
last. Among private contexts of any size this is LRU (the oldest pause goes first); a retention whose
blocks are mostly shared with others (a common system prompt) frees little and is kept. Ties: oldest first.
Admission always wins: a retention is dropped rather than a request kept waiting or preempted.

A second tier (``host_cache``, a ``HostKVCache``; optional): a cached block that LRU evicts is copied there
first, keyed by its hash, and a prefix match that runs past the pool's blocks continues there —
``load_from_host`` copies the following blocks back into fresh pool blocks, which the request then shares like
any cached block. With it, InferCept's three choices are all here: a retention keeps (preserves) a paused
session's blocks in the pool; a dropped or expired one leaves them cached, and when LRU needs them they are
swapped to the host tier rather than discarded; only what the host tier's own LRU overwrites is recomputed.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backends.engine.sequence import Sequence

if TYPE_CHECKING:
    from backends.engine.host_cache import HostKVCache


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    from_host: bool = False  # loaded from the host tier and not yet hit by an admitted request


@dataclass
class Retention:
    """The blocks one paused session keeps: its context's leading full blocks (one pin each)."""

    session_id: str
    block_ids: list[int]
    num_tokens: int  # tokens the blocks hold (= len(block_ids) × block_size)
    pinned_at: float
    expires_at: float
    is_returned: bool = False  # the session's next request is queued: about to be hit


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given the hash of the block before it (None for the first)."""
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 retain_s: float = 0.0, retain_max_share: float = 0.25,
                 clock: Callable[[], float] = time.monotonic, host_cache: HostKVCache | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        if not retain_s >= 0 or not 0 < retain_max_share <= 1:
            raise ValueError(f"retain_s must be >= 0 and retain_max_share in (0, 1], got {retain_s}, "
                             f"{retain_max_share}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.retain_s = retain_s
        self.max_retained_blocks = int(retain_max_share * num_blocks)
        self.clock = clock
        self.retentions: OrderedDict[str, Retention] = OrderedDict()  # by session, oldest pin first
        self.num_pins: dict[int, int] = {}  # block id → retentions pinning it (the pinned blocks)
        self.num_retained_hits = 0  # prompt tokens a session's next request found in the blocks it retained
        self.num_retained_evicted_blocks = 0  # blocks whose pin was dropped because memory was short
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.cached_block_ids: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.hash_to_block_id: dict[int, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # prompt tokens found
        self.host_cache = host_cache if enable_prefix_caching else None
        self.num_host_hits = 0  # prompt tokens of admitted requests found in blocks loaded from the host tier

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free + evictable cached)."""
        return len(self.free_block_ids) + len(self.cached_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_retained_blocks(self) -> int:
        """Distinct blocks pinned by paused sessions (also counted in ``num_used_blocks``)."""
        return len(self.num_pins)

    @property
    def is_retaining(self) -> bool:
        return self.retain_s > 0 and self.enable_prefix_caching

    def next_expiry(self) -> float | None:
        """Clock time at which the oldest retention expires; None when nothing is retained."""
        return next(iter(self.retentions.values())).expires_at if self.retentions else None

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

    def load_from_host(self, seq: Sequence, matched: list[int]) -> list[int]:
        """Extend ``matched`` (``match_prefix(seq)``) with the blocks that follow it in the host tier: each is
        copied into a pool block taken from the free or cached ones (never from ``matched``; when there are
        none, another session's retention is dropped, as ``allocate`` would do to recompute the block),
        registered under its hash and left cached (unreferenced) for ``allocate`` to share. Stops at the first
        block the tier lacks or when the pool has no block to give."""
        host = self.host_cache
        if host is None:
            return matched
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        parent = self.blocks[matched[-1]].block_hash if matched else None
        out = list(matched)
        for block_id in out:  # held while loading so that taking a block cannot evict them
            self._ref(block_id)
        for i in range(len(matched), max_blocks):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent, tokens)
            if h in self.hash_to_block_id or not host.contains(h, tokens):
                break
            while not self.free_block_ids and not self.cached_block_ids and any(
                    r.session_id != seq.session_id and self._reclaimable(r, set(out))
                    for r in self.retentions.values()):
                self._drop_retention(exclude=set(out), keep=seq.session_id)  # as ``allocate`` would for a recompute
            if not self.free_block_ids and not self.cached_block_ids:
                break
            block_id = self._take_block()  # may save an evicted block to the tier, overwriting its oldest entry
            if not host.contains(h, tokens):  # ... which was this one: give the block back and stop
                self._unref(block_id)
                break
            host.load(h, block_id)
            block = self.blocks[block_id]
            block.block_hash, block.token_ids, block.from_host = h, tokens, True
            self.hash_to_block_id[h] = block_id
            out.append(block_id)
            parent = h
        for block_id in reversed(out):  # tail first, as ``free``
            self._unref(block_id)
        return out

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
        if need > self._num_available(shared):
            if need > self._num_available(shared) + self._num_reclaimable(set(shared)):
                return None  # even dropping every retention would not make room: change nothing
            while need > self._num_available(shared):
                self._drop_retention(exclude=set(shared))
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

    def _num_available(self, shared: list[int]) -> int:
        # shared blocks sitting in the cached (evictable) set stop being available once referenced
        return self.num_free_blocks - sum(1 for b in shared if self.blocks[b].ref_count == 0)

    def _reclaimable(self, retention: Retention, exclude: set[int]) -> int:
        """Blocks that dropping ``retention`` would make available (held by pins only, not in ``exclude``)."""
        return sum(1 for b in retention.block_ids
                   if b not in exclude and self.blocks[b].ref_count == self.num_pins[b])

    def _num_reclaimable(self, exclude: set[int]) -> int:
        """Blocks that dropping every retention would make available."""
        return sum(1 for b, pins in self.num_pins.items() if b not in exclude and self.blocks[b].ref_count == pins)

    def _drop_retention(self, exclude: set[int], keep: str | None = None) -> None:
        """Drop the retention that wastes least when dropped (the module docstring's rule); blocks in
        ``exclude`` are about to be referenced and free nothing; ``keep`` is never dropped."""
        now = self.clock()

        def cost(r: Retention) -> tuple[float, float]:
            pause = 0.0 if r.is_returned else max(now - r.pinned_at, 1e-9)
            held = self._reclaimable(r, exclude) * pause  # block-seconds the retention will keep idle
            return (r.num_tokens / held if held > 0 else float("inf"), r.pinned_at)

        candidates = [r for r in self.retentions.values() if r.session_id != keep]
        assert candidates, "no retention left to drop"
        victim = min(candidates, key=cost)
        self.num_retained_evicted_blocks += len(victim.block_ids)
        self._unpin(victim.session_id)

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
            if self.host_cache is not None and block.block_hash is not None:
                self.host_cache.save(block.block_hash, block.token_ids, block_id)  # swap, not discard
            if self.hash_to_block_id.get(block.block_hash) == block_id:  # type: ignore[arg-type]
                del self.hash_to_block_id[block.block_hash]  # type: ignore[arg-type]
            block.block_hash, block.token_ids, block.from_host = None, (), False
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

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None:
                self.cached_block_ids[block_id] = None
            else:
                self.free_block_ids.append(block_id)

    def trim(self, seq: Sequence) -> int:
        """Release the blocks past ``seq.num_computed_tokens`` (those that held only rejected speculative
        drafts; never hashed, since ``commit`` hashes computed tokens only). Returns how many were released."""
        keep = self.blocks_needed(seq.num_computed_tokens)
        extra = seq.block_table[keep:]
        for block_id in reversed(extra):
            assert self.blocks[block_id].block_hash is None, f"block {block_id} past the computed tokens is hashed"
            self._unref(block_id)
        del seq.block_table[keep:]
        return len(extra)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references (tail first, so a prefix's tail is evicted before its head)."""
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    # ------------------------------------------------------------------ retention across tool pauses
    def retain(self, session_id: str, seq: Sequence) -> int:
        """Pin the hashed full blocks of ``seq``'s computed tokens for ``session_id`` (call before ``free``),
        replacing the session's previous retention. Only the leading blocks that fit the cap are pinned;
        other sessions' retentions are dropped to stay under it. Returns the number of blocks pinned
        (0 when retention is off or nothing is hashed)."""
        if not self.is_retaining or self.max_retained_blocks == 0:
            return 0
        block_ids: list[int] = []
        for i, h in enumerate(seq.block_hashes[:self.max_retained_blocks]):
            block_id = self.hash_to_block_id.get(h)  # the block a later prefix match will find
            expected = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            if block_id is None or self.blocks[block_id].token_ids != expected:
                break
            block_ids.append(block_id)
        for block_id in block_ids:  # reference the new blocks before the old retention lets go of them
            self._ref(block_id)
            self.num_pins[block_id] = self.num_pins.get(block_id, 0) + 1
        self._unpin(session_id)
        if not block_ids:
            return 0
        now = self.clock()
        self.retentions[session_id] = Retention(session_id, block_ids, len(block_ids) * self.block_size, now,
                                                now + self.retain_s)
        while self.num_retained_blocks > self.max_retained_blocks:
            self._drop_retention(exclude=set(), keep=session_id)
        return len(block_ids)

    def session_returned(self, session_id: str | None) -> None:
        """The session's next request is queued: keep its retention until that request is admitted (it is
        dropped only when nothing else can make room)."""
        retention = self.retentions.get(session_id) if session_id is not None else None
        if retention is not None:
            retention.is_returned = True

    def release(self, session_id: str | None, hit_block_ids: list[int] | None = None) -> None:
        """The session's next request was admitted with ``hit_block_ids`` from its prefix match: count the
        ones it had retained as hits, then let the retention go (the request references what it uses)."""
        retention = self.retentions.get(session_id) if session_id is not None else None
        if retention is None:
            return
        kept = set(retention.block_ids)
        self.num_retained_hits += sum(self.block_size for b in hit_block_ids or [] if b in kept)
        self._unpin(session_id)

    def release_expired(self) -> int:
        """Let go of every retention whose time is up; returns the number of blocks unpinned."""
        now = self.clock()
        num_unpinned = 0
        while self.retentions:
            retention = next(iter(self.retentions.values()))
            if retention.expires_at > now:
                break
            num_unpinned += len(retention.block_ids)
            self._unpin(retention.session_id)
        return num_unpinned

    def _unpin(self, session_id: str) -> None:
        retention = self.retentions.pop(session_id, None)
        if retention is None:
            return
        for block_id in reversed(retention.block_ids):  # tail first, as ``free``
            pins = self.num_pins[block_id] - 1
            if pins:
                self.num_pins[block_id] = pins
            else:
                del self.num_pins[block_id]
            self._unref(block_id)

    def record_prefix_lookup(self, num_prompt_tokens: int, hit_block_ids: list[int]) -> None:
        """An admitted request looked up ``num_prompt_tokens`` and starts with ``hit_block_ids``; those loaded
        from the host tier and not hit before count as host hits."""
        self.num_prefix_queries += num_prompt_tokens
        self.num_prefix_hits += len(hit_block_ids) * self.block_size
        for block_id in hit_block_ids:
            if self.blocks[block_id].from_host:
                self.blocks[block_id].from_host = False
                self.num_host_hits += self.block_size
