"""Llama-family decoders: Llama (SmolLM2), Mistral, Qwen2 (qkv bias), Qwen3 (q/k-norm).

Weights use HF names except that q/k/v and gate/up projections are fused (``packed_modules``); the loader
copies each HF shard into its slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.layers.attention import Attention, AttentionMetadata
from backends.engine.layers.norm import RMSNorm
from backends.engine.layers.rotary import RotaryEmbedding


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The rope dict of a (transformers 5 or 4) config; per layer type when the config has several."""
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if layer_type is not None and layer_type in rope:
        return dict(rope[layer_type])
    return dict(rope)


def layer_sliding_window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "model_type", "") == "mistral":
        return window
    return None


class DecoderAttention(nn.Module):
    def __init__(self, config, layer_idx: int, *, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(self.head_dim, rope_parameters(config), config.max_position_embeddings)
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5,
            sliding_window=layer_sliding_window(config, layer_idx),
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        heads = self.qkv_proj(x).view(n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk_heads = self.num_heads + self.num_kv_heads
        v = heads[:, qk_heads:]
        if self.qk_norm:
            q, k = self.rotary(positions, self.q_norm(heads[:, :self.num_heads]),
                               self.k_norm(heads[:, self.num_heads:qk_heads]))
        else:  # q and k heads side by side: one RoPE over both (views of one tensor from here on)
            qk = self.rotary.apply(positions, heads[:, :qk_heads])
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.reshape(n, self.q_size))


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        if act == "silu":
            self.act = F.silu
        elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = lambda x: F.gelu(x, approximate="tanh")
        elif act == "gelu":
            self.act = F.gelu
        else:
            raise ValueError(f"unsupported activation {act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, *, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config, layer_idx, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu"),
            bias=getattr(config, "mlp_bias", False),
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config, *, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class CausalLM(nn.Module):
    """Base for all engine models: ``forward`` → final hidden states; ``compute_logits`` → float32 logits."""

    packed_modules = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    final_logit_softcapping: float | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]


class LlamaForCausalLM(CausalLM):
    qkv_bias: bool | None = None  # None = config.attention_bias
    qk_norm = False

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = attention_bias if self.qkv_bias is None else False
        self.model = DecoderModel(config, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=self.qk_norm)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True  # q/k/v carry biases; o_proj does not


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
