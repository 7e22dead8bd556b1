"""EngineConfig: the validated, read-only settings of one engine instance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gateway.settings import EngineOptions

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" = float32 on CPU (bf16 is emulated there), bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    hf_config: Any  # transformers PretrainedConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_kv_blocks: int | None  # None = size from kv_cache_memory_gb
    kv_cache_memory_gb: float
    enable_prefix_caching: bool
    num_threads: int | None
    quantization: str

    @classmethod
    def from_options(cls, model_path: Path, options: EngineOptions | None = None,
                     device: str | torch.device | None = None) -> EngineConfig:
        from transformers import AutoConfig

        options = options or EngineOptions()
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        hf_config = AutoConfig.from_pretrained(str(model_path))
        hf_config = getattr(hf_config, "text_config", None) or hf_config
        max_pos = getattr(hf_config, "max_position_embeddings", options.max_model_len)
        max_model_len = min(options.max_model_len, max_pos)
        if options.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if options.num_kv_blocks is not None and options.num_kv_blocks * options.block_size < max_model_len:
            raise ValueError(
                f"num_kv_blocks * block_size ({options.num_kv_blocks * options.block_size}) must hold "
                f"max_model_len ({max_model_len}) tokens"
            )
        return cls(
            model_path=Path(model_path), hf_config=hf_config, device=dev, dtype=resolve_dtype(options.dtype, dev),
            max_model_len=max_model_len, max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens, block_size=options.block_size,
            num_kv_blocks=options.num_kv_blocks, kv_cache_memory_gb=options.kv_cache_memory_gb,
            enable_prefix_caching=options.enable_prefix_caching, num_threads=options.num_threads,
            quantization=options.quantization,
        )
