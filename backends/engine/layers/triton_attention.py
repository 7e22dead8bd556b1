"""Triton kernels for the paged KV cache: KV writes and single-token (decode) attention.

Same contract as the torch path in ``attention.py`` (``store_kvcache_torch`` /
``paged_decode_attention_torch``), which is the reference the tests compare against:

- KV cache per layer: ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``,
  token slot ``slot = block_id * block_size + offset``, slot ``-1`` = do not store.
- ``store_kvcache(key, value, k_cache, v_cache, slot_mapping)``: key/value ``[N, Hkv, D]`` (any strides),
  ``slot_mapping`` ``[N]`` int64. Writes in place; returns None.
- ``paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
  softcap) -> out``: q ``[B, Hq, D]``, ``block_tables`` ``[B, max_blocks]`` int32, ``context_lens`` ``[B]``
  int32 counting the keys including the current token (already stored). GQA: Hq is a multiple of Hkv.
  ``sliding_window`` keeps the last ``sliding_window`` keys; ``softcap`` applies
  ``softcap * tanh(scores / softcap)`` before the softmax. Returns a new ``[B, Hq, D]`` tensor in q's dtype.

Kernel shape: one program per (sequence, kv head) for decode, covering the whole GQA group, so each KV
tile is read once per group. A tile is ``TILE_N`` token positions, gathered through the block table
(position → block → slot), so the tile size does not depend on the block size; softmax is online in fp32.
Products are broadcast-and-sum rather than ``tl.dot`` (decode is memory bound, the group can be < 16
rows, and it sidesteps the interpreter's bf16 ``tl.dot`` bug). Inputs are upcast to fp32 in-kernel.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Importing this module does no
work beyond defining the kernels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    key_stride_n, key_stride_h, key_stride_d,
    value_stride_n, value_stride_h, value_stride_d,
    num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < num_kv_heads) & (d < head_dim)
        k = tl.load(key_ptr + token * key_stride_n + h * key_stride_h + d * key_stride_d, mask=mask)
        v = tl.load(value_ptr + token * value_stride_n + h * value_stride_h + d * value_stride_d, mask=mask)
        dst = slot * num_kv_heads * head_dim + h * head_dim + d  # cache rows are contiguous
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must be equal 4-d tensors, got {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def store_kvcache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``key``/``value`` [N, Hkv, D] into the caches at ``slot_mapping`` [N] (-1 = skip), in place."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit cache {tuple(k_cache.shape)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    q_stride_b, q_stride_h, q_stride_d,
    out_stride_b, out_stride_h,
    block_tables_stride_b,
    scale, softcap, sliding_window,
    num_kv_heads, head_dim, block_size,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(context_len - sliding_window, 0)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < head_dim
    q_heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * q_stride_b + q_heads[:, None] * q_stride_h + d[None, :] * q_stride_d,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    row_stride = num_kv_heads * head_dim
    n = tl.arange(0, TILE_N)
    for tile_start in range(start, context_len, TILE_N):
        pos = tile_start + n
        n_mask = pos < context_len
        block = tl.load(block_tables_ptr + seq * block_tables_stride_b + pos // block_size, mask=n_mask, other=0)
        slot = block.to(tl.int64) * block_size + pos % block_size
        kv_off = slot[:, None] * row_stride + kv_head * head_dim + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [TILE_N, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BLOCK_G, TILE_N]
        if USE_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # context_len 0 → zeros, never NaN
    tl.store(
        out_ptr + seq * out_stride_b + q_heads[:, None] * out_stride_h + d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :],
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] → out [B, Hq, D] (see the module docstring)."""
    _check_cache(k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)} (Hq must be a multiple of Hkv)")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError("block_tables must be [B, max_blocks] and context_lens [B]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_g = triton.next_power_of_2(group)
    # interpreter: few, large tiles (each op costs a numpy call); GPU: keep the [G, N, D] product in registers
    tile_n = 128 if _interpreted() else max(16, min(64, 16384 // (block_g * block_d)))
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        num_kv_heads, head_dim, k_cache.shape[1],
        GROUP=group, BLOCK_G=block_g, BLOCK_D=block_d, TILE_N=tile_n,
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None,
    )
    return out
