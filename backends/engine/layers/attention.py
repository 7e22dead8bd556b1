"""Paged attention: KV writes into block caches and attention over block tables (torch path).

KV cache layout (shared with the Triton kernels in ``triton_attention.py``): per layer ``k_cache`` and
``v_cache`` of shape ``[num_blocks, block_size, num_kv_heads, head_dim]``; token slot
``slot = block_id * block_size + offset``; slot ``-1`` means "do not store".

``Attention`` is the layer the models call. On CUDA it uses the Triton kernels for KV writes and decode;
on CPU (and for prefill everywhere) the torch functions below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.layers.native import AttentionRows, CpuKernels


def store_kvcache_torch(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``key``/``value`` [N, Hkv, D] into the caches at ``slot_mapping`` [N] (int64; -1 = skip)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    k_flat = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    v_flat = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    slot_mapping = slot_mapping.long()
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_flat.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, num_positions: int
) -> torch.Tensor:
    """Cache rows for positions 0..num_positions-1 of each table row → [B, L, Hkv, D]."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    pos = torch.arange(num_positions, device=cache.device)
    blocks = block_tables[:, pos // block_size].long().clamp_(min=0)  # [B, L]
    slots = blocks * block_size + (pos % block_size)
    flat = cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_select(0, slots.reshape(-1))
    return flat.view(*slots.shape, num_kv_heads, head_dim)


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] → out [B, Hq, D].

    ``context_lens`` [B] counts the keys to attend to, including the current token (already stored).
    ``block_tables`` [B, max_blocks] int32 (unused entries may hold anything, e.g. -1).
    ``sliding_window`` keeps only the last ``sliding_window`` keys; ``softcap`` applies
    ``softcap * tanh(scores / softcap)`` before the softmax.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(context_lens.max())
    k = _gather_kv(k_cache, block_tables, max_len)  # [B, L, Hkv, D]
    v = _gather_kv(v_cache, block_tables, max_len)
    qg = q.view(batch, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(max_len, device=q.device)
    lens = context_lens.to(q.device).long().view(batch, 1)
    invalid = pos.view(1, -1) >= lens
    if sliding_window is not None:
        invalid |= pos.view(1, -1) < lens - sliding_window
    scores.masked_fill_(invalid.view(batch, 1, 1, max_len), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_prefill_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention for one sequence's chunk: q [N, Hq, D] at positions start_pos..start_pos+N-1.

    Keys are read from the cache for positions 0..start_pos+N-1 (the chunk's own KV is already stored),
    so prefix-cache hits and chunked prefill need no special case.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    total = start_pos + num_tokens
    k = _gather_kv(k_cache, block_table.view(1, -1), total)[0]  # [L, Hkv, D]
    v = _gather_kv(v_cache, block_table.view(1, -1), total)[0]
    qh = q.view(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).float()  # [Hkv, G, N, D]
    kh = k.permute(1, 0, 2).float().unsqueeze(1)  # [Hkv, 1, L, D]
    vh = v.permute(1, 0, 2).float().unsqueeze(1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [Hkv, G, N, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(start_pos, total, device=q.device).view(-1, 1)
    k_pos = torch.arange(total, device=q.device).view(1, -1)
    invalid = k_pos > q_pos
    if sliding_window is not None:
        invalid |= k_pos <= q_pos - sliding_window
    scores.masked_fill_(invalid, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)  # [Hkv, G, N, D]
    return out.permute(2, 0, 1, 3).reshape(num_tokens, num_heads, head_dim).to(q.dtype)


def decode_slots(block_tables: torch.Tensor, max_len: int, block_size: int) -> torch.Tensor:
    """Flat cache rows [B, max_len] for positions 0..max_len-1 of each block table (padding → row 0)."""
    pos = torch.arange(max_len, device=block_tables.device)
    return block_tables[:, pos // block_size].long().clamp_(min=0) * block_size + pos % block_size


@dataclass
class PrefillChunk:
    """One sequence's chunk of new tokens: rows ``row:row+num_tokens`` at positions ``start_pos...``."""

    row: int
    num_tokens: int
    start_pos: int
    block_table: torch.Tensor  # int32 [num_blocks]
    slots: torch.Tensor | None = None  # flat cache rows of positions 0..start_pos+num_tokens-1 (start_pos > 0)
    _masks: dict = field(default_factory=dict)

    def mask(self, sliding_window: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Additive [N, L] mask (0 = attend, -inf = not); None = plain causal over the chunk itself."""
        if sliding_window is None and self.start_pos == 0:
            return None
        if sliding_window not in self._masks:
            total = self.start_pos + self.num_tokens
            q_pos = torch.arange(self.start_pos, total, device=self.block_table.device).view(-1, 1)
            k_pos = torch.arange(total, device=self.block_table.device).view(1, -1)
            allowed = k_pos <= q_pos
            if sliding_window is not None:
                allowed &= k_pos > q_pos - sliding_window
            self._masks[sliding_window] = _additive(allowed, dtype)
        return self._masks[sliding_window]


@dataclass
class AttentionMetadata:
    """Where each token of a flat batch sits in the paged cache; built once per step by the model runner.

    Tokens are laid out as: all decode tokens first (one per sequence), then each prefill chunk.
    Per-step index tensors and masks are computed once here and reused by every layer.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, no -1 entries
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor | None  # [num_decodes] int32
    prefills: list[PrefillChunk] = field(default_factory=list)
    use_triton: bool = False
    block_size: int = 16
    decode_slots: torch.Tensor | None = None  # [num_decodes, max_len] (torch path)
    _decode_masks: dict = field(default_factory=dict)
    _kernel_rows: AttentionRows | None = None
    rope_cache: dict = field(default_factory=dict)  # per-step cos/sin, keyed by the rotary module's params

    def decode_mask(self, sliding_window: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Additive [B, 1, 1, L] mask over the gathered positions (SDPA's CPU kernel is faster with a float
        mask than with a bool one); None when it would be all zeros (one sequence, no window cutting its keys:
        SDPA without a mask gives the same bits)."""
        if sliding_window not in self._decode_masks:
            assert self.decode_slots is not None and self.decode_context_lens is not None
            batch, max_len = self.decode_slots.shape
            if batch == 1 and (sliding_window is None or max_len <= sliding_window):
                self._decode_masks[sliding_window] = None
                return None
            pos = torch.arange(max_len, device=self.decode_slots.device).view(1, -1)
            lens = self.decode_context_lens.long().view(-1, 1)
            allowed = pos < lens
            if sliding_window is not None:
                allowed &= pos >= lens - sliding_window
            self._decode_masks[sliding_window] = _additive(allowed.view(-1, 1, 1, max_len), dtype)
        return self._decode_masks[sliding_window]

    def kernel_rows(self) -> AttentionRows:
        """Every row's keys, for the compiled attention (CPU path, the kernels set): decode rows, then each
        chunk's rows (a chunk's row i attends to positions 0 .. start_pos + i)."""
        if self._kernel_rows is None:
            slots, offsets, lengths = [], [], []
            if self.num_decode_tokens:
                assert self.decode_slots is not None and self.decode_context_lens is not None
                batch, max_len = self.decode_slots.shape
                slots.append(self.decode_slots.reshape(-1))
                offsets.append(torch.arange(batch, dtype=torch.int64) * max_len)
                lengths.append(self.decode_context_lens.long())
            base = sum(s.numel() for s in slots)
            for chunk in self.prefills:
                keys = chunk.slots if chunk.start_pos > 0 else self.slot_mapping[chunk.row:chunk.row + chunk.num_tokens]
                slots.append(keys)
                offsets.append(torch.full((chunk.num_tokens,), base, dtype=torch.int64))
                lengths.append(torch.arange(chunk.start_pos + 1, chunk.start_pos + chunk.num_tokens + 1))
                base += keys.numel()
            self._kernel_rows = AttentionRows(torch.cat(slots), torch.cat(offsets), torch.cat(lengths))
        return self._kernel_rows


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
          causal: bool = False) -> torch.Tensor:
    """q [B, Hq, N, D], k/v [B, Hkv, L, D] (GQA handled by SDPA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    """Paged attention for one layer; caches are attached by the model runner (``k_cache``/``v_cache``)."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
        sliding_window: int | None = None, softcap: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.softcap = scale, sliding_window, softcap
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.kernels: CpuKernels | None = None  # set by the model runner: every row goes compiled

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] → [N, Hq, D]."""
        if meta.use_triton:
            from backends.engine.layers.triton_attention import paged_decode_attention, store_kvcache

            store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        else:
            paged_decode_attention = None
            rows = self.k_cache.shape[0] * self.k_cache.shape[1]
            k_flat = self.k_cache.view(rows, self.num_kv_heads, self.head_dim)
            v_flat = self.v_cache.view(rows, self.num_kv_heads, self.head_dim)
            k_flat.index_copy_(0, meta.slot_mapping, k)
            v_flat.index_copy_(0, meta.slot_mapping, v)
        if self.kernels is not None and self.softcap is None:
            out = self.kernels.paged_attention(q, self.k_cache, self.v_cache, meta.kernel_rows(), self.scale,
                                               self.sliding_window)
            if out is not None:
                return out
        nd = meta.num_decode_tokens
        out = torch.empty_like(q) if meta.prefills else None
        if nd:
            if paged_decode_attention is not None:
                dec = paged_decode_attention(
                    q[:nd], self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_context_lens,
                    self.scale, self.sliding_window, self.softcap,
                )
            else:
                dec = self._decode_torch(q[:nd], k_flat, v_flat, meta)
            if out is None:
                return dec
            out[:nd] = dec
        for chunk in meta.prefills:
            rows_ = slice(chunk.row, chunk.row + chunk.num_tokens)
            out[rows_] = self._prefill(q[rows_], k[rows_], v[rows_], chunk)
        return out

    def _decode_torch(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        if self.softcap is not None:
            return paged_decode_attention_torch(
                q, self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale,
                self.sliding_window, self.softcap,
            )
        batch, max_len = meta.decode_slots.shape
        flat = meta.decode_slots.view(-1)  # index_select is ~10x faster than advanced indexing on CPU
        keys = k_flat.index_select(0, flat).view(batch, max_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = v_flat.index_select(0, flat).view(batch, max_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = _sdpa(q.unsqueeze(2), keys, values, meta.decode_mask(self.sliding_window, q.dtype), self.scale)
        return out.view(batch, self.num_heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        if self.softcap is not None:
            return paged_prefill_attention_torch(
                q, self.k_cache, self.v_cache, chunk.block_table, chunk.start_pos, self.scale,
                self.sliding_window, self.softcap,
            )
        if chunk.start_pos > 0:  # earlier positions live in the cache (prefix hit / chunked prefill)
            rows = self.k_cache.shape[0] * self.k_cache.shape[1]
            k = self.k_cache.view(rows, self.num_kv_heads, self.head_dim).index_select(0, chunk.slots)
            v = self.v_cache.view(rows, self.num_kv_heads, self.head_dim).index_select(0, chunk.slots)
        mask = chunk.mask(self.sliding_window, q.dtype)
        out = _sdpa(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                    mask, self.scale, causal=mask is None)
        return out[0].transpose(0, 1)
