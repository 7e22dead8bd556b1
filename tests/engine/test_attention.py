"""Torch paged attention vs a dense reference; the Attention layer's fast path vs the contract functions."""

from __future__ import annotations

import pytest
import torch

from backends.engine.layers.attention import (
    Attention,
    AttentionMetadata,
    PrefillChunk,
    decode_slots,
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
    store_kvcache_torch,
)

NB, BS, HKV, HQ, D = 12, 4, 2, 4, 16


def dense_ref(q, k, v, q_pos, scale, window=None, softcap=None):
    """q [N, Hq, D] at positions q_pos, k/v [L, Hkv, D] for positions 0..L-1."""
    kk = k.repeat_interleave(HQ // HKV, 1).transpose(0, 1)
    vv = v.repeat_interleave(HQ // HKV, 1).transpose(0, 1)
    s = torch.matmul(q.transpose(0, 1), kk.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    k_pos = torch.arange(k.shape[0]).view(1, -1)
    qp = torch.tensor(q_pos).view(-1, 1)
    bad = k_pos > qp
    if window:
        bad |= k_pos <= qp - window
    s = s.masked_fill(bad, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), vv).transpose(0, 1)


def fill(seq_len, block_table, kc, vc, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(seq_len, HKV, D, generator=g), torch.randn(seq_len, HKV, D, generator=g)
    pos = torch.arange(seq_len)
    slots = torch.tensor(block_table)[pos // BS] * BS + pos % BS
    store_kvcache_torch(k, v, kc, vc, slots)
    return k, v


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 5.0)])
def test_decode_matches_dense(window, softcap):
    kc, vc = torch.zeros(NB, BS, HKV, D), torch.zeros(NB, BS, HKV, D)
    tables = [[7, 2, 9], [1, 11, -1]]
    lens = [10, 5]
    refs, qs = [], []
    for i, (t, n) in enumerate(zip(tables, lens, strict=True)):
        k, v = fill(n, t, kc, vc, seed=i)
        q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(10 + i))
        qs.append(q)
        refs.append(dense_ref(q, k, v, [n - 1], 0.25, window, softcap))
    out = paged_decode_attention_torch(torch.cat(qs), kc, vc, torch.tensor(tables, dtype=torch.int32),
                                       torch.tensor(lens, dtype=torch.int32), 0.25, window, softcap)
    torch.testing.assert_close(out, torch.cat(refs), atol=1e-5, rtol=1e-5)


def test_store_skips_negative_slots():
    kc, vc = torch.zeros(NB, BS, HKV, D), torch.zeros(NB, BS, HKV, D)
    k = torch.ones(3, HKV, D)
    store_kvcache_torch(k, k * 2, kc, vc, torch.tensor([5, -1, 0]))
    assert kc.view(-1, HKV, D)[5].eq(1).all() and vc.view(-1, HKV, D)[0].eq(2).all()
    assert kc.abs().sum() == 2 * HKV * D


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("start", [0, 6])
def test_layer_fast_path_matches_contract_functions(window, start):
    """Mixed batch (two decodes + one prefill chunk) through Attention == the contract functions."""
    layer = Attention(HQ, HKV, D, 0.25, sliding_window=window)
    layer.k_cache, layer.v_cache = torch.zeros(NB, BS, HKV, D), torch.zeros(NB, BS, HKV, D)
    tables = [[7, 2, 9], [1, 11]]
    lens = [10, 5]
    for i, (t, n) in enumerate(zip(tables, lens, strict=True)):
        fill(n - 1, t, layer.k_cache, layer.v_cache, seed=i)  # all but the current decode token
    ptable = [3, 4, 5]
    if start:
        fill(start, ptable, layer.k_cache, layer.v_cache, seed=5)
    g = torch.Generator().manual_seed(9)
    num_prefill = 5
    n = 2 + num_prefill
    q, k, v = torch.randn(n, HQ, D, generator=g), torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
    dec_slots = [t[(ln - 1) // BS] * BS + (ln - 1) % BS for t, ln in zip(tables, lens, strict=True)]
    pre_pos = torch.arange(start, start + num_prefill)
    pre_slots = (torch.tensor(ptable)[pre_pos // BS] * BS + pre_pos % BS).tolist()
    bt = torch.tensor([[7, 2, 9], [1, 11, -1]], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    chunk = PrefillChunk(2, num_prefill, start, torch.tensor(ptable, dtype=torch.int32))
    if start:
        pos = torch.arange(start + num_prefill)
        chunk.slots = torch.tensor(ptable)[pos // BS] * BS + pos % BS
    meta = AttentionMetadata(slot_mapping=torch.tensor(dec_slots + pre_slots), num_decode_tokens=2,
                             decode_block_tables=bt, decode_context_lens=cl, prefills=[chunk], block_size=BS,
                             decode_slots=decode_slots(bt, 10, BS))
    out = layer(q, k, v, meta)
    ref_dec = paged_decode_attention_torch(q[:2], layer.k_cache, layer.v_cache, bt, cl, 0.25, window)
    ref_pre = paged_prefill_attention_torch(q[2:], layer.k_cache, layer.v_cache, chunk.block_table, start, 0.25,
                                            window)
    torch.testing.assert_close(out[:2], ref_dec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], ref_pre, atol=1e-5, rtol=1e-5)
    # and the prefill function itself against a dense reference
    rows = layer.k_cache.view(-1, HKV, D)
    pos = torch.arange(start + num_prefill)
    slots = torch.tensor(ptable)[pos // BS] * BS + pos % BS
    dense = dense_ref(q[2:], rows[slots], layer.v_cache.view(-1, HKV, D)[slots], pre_pos.tolist(), 0.25, window)
    torch.testing.assert_close(ref_pre, dense, atol=1e-5, rtol=1e-5)
