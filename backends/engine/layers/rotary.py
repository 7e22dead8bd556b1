"""Rotary position embeddings (neox style: rotate halves), numerically as in HF transformers."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies for an HF ``rope_parameters`` dict (types: default, linear, llama3)."""
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope["factor"])
    if rope_type == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q [N, Hq, D] and k [N, Hkv, D] at ``positions`` [N]; cos/sin cached per device.

    ``rotate_half(x) * sin`` is computed as ``x.roll(D/2) * sin_signed`` (sin with its first half negated):
    the same products up to an exact sign flip, so bit-identical, in two ops instead of five. ``apply`` ropes
    one [N, H, D] tensor, so a caller whose q and k heads sit side by side ropes both in one go."""

    def __init__(self, head_dim: int, rope: dict, max_position: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope = dict(rope)
        self.max_position = max_position
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (positions, cos, sin_signed)

    @property
    def key(self) -> tuple:
        """Layers with equal keys can share one instance (and its per-step cos/sin)."""
        return (self.head_dim, tuple(sorted((k, str(v)) for k, v in self.rope.items())), self.max_position)

    def _cos_sin(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin_signed [max_position, D]."""
        key = (device, dtype)
        if key not in self._cache:
            inv_freq = rope_inv_freq(self.head_dim, self.rope).to(device)
            pos = torch.arange(self.max_position, device=device, dtype=torch.int64).float()
            freqs = pos[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            half = self.head_dim // 2
            self._cache[key] = (emb.cos().to(dtype), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype))
        return self._cache[key]

    def apply(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """RoPE of x [N, H, D] at ``positions`` [N] (cos/sin gathered once per step, i.e. per ``positions``)."""
        if self._step is None or self._step[0] is not positions:
            cos, sin = self._cos_sin(x.device, x.dtype)
            self._step = (positions, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
        _, cos, sin = self._step
        return x * cos + x.roll(self.head_dim // 2, -1) * sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(positions, q), self.apply(positions, k)
