"""Weight-only quantization of a model's linear layers for CPU decode (memory-bandwidth bound).

``quantize_model(model, "int8")`` replaces every ``nn.Linear`` (except ``lm_head`` unless asked) in place
with ``Int8Linear``: symmetric per-output-channel int8 weights, ``scale[n] = max|W[n, :]| / 127``, run by
torch's packed int8 matmul ``torch.ops.aten._weight_int8pack_mm(x, w_int8[N, K], scales[N])``.
``"int4"`` uses ``Int4Linear``: asymmetric 4-bit groups of 32 along K (the GGUF Q4_1 layout in spirit),
run by ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

Activations: torch's CPU int8 kernel is vectorized for bf16 activations (AVX-512) and falls back to a
scalar loop for fp32, so on CPU the layer casts activations to ``compute_dtype`` (bf16 by default), runs
the kernel and casts the result back to the input dtype. Weights move 4x (int8) / ~7x (int4) fewer bytes
than fp32. Embeddings are never quantized; ``lm_head`` is left alone by default (it is tied to the
embedding in small models and its argmax decides every greedy token) — pass ``include_lm_head=True`` to
quantize it too. ``quantize_for_engine`` is what the engine applies under ``EngineArgs.quantization``:
``quantize_model`` plus lm_head in int8 (per-row scales), under int4 as well.

The replaced modules own their packed weights; the original fp32 weights are released (unless still
referenced elsewhere, e.g. a tied embedding).
"""

from __future__ import annotations

import torch
from torch import nn

METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 32


class Int8Linear(nn.Module):
    """``y = x @ (w_int8 * scales[:, None]).T + bias`` with per-output-channel scales."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = weight_int8.shape[1]
        self.out_features = weight_int8.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales.to(compute_dtype))
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w_int8, scales, bias, compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(x.to(self.compute_dtype), self.weight_int8, self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


class Int4Linear(nn.Module):
    """4-bit asymmetric groups of ``group_size`` along K: ``w = (q - 8) * scale + zero`` per group."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int, group_size: int, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(compute_dtype))
        self.register_buffer("bias", bias)

    @staticmethod
    def can_quantize(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
        return linear.in_features % group_size == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE,
                    compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        if not cls.can_quantize(linear, group_size):
            raise ValueError(f"in_features {linear.in_features} is not a multiple of the int4 group size {group_size}")
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.reshape(n, k // group_size, group_size)
        w_min, w_max = groups.amin(dim=2), groups.amax(dim=2)
        scales = ((w_max - w_min) / 15.0).clamp(min=1e-10)
        q = torch.round((groups - w_min[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
        zeros = w_min + 8.0 * scales  # so that (q - 8) * scale + zero == q * scale + w_min
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).contiguous(), 1)
        scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=2).contiguous()  # [K/G, N, 2]
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, scales_and_zeros, bias, k, n, group_size, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(self.compute_dtype), self.weight_int4, self.group_size, self.scales_and_zeros
        ).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, compute_dtype={self.compute_dtype}")


def quantize_model(
    model: nn.Module, method: str, include_lm_head: bool = False, compute_dtype: torch.dtype = torch.bfloat16
) -> int:
    """Replace ``nn.Linear`` modules in place with weight-only quantized ones; returns how many.

    ``method``: "int8" or "int4" (int4 skips layers whose in_features is not a multiple of 32).
    CPU only: the packed kernels are torch's CPU ops. Raises ValueError for an unknown method or a model
    on another device.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; valid: {', '.join(METHODS)}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize_model needs an nn.Module, got {type(model).__name__}")
    for p in model.parameters():
        if p.device.type != "cpu":
            raise ValueError(f"weight-only {method} uses torch's CPU kernels; the model is on {p.device}")
        break
    targets = []
    for module in model.modules():
        for child_name, child in module.named_children():
            if type(child) is not nn.Linear:
                continue
            if child_name == "lm_head" and not include_lm_head:
                continue
            if method == "int4" and not Int4Linear.can_quantize(child):
                continue
            targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        if method == "int8":
            new = Int8Linear.from_linear(child, compute_dtype)
        else:
            new = Int4Linear.from_linear(child, compute_dtype=compute_dtype)
        setattr(parent, child_name, new)
    return len(targets)


def quantize_for_engine(model: nn.Module, method: str) -> int:
    """What the engine does to its model under ``EngineArgs.quantization`` = ``method``: ``quantize_model``,
    then lm_head in int8 as well (per-row scales, under int4 too) unless it is already replaced; returns how
    many layers were replaced. Benchmarks that need the engine's numerics in an HF model (perplexity) call
    this too, so both quantize the same way."""
    count = quantize_model(model, method, compute_dtype=torch.bfloat16)
    # lm_head in int8 too: left in fp32 it was the largest matrix read per token (tied 49k x 576 in smollm2,
    # ~1/3 of int8 decode time at c=1) and the largest GEMM at batch 32; tests/engine/test_quantization.py
    # checks greedy agreement with fp32
    lm_head = getattr(model, "lm_head", None)
    if type(lm_head) is nn.Linear:
        model.lm_head = Int8Linear.from_linear(lm_head)
        count += 1
    return count
