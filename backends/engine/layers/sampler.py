"""Batched sampling: grammar mask, logit bias, penalties, temperature (0 = argmax), top-k, top-p, min-p,
per-request seeds, logprobs.

Logprobs are those of the model's raw distribution (log-softmax of the logits before the grammar mask, logit
bias, penalties and temperature), as vLLM reports them by default (``logprobs_mode="raw_logprobs"``). The
grammar mask (``token_bitmask``, packed as xgrammar fills it: token t allowed iff bit t % 32 of word t // 32 is
set) comes first, so a bias never revives a token the grammar forbids (-inf + bias = -inf), and penalties,
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


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``logits`` [B, V] plus each row's ``logit_bias`` (one sparse add for the whole batch; a new tensor),
    or ``logits`` itself when no row has a bias."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, p in enumerate(params):
        for token_id, bias in p.logit_bias:
            rows.append(i)
            cols.append(token_id)
            vals.append(bias)
    if not rows:
        return logits
    dev = logits.device
    index = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
    return logits.index_put(index, torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)


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


def _processed(logits: torch.Tensor, inp: SamplerInput) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The target distribution of each row: ``logits`` masked by the grammar, biased and penalised (greedy
    rows take its argmax), and for sampled rows the probabilities after temperature, top-k, top-p and min-p."""
    if inp.token_bitmask is not None:
        logits = apply_token_bitmask(logits, inp.token_bitmask)
    logits = apply_logit_bias(logits, inp.params)
    if all(p.is_greedy and not p.has_penalties for p in inp.params):
        return logits, [None] * logits.shape[0]
    logits = _apply_penalties(logits.clone(), inp)
    probs = [None if p.is_greedy else torch.softmax(_filter(logits[i] / p.temperature, p), dim=-1)
             for i, p in enumerate(inp.params)]
    return logits, probs


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` (exponential race: argmax of p / Exp(1) noise is a sample of p)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return int((probs / noise).argmax())


def _logprobs(raw_logprobs: torch.Tensor | None, inp: SamplerInput, rows: list[int], tokens: list[int],
              out: SamplerOutput) -> None:
    for row, token in zip(rows, tokens, strict=True):
        p = inp.params[row]
        if raw_logprobs is None or p.logprobs is None:
            out.logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.logprobs.append(float(raw_logprobs[row, token]))
        if p.logprobs > 0:
            vals, ids = torch.topk(raw_logprobs[row], p.logprobs)
            out.top_logprobs.append(list(zip(ids.tolist(), vals.tolist(), strict=True)))
        else:
            out.top_logprobs.append([])


def sample(logits: torch.Tensor, inp: SamplerInput) -> SamplerOutput:
    """``logits`` [B, V] float32 (one row per sampling sequence) → one token per row."""
    num_rows = logits.shape[0]
    want_logprobs = any(p.logprobs is not None for p in inp.params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    logits, probs = _processed(logits, inp)
    greedy = logits.argmax(dim=-1).tolist()
    tokens = [greedy[i] if probs[i] is None else _draw(probs[i], inp.generators[i]) for i in range(num_rows)]
    out = SamplerOutput([], [], [])
    out.token_ids = tokens
    _logprobs(raw_logprobs, inp, list(range(num_rows)), tokens, out)
    return out


def verify(logits: torch.Tensor, inp: SamplerInput, drafts: list[list[int]]) -> list[SamplerOutput]:
    """Speculative verification. ``drafts[s]`` are sequence s's draft tokens; ``logits`` has 1 + len(drafts[s])
    consecutive rows per sequence (its last committed token's position, then each draft's), and ``inp`` one
    row per position (token_ids there = the sequence's tokens plus the drafts before that position; the
    grammar mask of that position). Returns the tokens each sequence commits (>= 1).

    Greedy: drafts are accepted while each equals the argmax at its position; the argmax of the first
    mismatching position (or the position after the last draft) is appended. Sampling (standard speculative
    sampling with a point-mass draft): draft d at a position with target distribution p is accepted with
    probability p(d); on rejection a token is drawn from p with d removed and renormalised, which leaves the
    committed tokens distributed exactly as p."""
    want_logprobs = any(p.logprobs is not None for p in inp.params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    logits, probs = _processed(logits, inp)
    greedy = logits.argmax(dim=-1).tolist()
    outputs = []
    row = 0
    for draft in drafts:
        rows, tokens = [], []
        for j in range(len(draft) + 1):
            r = row + j
            rows.append(r)
            if probs[r] is None:
                tokens.append(greedy[r])
                if j == len(draft) or greedy[r] != draft[j]:
                    break
                continue
            generator = inp.generators[r]
            if j == len(draft):
                tokens.append(_draw(probs[r], generator))
                break
            d = draft[j]
            u = float(torch.rand((), generator=generator, device=probs[r].device))
            if u < float(probs[r][d]):
                tokens.append(d)
                continue
            residual = probs[r].clone()
            residual[d] = 0.0
            tokens.append(_draw(residual, generator))
            break
        out = SamplerOutput([], [], [])
        out.token_ids = tokens
        _logprobs(raw_logprobs, inp, rows, tokens, out)
        outputs.append(out)
        row += len(draft) + 1
    return outputs
