"""RMSNorm variants: Llama/Qwen (``w * x_hat``) and Gemma (``(1 + w) * x_hat``), computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.layers.native import CpuKernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels: CpuKernels | None = None  # set by the model runner: 2-d float32 inputs go compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dim() == 2:
            y = self.kernels.rms_norm(x, self.weight, self.eps, 0.0)
            if y is not None:
                return y
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op, bit-identical to the expression below in float32 (tests/engine/test_norm.py)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.kernels: CpuKernels | None = None  # as RMSNorm's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dim() == 2:
            y = self.kernels.rms_norm(x, self.weight, self.eps, 1.0)
            if y is not None:
                return y
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)
