"""Sampler: logprobs vs HF log-softmax, seeds, filters, penalties; stop strings and stop tokens."""

from __future__ import annotations

import pytest
import torch

from backends.engine.args import SpeculationConfig
from backends.engine.layers.sampler import SamplerInput, sample
from backends.engine.sampling_params import SamplingParams, SamplingParamsError
from tests.engine.helpers import hf_logprobs, prompts, tiny_engine


def test_logprobs_match_hf_log_softmax(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    engine = tiny_engine(folder)
    batch = prompts(2, [7, 19], seed=11)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    for prompt, result in zip(batch, engine.generate(batch, params), strict=True):
        ref = hf_logprobs(folder, prompt + result.token_ids)
        lps = result.outputs[0].logprobs
        assert len(lps) == 6
        for i, lp in enumerate(lps):
            row = ref[len(prompt) - 1 + i]
            assert lp.token_id == result.token_ids[i]
            assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
            top_vals, top_ids = torch.topk(row, 3)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


def _inp(params, rows=1, generators=None):
    return SamplerInput(params=[params] * rows, token_ids=[[1, 2, 2]] * rows, num_prompt_tokens=[1] * rows,
                        generators=generators or [None] * rows)


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    draws = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        draws.append([sample(logits.clone(), _inp(params, generators=[g])).token_ids[0] for _ in range(20)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_top_k_1_and_min_p_1_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, min_p=1.0),
                   SamplingParams(temperature=1.5, top_p=1e-6)):
        p = SamplingParams(**{**params.__dict__})
        out = sample(logits.clone(), SamplerInput([p] * 4, [[0]] * 4, [1] * 4, [None] * 4))
        assert out.token_ids == best


def test_penalties_change_the_choice():
    logits = torch.zeros(1, 5)
    logits[0, 2] = 1.0
    logits[0, 3] = 0.9
    # token 2 was generated twice: frequency penalty 0.1 * 2 pushes it below token 3
    out = sample(logits.clone(), _inp(SamplingParams(temperature=0, frequency_penalty=0.1)))
    assert out.token_ids == [3]
    out = sample(logits.clone(), _inp(SamplingParams(temperature=0, repetition_penalty=1.2)))
    assert out.token_ids == [3]
    out = sample(logits.clone(), _inp(SamplingParams(temperature=0)))
    assert out.token_ids == [2]


def test_invalid_params_raise():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(max_tokens=0), dict(n=0),
                dict(stop=("",)), dict(logprobs=21)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_stop_string_split_across_tokens_is_held_back_and_cut(tiny_model_dir):
    folder = tiny_model_dir("llama")
    engine = tiny_engine(folder)
    tok = engine.tokenizer
    [prompt] = prompts(1, [9], seed=12)
    [free] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    ids = free.token_ids
    full = tok.decode(ids, skip_special_tokens=True)
    assert free.text == full
    # choose a stop string that spans the boundary between two generated tokens
    pieces = [tok.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
    k = next(i for i in range(3, len(ids) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 1
             and len(pieces[i - 1]) - len(pieces[i - 2]) >= 1 and full.count(full[len(pieces[i - 1]) - 1:len(pieces[i]) ]) == 1)
    stop = full[len(pieces[k - 1]) - 1:len(pieces[k])]  # last char of token k-1 + all of token k
    cut = full[: full.index(stop)]
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,)))
    deltas, reasons = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            deltas.append(out.new_text)
            reasons.append(out.finish_reason)
    assert "".join(deltas) == cut
    assert reasons[-1] == "stop" and reasons.count("stop") == 1
    assert engine.block_manager.num_used_blocks == 0
    # while the first char of the stop string was pending it was held back, never emitted then retracted
    emitted = ""
    for d in deltas:
        emitted += d
        assert cut.startswith(emitted)


def test_stop_token_ids_and_eos(tiny_model_dir):
    folder = tiny_model_dir("llama")
    engine = tiny_engine(folder)
    [prompt] = prompts(1, [5], seed=13)
    [free] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    [res] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop_id,)))
    assert res.token_ids == free.token_ids[: first + 1]
    assert res.outputs[0].finish_reason == "stop"
    assert res.text == engine.tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)


def test_logit_bias_is_one_sparse_add_per_row_and_the_grammar_mask_wins():
    logits = torch.zeros(3, 64)
    logits[:, 5] = 2.0
    rows = [SamplingParams(temperature=0, logit_bias=((9, 3.0),)),  # 9 overtakes 5
            SamplingParams(temperature=0, logit_bias=((5, -100.0),)),  # 5 banned: first of the ties wins
            SamplingParams(temperature=0)]
    inp = SamplerInput(rows, [[1]] * 3, [1] * 3, [None] * 3)
    assert sample(logits.clone(), inp).token_ids == [9, 0, 5]
    bitmask = torch.full((3, 2), -1, dtype=torch.int32)
    bitmask[0, 0] = ~(1 << 9)  # row 0's grammar forbids token 9: its +3 cannot revive it
    inp.token_bitmask = bitmask
    assert sample(logits.clone(), inp).token_ids == [5, 0, 5]


def test_logit_bias_comes_before_penalties_and_leaves_logprobs_raw():
    logits = torch.zeros(1, 8)
    logits[0, 2] = 1.0
    # +0.5 on token 3 (0.5 < 1.0); then token 2, seen twice, loses 2 * 0.3: 3 wins only if the bias came first
    params = SamplingParams(temperature=0, frequency_penalty=0.3, logit_bias=((3, 0.5),), logprobs=1)
    out = sample(logits.clone(), _inp(params))
    assert out.token_ids == [3]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.logprobs[0] == pytest.approx(float(raw[3]))  # the model's distribution, before the bias
    assert out.top_logprobs[0][0][0] == 2


def test_logit_bias_validation_names_the_field():
    for bad in (((3, 101.0),), ((3, -100.5),), ((-1, 1.0),), ((4, 1.0), (3, 1.0)), ((3, 1.0), (3, 2.0))):
        with pytest.raises(SamplingParamsError) as info:
            SamplingParams(logit_bias=bad)
        assert info.value.param == "logit_bias"


def test_engine_logit_bias_forces_and_bans_tokens(tiny_model_dir):
    folder = tiny_model_dir("llama")
    engine = tiny_engine(folder)
    [prompt] = prompts(1, [8], seed=21)
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    [free] = engine.generate([prompt], SamplingParams(**greedy))
    forced_id = next(t for t in range(3, 500) if t not in free.token_ids)
    [forced] = engine.generate([prompt], SamplingParams(**greedy, logit_bias=((forced_id, 100.0),)))
    assert forced.token_ids == [forced_id] * 6
    first = free.token_ids[0]
    [banned] = engine.generate([prompt], SamplingParams(**greedy, logit_bias=((first, -100.0),)))
    assert first not in banned.token_ids
    # in one batch, each row keeps its own bias (and a row without one is unchanged)
    batch = engine.generate([prompt, prompt, prompt], [
        SamplingParams(**greedy, logit_bias=((forced_id, 100.0),)),
        SamplingParams(**greedy), SamplingParams(**greedy, logit_bias=((first, -100.0),))])
    assert [r.token_ids for r in batch] == [forced.token_ids, free.token_ids, banned.token_ids]
    # speculative verification applies the same bias: forced drafts are accepted, the banned token never is
    speculative = tiny_engine(folder, speculation=SpeculationConfig(method="ngram"))
    long = dict(greedy, max_tokens=12)
    for bias in (((forced_id, 100.0),), ((first, -100.0),)):
        [plain] = engine.generate([prompt], SamplingParams(**long, logit_bias=bias))
        [drafted] = speculative.generate([prompt], SamplingParams(**long, logit_bias=bias))
        assert drafted.token_ids == plain.token_ids
    assert speculative.stats().num_accepted_tokens_total > 0
    vocab = engine.config.hf_config.vocab_size
    with pytest.raises(SamplingParamsError, match=r"logit_bias token ids must be in \[0, "):
        engine.add_request(prompt, SamplingParams(**greedy, logit_bias=((vocab, 1.0),)))
