"""Quantized linear layers for CPU decode (memory-bandwidth bound): int8 and int4 weights.

``quantize_model(model, "int8")`` replaces every ``nn.Linear`` (except ``lm_head`` unless asked) in place
with ``Int8Linear`` (symmetric int8); ``"int4"`` uses ``Int4Linear`` (asymmetric 4-bit groups of 32 along K,
the GGUF Q4_1 layout). ``quantize_for_engine`` is what the engine applies under ``EngineArgs.quantization``:
``quantize_model`` plus lm_head in int8, under int4 as well.

Kernels: where the engine's native kernels build (``layers/native.py``, the system C compiler, x86 with
AVX2), both layers run them: weights with a scale per block of 32 inputs, activations quantized per block
of 32 in two int8 levels (error below a bf16 rounding), integer dot products (AMX tiles for batches of 16 rows
or more and AVX-512 VNNI where the CPU has them), and a row's result does not depend on the rest of its batch
or the thread count. Elsewhere torch's packed kernels run: ``_weight_int8pack_mm`` (a scale per output row)
and ``_weight_int4pack_mm_for_cpu``, with activations cast to ``compute_dtype`` (bf16: torch's CPU kernels are
vectorized for it) and back. ``kernel=`` on ``from_linear`` and
``quantize_model`` picks one explicitly.

Embeddings are never quantized; ``lm_head`` is left alone by ``quantize_model`` by default (it is tied to the
embedding in small models and its argmax decides every greedy token). The replaced modules own their packed
weights; the original fp32 weights are released (unless still referenced elsewhere, e.g. a tied embedding).
"""

from __future__ import annotations

import torch
from torch import nn

from backends.engine.layers import native
from backends.engine.layers.native import CpuKernels

METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 32


KERNELS = ("auto", "native", "torch")


def _native_kernels(kernel: str) -> CpuKernels | None:
    """The native kernels for ``kernel`` = auto (where they build) / native (ValueError if they cannot) /
    torch (None)."""
    if kernel not in KERNELS:
        raise ValueError(f"quantized kernel must be auto, native or torch; got {kernel!r}")
    kernels = native.kernel() if kernel != "torch" else None
    if kernel == "native" and kernels is None:
        raise ValueError(f"the native quantized kernels cannot run here: {native.unavailable_reason()}")
    return kernels


def _native_forward(fn, x: torch.Tensor, blocks: torch.Tensor, out_features: int,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """A native kernel on 2-d ``x``: it reads float32 rows, so other dtypes go in as float32 and come back."""
    x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = fn(x32, blocks, out_features, bias)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class Int8Linear(nn.Module):
    """Symmetric int8 weights, ``w = q * scale``.

    Two kernels, chosen when the layer is built (``kernel``): the engine's native one (``layers/native.py``:
    a scale per block of 32 inputs, int8 activations, VNNI/AVX2; K a multiple of 32) where it builds, else
    torch's ``_weight_int8pack_mm`` (a scale per output row, bf16 activations)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, in_features: int, out_features: int,
                 native_kernels: CpuKernels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.native = native_kernels
        self.register_buffer("weight_int8", weight_int8)  # native: pack_q8's blocks (scales inside)
        self.register_buffer("scales", None if scales is None else scales.to(compute_dtype))
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16,
                    kernel: str = "auto") -> Int8Linear:
        kernels = _native_kernels(kernel if linear.in_features % native.GROUP_SIZE == 0 else "torch")
        w = linear.weight.detach().float()
        n, k = w.shape
        if kernels is not None:
            bias = None if linear.bias is None else linear.bias.detach().clone().float()
            return cls(native.pack_q8(w), None, bias, compute_dtype, k, n, kernels)
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w_int8, scales, bias, compute_dtype, k, n)

    @property
    def kernel(self) -> str:
        return "native" if self.native is not None else "torch"

    def dequantized_weight(self) -> torch.Tensor:
        if self.native is not None:
            return native.unpack_q8(self.weight_int8, self.out_features)
        return self.weight_int8.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if self.native is not None:
            return _native_forward(self.native.q8_linear, x, self.weight_int8, self.out_features, self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.to(self.compute_dtype), self.weight_int8, self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int4Linear(nn.Module):
    """4-bit asymmetric groups of ``group_size`` along K.

    Two kernels, chosen when the layer is built (``kernel``): the engine's native one (``layers/native.py``:
    int8 activations, VNNI/AVX2) where it builds, else torch's ``_weight_int4pack_mm_for_cpu`` (bf16
    activations). Both store ``w = q * d + o`` per group of 32; they differ in the activations' rounding
    (two int8 levels per block of 32 vs bf16) and in the storage of d and o (fp16 vs bf16)."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor | None, bias: torch.Tensor | None,
                 in_features: int, out_features: int, group_size: int, compute_dtype: torch.dtype,
                 native_kernel: CpuKernels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = compute_dtype
        self.native = native_kernel
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", None if scales_and_zeros is None else scales_and_zeros.to(compute_dtype))
        self.register_buffer("bias", bias)

    @staticmethod
    def can_quantize(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
        return linear.in_features % group_size == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE,
                    compute_dtype: torch.dtype = torch.bfloat16, kernel: str = "auto") -> Int4Linear:
        """``kernel``: "auto" (native where it builds, else torch), "native" (ValueError where it cannot run)
        or "torch"."""
        if not cls.can_quantize(linear, group_size):
            raise ValueError(f"in_features {linear.in_features} is not a multiple of the int4 group size {group_size}")
        native_kernel = _native_kernels(kernel if group_size == native.GROUP_SIZE else "torch")
        w = linear.weight.detach().float()
        n, k = w.shape
        bias = None if linear.bias is None else linear.bias.detach().clone().float()
        if native_kernel is not None:
            return cls(native.pack_q4(w), None, bias, k, n, group_size, compute_dtype, native_kernel)
        groups = w.reshape(n, k // group_size, group_size)
        w_min, w_max = groups.amin(dim=2), groups.amax(dim=2)
        scales = ((w_max - w_min) / 15.0).clamp(min=1e-10)
        q = torch.round((groups - w_min[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
        zeros = w_min + 8.0 * scales  # so that (q - 8) * scale + zero == q * scale + w_min
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).contiguous(), 1)
        scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=2).contiguous()  # [K/G, N, 2]
        return cls(packed, scales_and_zeros, bias, k, n, group_size, compute_dtype)

    @property
    def kernel(self) -> str:
        return "native" if self.native is not None else "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if self.native is not None:
            return _native_forward(self.native.q4_linear, x, self.weight_int4, self.out_features, self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(self.compute_dtype), self.weight_int4, self.group_size, self.scales_and_zeros
        ).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, kernel={self.kernel}")


def quantize_model(
    model: nn.Module, method: str, include_lm_head: bool = False, compute_dtype: torch.dtype = torch.bfloat16,
    kernel: str = "auto",
) -> int:
    """Replace ``nn.Linear`` modules in place with quantized ones; returns how many.

    ``method``: "int8" or "int4" (int4 skips layers whose in_features is not a multiple of 32).
    ``kernel``: auto / native / torch (see the module doc). CPU only. Raises ValueError for an unknown
    method or kernel, or a model on another device.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; valid: {', '.join(METHODS)}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize_model needs an nn.Module, got {type(model).__name__}")
    for p in model.parameters():
        if p.device.type != "cpu":
            raise ValueError(f"{method} uses CPU kernels; the model is on {p.device}")
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
            new = Int8Linear.from_linear(child, compute_dtype, kernel=kernel)
        else:
            new = Int4Linear.from_linear(child, compute_dtype=compute_dtype, kernel=kernel)
        setattr(parent, child_name, new)
    return len(targets)


def quantize_for_engine(model: nn.Module, method: str) -> int:
    """What the engine does to its model under ``EngineArgs.quantization`` = ``method``: ``quantize_model``,
    then lm_head in int8 as well (under int4 too) unless it is already replaced; returns how many layers were
    replaced. Benchmarks that need the engine's numerics in an HF model (perplexity) call
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
