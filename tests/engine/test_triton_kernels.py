"""Triton KV-write and paged decode kernels against the torch path (attention.py).

On CPU these run under TRITON_INTERPRET=1 (set in conftest). On a GPU machine run them compiled with
``TRITON_INTERPRET=0 pytest tests/engine/test_triton_kernels.py`` (tensors then live on CUDA).

Tolerances: fp32 atol/rtol 1e-4 (different summation order: online softmax over tiles vs one softmax);
bf16/fp16 outputs are compared to the torch path on the same low-precision cache with atol 2e-2 / 1e-2,
i.e. about one bf16/fp16 rounding step of values of magnitude <= 1 (both accumulate in fp32 and round
once at the end). KV writes are exact copies (equality).
"""

from __future__ import annotations

import os

import pytest
import torch

from backends.engine.layers.attention import paged_decode_attention_torch, store_kvcache_torch
from backends.engine.layers.triton_attention import paged_decode_attention, store_kvcache

pytestmark = pytest.mark.slow  # TRITON_INTERPRET runs the kernels in Triton's interpreter: seconds per file

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2)}


def _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    return k, v


def _random_tables(context_lens, block_size, num_blocks, gen):
    """Distinct random physical blocks per sequence; unused table entries are -1."""
    max_blocks = max((n + block_size - 1) // block_size for n in context_lens)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    for i, n in enumerate(context_lens):
        for j in range((n + block_size - 1) // block_size):
            table[i, j] = perm.pop()
    return table.to(DEVICE), torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 16), (3, 24)])
def test_store_kvcache_matches_torch_and_skips_negative_slots(dtype, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, n = 6, 4, 9
    k_ref, v_ref = (torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in "kv")
    k_tri, v_tri = k_ref.clone(), v_ref.clone()
    # key/value as non-contiguous views of a fused qkv-like buffer (what a model passes)
    fused = torch.randn(n, 3, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(torch.int64)
    slots[[2, 5]] = -1
    slots = slots.to(DEVICE)
    store_kvcache_torch(key, value, k_ref, v_ref, slots)
    store_kvcache(key, value, k_tri, v_tri, slots)
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)
    flat = k_tri.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[slots[0]], key[0])
    assert int((k_tri != 0).any(dim=(2, 3)).sum()) == n - 2  # the two -1 slots wrote nothing


def test_store_kvcache_casts_into_cache_dtype():
    key = torch.randn(3, 2, 8, device=DEVICE)
    value = torch.randn(3, 2, 8, device=DEVICE)
    k_cache = torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    store_kvcache(key, value, k_cache, v_cache, torch.tensor([0, 5, 7], device=DEVICE))
    # within one bf16 step: the interpreter's fp32 → bf16 cast truncates where CUDA rounds to nearest
    torch.testing.assert_close(k_cache.view(-1, 2, 8)[5].float(), key[1], atol=1e-6, rtol=2**-7)


CASES = [
    # (num_heads, num_kv_heads, head_dim, block_size, context_lens, sliding_window, softcap)
    (4, 4, 32, 16, [1, 17, 40], None, None),  # MHA, partial last blocks, a 1-token context
    (8, 2, 64, 16, [33, 5, 130, 64], None, None),  # GQA group 4, several tiles (tile = 128 interpreted)
    (6, 2, 24, 8, [50, 9], None, None),  # non-power-of-two head_dim and group 3
    (4, 1, 32, 16, [200, 7, 64], 48, None),  # sliding window (MQA): window < len, > len, == a block edge
    (4, 2, 16, 4, [23, 70], None, 30.0),  # Gemma-2 style softcap
    (2, 2, 16, 16, [150, 3], 100, 20.0),  # window and softcap together
    (9, 3, 64, 16, [140, 1], None, None),  # SmolLM2-135M heads
    (4, 1, 256, 16, [37, 300], 512, None),  # Gemma-3-270M heads, window longer than the context
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_paged_decode_attention_matches_torch(case, dtype):
    num_heads, num_kv_heads, head_dim, block_size, context_lens, window, softcap = case
    gen = torch.Generator().manual_seed(len(context_lens) * 7 + head_dim)
    num_blocks = sum((n + block_size - 1) // block_size for n in context_lens) + 3
    k_cache, v_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables, lens = _random_tables(context_lens, block_size, num_blocks, gen)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    ref = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, scale, window, softcap)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, window, softcap)
    assert out.shape == q.shape and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def test_paged_decode_attention_on_a_strided_query_and_single_key():
    """q as a view of a fused qkv projection; a 1-token context returns exactly that token's value."""
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = _random_cache(4, 8, 2, 16, torch.float32, gen)
    fused = torch.randn(2, 8, 16, generator=gen).to(DEVICE)
    q = fused[:, :4]  # [B, Hq=4, D], stride(0) = 8 * 16
    tables = torch.tensor([[2, -1], [0, 3]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([1, 12], dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    expected_first = v_cache[2, 0].repeat_interleave(2, dim=0)  # heads 0,1 → kv 0; heads 2,3 → kv 1
    torch.testing.assert_close(out[0], expected_first, atol=1e-6, rtol=1e-6)
    ref = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_misuse_raises_value_error():
    k_cache = torch.zeros(2, 4, 2, 8, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    q = torch.zeros(1, 3, 8, device=DEVICE)  # 3 heads over 2 kv heads
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(torch.zeros(2, 2, 8), torch.zeros(2, 2, 8), k_cache, v_cache, torch.zeros(3, dtype=torch.int64))
