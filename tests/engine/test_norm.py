"""RMSNorm's fused float32 path gives the same bits as the written-out formula; RoPE's roll form the same bits
as ``rotate_half`` (both are decode-speed rewrites that must not move a greedy token)."""

from __future__ import annotations

import pytest
import torch

from backends.engine.layers.norm import RMSNorm
from backends.engine.layers.rotary import RotaryEmbedding, rotate_half


@pytest.mark.parametrize("dim", [16, 64, 576])
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_rms_norm_fused_path_is_bit_identical(dim, rows):
    gen = torch.Generator().manual_seed(dim * rows)
    norm = RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen))
    x = torch.randn(rows, 3, dim, generator=gen) * 5
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), expected)


def test_rms_norm_keeps_low_precision_inputs_on_the_written_out_path():
    norm = RMSNorm(8)
    x = torch.randn(2, 8).to(torch.bfloat16)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
    assert norm(x).dtype == expected.dtype and torch.equal(norm(x), expected)


def test_rope_roll_form_is_bit_identical_to_rotate_half():
    rope = RotaryEmbedding(64, {"rope_type": "default", "rope_theta": 10000.0}, 512)
    gen = torch.Generator().manual_seed(0)
    pos = torch.tensor([0, 3, 77, 511])
    x = torch.randn(4, 12, 64, generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    emb = torch.cat((pos[:, None].float() * inv_freq,) * 2, dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    assert torch.equal(rope.apply(pos, x), x * cos + rotate_half(x) * sin)
    q, k = rope(pos, x[:, :9], x[:, 9:])  # forward = apply on each; joint q|k heads give the same bits
    assert torch.equal(torch.cat((q, k), dim=1), rope.apply(pos, x))
