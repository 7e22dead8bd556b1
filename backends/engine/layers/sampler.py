"""Batched sampling: grammar mask, penalties, temperature (0 = argmax), top-k, top-p, min-p, per-request
seeds, logprobs.

Logprobs are those of the model's raw distribution (log-softmax of the logits before the grammar mask,
penalties and temperature), as OpenAI and vLLM report them. The grammar mask (``token_bitmask``, packed as
xgrammar fills it: token t allowed iff bit t % 32 of word t // 32 is set) comes first, so penalties,
temperature and the top-k/p filters only ever see tokens the grammar allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.engine.sampling_params import SamplingParams


@dataclass
class SamplerInput:
    """One row per sampling sequence."""

    params: list[SamplingParams]
    token_ids: list[list[int]]  # prompt + output so far (for penalties)
    num_prompt_tokens: list[int]
    generators: list[torch.Generator | None]
    token_bitmask: torch.Tensor | None = None  # int32 [rows, ceil(V / 32)]; all bits set = unconstrained


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # sampled token's logprob (None when not requested)
    top_logprobs: list[list[tuple[int, float]] | None]


def _apply_penalties(logits: torch.Tensor, inp: SamplerInput) -> torch.Tensor:
    for i, p in enumerate(inp.params):
        if not p.has_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(inp.token_ids[i])), device=logits.device, dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        output = inp.token_ids[i][inp.num_prompt_tokens[i]:]
        if output and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(output, device=logits.device).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """top-k, then top-p, then min-p on one row of temperature-scaled logits."""
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(-1)
        remove = cum - probs > p.top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


_BITS = torch.arange(32, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] with every token whose bit is 0 set to -inf (a new tensor)."""
    bits = (bitmask.to(logits.device).unsqueeze(-1) >> _BITS.to(logits.device)) & 1
    allowed = bits.view(bitmask.shape[0], -1)[:, : logits.shape[-1]].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def sample(logits: torch.Tensor, inp: SamplerInput) -> SamplerOutput:
    """``logits`` [B, V] float32 (one row per sampling sequence) → one token per row."""
    num_rows = logits.shape[0]
    want_logprobs = any(p.logprobs is not None for p in inp.params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if inp.token_bitmask is not None:
        logits = apply_token_bitmask(logits, inp.token_bitmask)
    if all(p.is_greedy and not p.has_penalties for p in inp.params):
        tokens = logits.argmax(dim=-1).tolist()
    else:
        logits = _apply_penalties(logits.clone(), inp)
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, p in enumerate(inp.params):
            if p.is_greedy:
                tokens.append(greedy[i])
                continue
            row = _filter(logits[i] / p.temperature, p)
            probs = torch.softmax(row, dim=-1)
            noise = torch.empty_like(probs).exponential_(1.0, generator=inp.generators[i])
            tokens.append(int((probs / noise).argmax()))
    logprobs: list[float | None] = [None] * num_rows
    tops: list[list[tuple[int, float]] | None] = [None] * num_rows
    if raw_logprobs is not None:
        for i, p in enumerate(inp.params):
            if p.logprobs is None:
                continue
            logprobs[i] = float(raw_logprobs[i, tokens[i]])
            if p.logprobs > 0:
                vals, ids = torch.topk(raw_logprobs[i], p.logprobs)
                tops[i] = list(zip(ids.tolist(), vals.tolist(), strict=True))
            else:
                tops[i] = []
    return SamplerOutput(tokens, logprobs, tops)
