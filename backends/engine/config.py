"""EngineConfig: EngineArgs resolved against one model folder and one device (read-only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.engine.args import EngineArgs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" = float32 on CPU (bf16 is emulated there), bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_quantization(quantization: str, device: torch.device, device_is_explicit: bool) -> str:
    """The weight format the engine applies. int8 / int4 are CPU formats (CPU-only kernels): on CUDA
    they are a ValueError when the device was chosen explicitly (the two options contradict each other), and
    with ``device: auto`` they are not applied ("none", a warning; the GPU serves ``dtype`` weights), so a
    config written for CPU — the embedded default — still starts on a machine with a GPU."""
    if quantization == "none" or device.type == "cpu":
        return quantization
    if device_is_explicit:
        raise ValueError(f"quantization {quantization!r} is a CPU weight format (CPU-only kernels); "
                         f"device is {device.type}: set quantization to none, or device to cpu")
    logging.getLogger(__name__).warning(
        "quantization %r is a CPU weight format and device auto chose %s: the model runs unquantized there "
        "(set device: cpu to keep it)", quantization, device.type)
    return "none"


@dataclass(frozen=True)
class EngineConfig:
    """``args`` plus what follows from the model and the device: ``max_model_len`` is capped by the model's
    ``max_position_embeddings``; ``dtype`` is resolved ("auto"); ``quantization`` is the weight format applied
    (``resolve_quantization``: CPU formats are not applied on CUDA under ``device: auto``)."""

    model_path: Path
    hf_config: Any  # transformers PretrainedConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    quantization: str
    args: EngineArgs

    @classmethod
    def from_args(cls, model_path: str | Path, args: EngineArgs | None = None,
                  device: str | torch.device | None = None) -> EngineConfig:
        """Read the model folder's config.json. ``model_path`` must be a local HF folder (bundled names are
        resolved outside the engine: ``backends.models.resolve_model_path``); ``device`` overrides
        ``args.device``. Raises ValueError."""
        from transformers import AutoConfig

        args = args or EngineArgs()
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model {str(model_path)!r} is not a model folder (no config.json)")
        device_is_explicit = device is not None or args.device != "auto"
        if device is None and args.device != "auto":
            device = args.device
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        hf_config = AutoConfig.from_pretrained(str(path))
        hf_config = getattr(hf_config, "text_config", None) or hf_config
        max_pos = getattr(hf_config, "max_position_embeddings", args.max_model_len)
        max_model_len = min(args.max_model_len, max_pos)
        if args.num_kv_blocks is not None and args.num_kv_blocks * args.block_size < max_model_len:
            raise ValueError(
                f"num_kv_blocks * block_size ({args.num_kv_blocks * args.block_size}) must hold "
                f"max_model_len ({max_model_len}) tokens"
            )
        return cls(model_path=path, hf_config=hf_config, device=dev, dtype=resolve_dtype(args.dtype, dev),
                   max_model_len=max_model_len, quantization=resolve_quantization(args.quantization, dev,
                                                                                  device_is_explicit), args=args)
