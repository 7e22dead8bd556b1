"""Greedy token equality with HF transformers: every architecture, mixed batches, prefix-cache hits,
preemption, chunked prefill, and the bundled real models."""

from __future__ import annotations

import pytest

from backends.engine.sampling_params import SamplingParams
from tests.engine.helpers import hf_greedy, prompts, tiny_engine

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
def test_tiny_greedy_matches_hf_mixed_batch(arch, tiny_model_dir):
    folder = tiny_model_dir(arch)
    engine = tiny_engine(folder)
    # lengths mix decode-sized, block-straddling and (for gemma3) longer-than-sliding-window (8) prompts
    batch = prompts(5, [1, 3, 11, 20, 37], seed=1)
    results = engine.generate(batch, GREEDY)
    for prompt, result in zip(batch, results, strict=True):
        assert result.token_ids == hf_greedy(folder, prompt, 10), f"{arch} prompt len {len(prompt)}"
        assert result.outputs[0].finish_reason == "length"
    assert engine.block_manager.num_used_blocks == 0


def test_gemma3_long_prompt_beyond_sliding_window_chunked(tiny_model_dir):
    folder = tiny_model_dir("gemma3")
    engine = tiny_engine(folder, max_num_batched_tokens=16)  # 50-token prompt in 4 chunks
    [prompt] = prompts(1, [50], seed=2)
    [result] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert result.token_ids == hf_greedy(folder, prompt, 16)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefix_cache_hits_keep_outputs(arch, tiny_model_dir):
    folder = tiny_model_dir(arch)
    engine = tiny_engine(folder)
    [shared] = prompts(1, [24], seed=3)
    first = shared + [7, 8, 9]
    second = shared + [10, 11]
    [r1] = engine.generate([first], GREEDY)
    assert r1.num_cached_tokens == 0
    [r2] = engine.generate([second], GREEDY)
    assert r2.num_cached_tokens == 24  # six full blocks of 4
    [r3] = engine.generate([first], GREEDY)  # full hit except the last block
    assert r3.num_cached_tokens == 24
    assert r1.token_ids == r3.token_ids == hf_greedy(folder, first, 10)
    assert r2.token_ids == hf_greedy(folder, second, 10)
    assert engine.stats().prefix_hit_rate > 0.5


def test_without_prefix_caching_same_outputs(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    engine = tiny_engine(folder, enable_prefix_caching=False)
    batch = prompts(3, [9, 17, 30], seed=4)
    results = engine.generate(batch + batch, GREEDY)
    for prompt, result in zip(batch + batch, results, strict=True):
        assert result.token_ids == hf_greedy(folder, prompt, 10)
        assert result.num_cached_tokens == 0


def test_outputs_survive_preemption(tiny_model_dir):
    folder = tiny_model_dir("llama")
    # 64 tokens of KV for 6 sequences that each grow to 12 + 24 = 36 tokens: preemption is certain
    engine = tiny_engine(folder, num_kv_blocks=16, max_model_len=64, block_size=4)
    batch = prompts(6, [12], seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = engine.generate(batch, params)
    assert engine.stats().num_preemptions > 0
    for prompt, result in zip(batch, results, strict=True):
        assert result.token_ids == hf_greedy(folder, prompt, 24)
    assert engine.block_manager.num_used_blocks == 0


def test_n_choices_share_prompt_blocks(tiny_model_dir):
    folder = tiny_model_dir("llama")
    engine = tiny_engine(folder, enable_prefix_caching=False)
    [prompt] = prompts(1, [14], seed=6)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=3)
    rid = engine.add_request(prompt, params)
    engine.step()  # parent prefill
    engine.step()  # children join, sharing the parent's 3 full prompt blocks
    parent, c1, c2 = engine.requests[rid]
    assert c1.block_table[:3] == c2.block_table[:3] == parent.block_table[:3]
    assert engine.block_manager.blocks[parent.block_table[0]].ref_count == 3
    while engine.has_unfinished_requests():
        engine.step()
    expected = hf_greedy(folder, prompt, 6)
    assert parent.output_token_ids == c1.output_token_ids == c2.output_token_ids == expected
    assert engine.block_manager.num_used_blocks == 0


def test_unknown_architecture_is_rejected(tmp_path):
    import json

    from backends.engine.models.registry import model_class

    with pytest.raises(ValueError, match="supported: Gemma3ForCausalLM"):
        model_class(["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "llama"}))
    from transformers import AutoConfig

    from backends.engine.loader import load_model

    cfg = AutoConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported model architecture"):
        load_model(tmp_path, cfg, None, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_bundled_models_match_hf(name, bundled_model_dir):
    folder = bundled_model_dir(name)
    engine = tiny_engine(folder, num_kv_blocks=64, block_size=16, max_model_len=512, num_threads=None)
    tok = engine.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):"]
    batch = [tok(t)["input_ids"] for t in texts]
    results = engine.generate(batch, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, result in zip(batch, results, strict=True):
        assert result.token_ids == hf_greedy(folder, prompt, 16), name
        # incremental detokenization adds up to the one-shot decode
        assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)


def test_n_choices_with_preemption_and_sampling_seeds(tiny_model_dir):
    folder = tiny_model_dir("llama")
    engine = tiny_engine(folder, num_kv_blocks=16, max_model_len=64, block_size=4, enable_prefix_caching=False)
    batch = prompts(3, [10, 13, 6], seed=7)
    results = engine.generate(batch, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=2))
    assert engine.stats().num_preemptions > 0
    for prompt, result in zip(batch, results, strict=True):
        expected = hf_greedy(folder, prompt, 20)
        assert [o.token_ids for o in result.outputs] == [expected, expected]
    assert engine.block_manager.num_used_blocks == 0
    # seeded sampling: reproducible across runs, different between choices
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, n=2, seed=5)
    a = engine.generate(batch[:1], params)[0]
    b = engine.generate(batch[:1], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids


@pytest.mark.slow  # builds and runs its own model
def test_mistral_with_sliding_window_matches_hf(tmp_path):
    import torch
    import transformers as tf

    from tests.conftest import _tiny_tokenizer

    config = tf.MistralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=8,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    tf.MistralForCausalLM(config).eval().save_pretrained(str(tmp_path))
    _tiny_tokenizer().save_pretrained(str(tmp_path))
    engine = tiny_engine(tmp_path)
    assert engine.model_runner.model.model.layers[0].self_attn.attn.sliding_window == 8
    batch = prompts(2, [5, 30], seed=8)
    for prompt, result in zip(batch, engine.generate(batch, GREEDY), strict=True):
        assert result.token_ids == hf_greedy(tmp_path, prompt, 10)
