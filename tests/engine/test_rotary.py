"""RoPE inverse frequencies equal HF's for the supported rope types; unsupported ones are rejected."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from backends.engine.layers.rotary import RotaryEmbedding, rope_inv_freq

ROPES = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_inv_freq_matches_hf(kind):
    config = tf.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=ROPES[kind],
                            max_position_embeddings=4096)
    expected, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    torch.testing.assert_close(rope_inv_freq(16, ROPES[kind]), expected, rtol=0, atol=0)


def test_unsupported_rope_type():
    with pytest.raises(ValueError, match="unsupported rope_type"):
        rope_inv_freq(16, {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})


def test_rotary_reuses_cos_sin_within_a_step():
    rope = RotaryEmbedding(8, {"rope_type": "default", "rope_theta": 10000.0}, 64)
    pos = torch.tensor([0, 5, 9])
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    q1, k1 = rope(pos, q, k)
    cached = rope._step
    rope(pos, q, k)
    assert rope._step is cached
    # position 0 is the identity
    torch.testing.assert_close(q1[0], q[0])
    torch.testing.assert_close(k1[0], k[0])
