"""Load an HF safetensors folder into an engine model (the folder is given: bundled names are resolved
outside the engine, by ``backends.models.resolve_model_path``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from backends.engine.models.registry import model_class


def load_weights(model: nn.Module, folder: Path) -> None:
    """Copy every tensor of ``*.safetensors`` into ``model``; fused q/k/v and gate/up get their slices."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors weights")
    loaded: set[str] = set()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name.startswith("lm_head.") and tied:
                    continue
                if "rotary_emb" in name:
                    continue
                tensor = f.get_tensor(name)
                target, shard = name, None
                for hf_name, (fused, index) in packed.items():
                    if f".{hf_name}." in name:
                        target, shard = name.replace(f".{hf_name}.", f".{fused}."), index
                        break
                if target not in params:
                    raise ValueError(f"unexpected weight {name!r} in {file.name}")
                param = params[target]
                with torch.no_grad():
                    if shard is None:
                        param.copy_(tensor)
                    else:
                        sizes = _shard_sizes(model, target, param.shape[0])
                        offset = sum(sizes[:shard])
                        param.narrow(0, offset, sizes[shard]).copy_(tensor)
                loaded.add(target)
    missing = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"weights missing from {folder}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _shard_sizes(model: nn.Module, param_name: str, total: int) -> list[int]:
    module = model.get_submodule(param_name.rsplit(".", 1)[0].rsplit(".", 1)[0])
    if param_name.rsplit(".", 2)[-2] == "qkv_proj":
        return [module.q_size, module.kv_size, module.kv_size]
    return [total // 2, total // 2]


def share_rotary(model: nn.Module) -> None:
    """One RotaryEmbedding per distinct rope config, so cos/sin are gathered once per step, not per layer."""
    from backends.engine.layers.rotary import RotaryEmbedding

    shared: dict[tuple, RotaryEmbedding] = {}
    for module in list(model.modules()):
        rotary = getattr(module, "rotary", None)
        if isinstance(rotary, RotaryEmbedding):
            module.rotary = shared.setdefault(rotary.key, rotary)


def load_model(folder: Path, hf_config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Build the registered class for ``hf_config.architectures`` without random init, then load weights."""
    cls = model_class(getattr(hf_config, "architectures", None))
    with torch.device("meta"):
        model = cls(hf_config)
    model = model.to_empty(device=device)
    share_rotary(model)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, folder)
    return model.to(dtype).eval()
