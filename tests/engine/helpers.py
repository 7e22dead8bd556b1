"""Shared helpers for engine tests: HF reference generation and small engines."""

from __future__ import annotations

from pathlib import Path

import torch

from backends.engine.args import EngineArgs
from backends.engine.llm_engine import LLMEngine

_HF: dict[str, object] = {}


def hf_model(folder: Path):
    import transformers as tf

    key = str(folder)
    if key not in _HF:
        model = tf.AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # compare fixed-length greedy continuations
        _HF[key] = model
    return _HF[key]


def hf_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    model = hf_model(folder)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logprobs(folder: Path, tokens: list[int]) -> torch.Tensor:
    """log_softmax of HF logits at every position of ``tokens`` → [len, vocab]."""
    model = hf_model(folder)
    with torch.inference_mode():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def tiny_engine(folder: Path, stat_loggers=(), clock=None, **options) -> LLMEngine:
    """A CPU engine with small defaults; ``clock`` (optional) replaces time.monotonic as the engine's clock."""
    defaults = dict(num_kv_blocks=128, block_size=4, max_model_len=256, max_num_batched_tokens=64,
                    max_num_seqs=64, num_threads=1)
    defaults.update(options)
    extra = {"clock": clock} if clock is not None else {}
    return LLMEngine(str(folder), EngineArgs(**defaults), device="cpu", stat_loggers=stat_loggers, **extra)


def prompts(num: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(num)]
