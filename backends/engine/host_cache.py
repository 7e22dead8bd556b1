"""HostKVCache: a second KV tier in host memory — copies of full KV blocks that left the pool, keyed by their
prefix hash (InferCept's *swap*, vLLM's CPU offloading, LMCache's local CPU backend).

The block manager owns the policy (``block_manager.py``): when LRU evicts a cached block from the pool, its KV is
``save``d here first; when a prefix match runs past the pool's blocks, the following blocks found here are
``load``ed into fresh pool blocks, so a resumed context costs a copy instead of a recompute. Copies are synchronous
and happen while the scheduler builds a step, before the model runs, so the pool's KV is never read half-copied.

Capacity is a number of blocks (``EngineArgs.kv_offload_gb`` converted with the pool's bytes per block);
when full, the least recently saved-or-loaded entry is overwritten. An entry is a copy: loading it leaves it here.
On a CPU engine host memory and the pool are the same RAM, so the tier is simply more KV memory that is never
attended from directly; on CUDA it is pinned host memory.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch


class HostKVCache:
    def __init__(self, kv_cache: torch.Tensor, num_blocks: int) -> None:
        """``kv_cache``: the pool's tensor, shape [2, num_layers, pool_blocks, block_size, ...]."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.kv_cache = kv_cache
        self.num_blocks = num_blocks
        shape = (kv_cache.shape[0], kv_cache.shape[1], num_blocks, *kv_cache.shape[3:])
        pin = kv_cache.device.type == "cuda" and torch.cuda.is_available()
        self.storage = torch.empty(shape, dtype=kv_cache.dtype, device="cpu", pin_memory=pin)
        self.entries: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()  # hash → (slot, tokens); LRU first
        self.free_slots: deque[int] = deque(range(num_blocks))
        self.num_saved_blocks = 0  # blocks copied in (totals since start)
        self.num_loaded_blocks = 0  # blocks copied back into the pool

    @staticmethod
    def num_blocks_for(kv_cache: torch.Tensor, gb: float) -> int:
        """How many of the pool's blocks ``gb`` GiB of host memory holds."""
        per_block = kv_cache[:, :, 0].numel() * kv_cache.element_size()
        return int(gb * (1 << 30)) // per_block

    @property
    def num_used_blocks(self) -> int:
        return len(self.entries)

    def contains(self, block_hash: int, token_ids: tuple[int, ...]) -> bool:
        entry = self.entries.get(block_hash)
        return entry is not None and entry[1] == token_ids

    def save(self, block_hash: int, token_ids: tuple[int, ...], block_id: int) -> None:
        """Copy pool block ``block_id`` (full, holding ``token_ids`` under ``block_hash``) into the tier."""
        entry = self.entries.get(block_hash)
        if entry is not None and entry[1] == token_ids:
            self.entries.move_to_end(block_hash)  # already here (saved before, or loaded from here)
            return
        if entry is not None:
            slot = self.entries.pop(block_hash)[0]
        elif self.free_slots:
            slot = self.free_slots.popleft()
        else:
            _, (slot, _) = self.entries.popitem(last=False)  # overwrite the least recently used
        self.storage[:, :, slot].copy_(self.kv_cache[:, :, block_id])
        self.entries[block_hash] = (slot, token_ids)
        self.num_saved_blocks += 1

    def load(self, block_hash: int, block_id: int) -> None:
        """Copy the tier's entry ``block_hash`` into pool block ``block_id`` (``contains`` was checked)."""
        slot, _ = self.entries[block_hash]
        self.kv_cache[:, :, block_id].copy_(self.storage[:, :, slot], non_blocking=False)
        self.entries.move_to_end(block_hash)
        self.num_loaded_blocks += 1
