"""HF ``architectures`` name → engine model class."""

from __future__ import annotations

from torch import nn

from backends.engine.models.gemma3 import Gemma3ForCausalLM
from backends.engine.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


def model_class(architectures: list[str] | None) -> type[nn.Module]:
    """The class for the first known architecture; ValueError naming the supported ones otherwise."""
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {architectures!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
