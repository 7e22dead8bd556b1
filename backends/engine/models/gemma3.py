"""Gemma 3 text decoder: sliding-window + global layers (own rope bases), q/k-norm, (1+w) RMSNorm,
sandwich norms around attention and MLP, sqrt(hidden) embedding scale, optional softcapping."""

from __future__ import annotations

import torch
from torch import nn

from backends.engine.layers.attention import Attention, AttentionMetadata
from backends.engine.layers.norm import GemmaRMSNorm
from backends.engine.layers.rotary import RotaryEmbedding
from backends.engine.models.llama import CausalLM, GatedMLP, rope_parameters


class Gemma3Attention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        layer_type = config.layer_types[layer_idx] if getattr(config, "layer_types", None) else "full_attention"
        is_sliding = layer_type == "sliding_attention"
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        rope = rope_parameters(config, layer_type)
        if "rope_theta" not in rope:  # transformers 4 layout
            base = getattr(config, "rope_local_base_freq", 10000.0) if is_sliding else config.rope_theta
            rope = {"rope_type": "default", "rope_theta": base}
        self.rotary = RotaryEmbedding(self.head_dim, rope, config.max_position_embeddings)
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, config.query_pre_attn_scalar**-0.5,
            sliding_window=config.sliding_window if is_sliding else None,
            softcap=getattr(config, "attn_logit_softcapping", None),
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim))
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta).reshape(n, self.q_size))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.mlp = GatedMLP(h, config.intermediate_size, getattr(config, "hidden_activation", "gelu_pytorch_tanh"))
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
