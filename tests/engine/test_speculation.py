"""N-gram speculative decoding: the proposer, the accept rule, and the engine with speculation on producing
exactly what it produces with speculation off (greedy), the same distribution (sampling), exact KV blocks."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from backends.engine.args import EngineArgs, SpeculationConfig
from backends.engine.layers.sampler import SamplerInput, verify
from backends.engine.llm_engine import LLMEngine
from backends.engine.sampling_params import SamplingParams
from backends.engine.sequence import Sequence
from backends.engine.speculation import (
    NgramProposer,
    SharedDraftTable,
    VerifyCost,
    best_num_drafts,
    ngram_lookup,
)
from backends.engine.stats import IterationStats, SchedulerStats
from backends.engine.structured_output import StructuredOutput
from tests.engine.helpers import prompts, tiny_engine

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
NGRAM = SpeculationConfig(method="ngram", verify_cost=0.0)  # every proposal verified whole, however it fares


def repetitive_prompts(num: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random pattern (so the n-gram proposer finds drafts), of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        pattern = torch.randint(3, 500, (3 + i % 5,), generator=g).tolist()
        out.append((pattern * (2 + i % 4))[: 5 + (i * 7) % 30] + pattern[:2])
    return out


def run_both(folder, batch, params, **options):
    """Results with speculation off and on (same engine options), and the speculative engine."""
    off = tiny_engine(folder, **options).generate(batch, params)
    engine = tiny_engine(folder, speculation=NGRAM, **options)
    on = engine.generate(batch, params)
    return off, on, engine


def assert_no_leaks(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_used_blocks == 0
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert len(bm.free_block_ids) + len(bm.cached_block_ids) == bm.num_blocks
    assert all(bm.blocks[b].block_hash is not None for b in bm.cached_block_ids)


# ----------------------------------------------------------------------------------------------- proposer


def test_ngram_lookup_takes_the_longest_most_recent_match():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3]
    assert ngram_lookup(tokens, 1, 3, 2) == ([9, 8], 3)  # "1 2 3" (n=3) occurred at 0: followed by 9 8
    assert ngram_lookup(tokens, 1, 2, 2) == ([7, 1], 2)  # n <= 2: "2 3" most recently at 5, followed by 7 1
    assert ngram_lookup(tokens, 1, 3, 10) == ([9, 8, 2, 3, 7, 1, 2, 3], 3)  # up to the end of the sequence
    assert ngram_lookup([4, 5, 6], 1, 3, 4) == ([], 0)  # nothing repeats
    assert ngram_lookup([5, 5], 1, 3, 4) == ([5], 1)  # the match may overlap the suffix
    assert ngram_lookup([1, 2, 3], 2, 3, 0) == ([], 0)


def test_best_num_drafts_sends_what_pays_for_its_verification():
    relative = [1.0, 1.3, 1.6, 1.9, 2.2]  # 0.3 plain steps per draft
    assert best_num_drafts(1.0, relative, 4) == 4  # every draft accepted: 5 tokens for 2.2 steps
    assert best_num_drafts(0.9, relative, 4) == 4  # (1 + .9 + .81 + .73 + .66) / 2.2 = 1.86 beats k = 3's 1.82
    assert best_num_drafts(0.9, relative, 2) == 2  # never more than the proposal has
    assert best_num_drafts(0.5, relative, 4) == 1  # 1.5 / 1.3 = 1.15; two drafts: 1.75 / 1.6 = 1.09
    assert best_num_drafts(0.25, relative, 4) == 0  # 1.25 / 1.3 < 1: a plain step is better
    assert best_num_drafts(0.05, [1.0] * 5, 4) == 4  # drafts that cost nothing are always sent
    assert best_num_drafts(0.9, [1.0, 3.0, 3.0], 4) == 0  # too dear: nothing


def test_drafts_stop_when_they_fail_and_resume_on_a_kind_that_succeeds():
    """Each proposal is cut to what its estimated acceptance pays for: a sequence whose drafts of one kind
    keep failing stops sending them, a long match of a kind the engine has seen succeed is sent whole, and the
    sequence's own record with that kind moves the number up and down."""
    proposer = NgramProposer(num_draft_tokens=4, min_n=1, max_n=3, verify_cost=0.3)
    seq = Sequence(seq_id=0, request_id="r", prompt_token_ids=[1, 2, 3, 1, 2], params=GREEDY)
    assert proposer.propose(seq, limit=10) == [3]  # nothing learned: p = 1/2 pays for one draft
    state = seq.draft_state
    assert state.kind == (False, 2)
    proposer.update(seq, 1, 0)  # rejected
    assert proposer.propose(seq, limit=10) == []  # p = (0 + 1 * 1/3) / (1 + 1) = 0.17: not worth a draft
    assert proposer.acceptance(state, (False, 2)) < 0.2
    proposer.kinds[(False, 3)] = [90, 100]  # the engine's 3-token matches are right 90 % of the time
    seq.token_ids += [3, 9, 1, 2, 3]
    assert proposer.propose(seq, limit=10) == [9, 1, 2, 3]  # "1 2 3" matches: p = 0.89, the whole proposal
    assert proposer.propose(seq, limit=2) == [9, 1]
    proposer.update(seq, 4, 0)  # this sequence's 3-token match fails: p = (0 + 0.89) / (1 + 1) = 0.45
    assert proposer.propose(seq, limit=10) == [9]
    for _ in range(2):
        proposer.update(seq, 1, 1)
    assert proposer.acceptance(state, (False, 3)) == pytest.approx(0.78, abs=0.01)
    assert proposer.propose(seq, limit=10) == [9, 1, 2]  # three drafts pay best at p = 0.78
    assert (state.num_drafted, state.num_accepted) == (1 + 4 + 2, 2)
    assert proposer.kinds[(False, 2)] == [0, 1] and proposer.kinds[(False, 3)] == [90 + 2, 100 + 1 + 2]


def test_verify_cost_is_learned_from_single_sequence_steps():
    cost = VerifyCost(max_drafts=4)
    assert cost.relative == pytest.approx([1.0, 1.3, 1.6, 1.9, 2.2])  # the prior until measured
    cost.observe(2, 0.5)  # no plain step measured yet: nothing to compare with
    assert cost.relative[2] == pytest.approx(1.6)
    for _ in range(100):
        cost.observe(0, 0.010)
        cost.observe(3, 0.025)
    assert cost.plain_step_s == pytest.approx(0.010)
    assert cost.relative[3] == pytest.approx(2.5, rel=1e-3)  # 25 ms / 10 ms
    assert cost.relative[1] == pytest.approx(1.3)  # k = 1 never measured
    cost.observe(1, 0.001)  # faster than a plain step (noise): counts as no dearer than one
    assert cost.relative[1] == pytest.approx(0.9 * 1.3 + 0.1 * 1.0)
    cost.observe(9, 1.0)  # more drafts than the proposer sends: ignored
    fixed = VerifyCost(max_drafts=2, per_draft=0.0)
    fixed.observe(0, 0.01)
    fixed.observe(1, 0.05)
    assert fixed.relative == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------------------------- shared table


def test_shared_table_maps_output_ngrams_to_what_followed_them():
    table = SharedDraftTable(min_n=2, max_n=3, num_next_tokens=3, max_entries=100)
    table.add("a", [7, 8, 9], [1, 2, 3, 4, 5])  # keys end in the prompt's last max_n tokens or the output
    assert table.lookup("a", [0, 8, 9], k=4) == ([1, 2, 3], 2)  # "8 9" (the prompt's tail) → the output's start
    assert table.lookup("a", [6, 2, 3], k=4)[0] == [4, 5]  # "2 3": up to the end of the output
    assert table.lookup("a", [1, 2, 3], k=1)[0] == [4]
    assert table.lookup("a", [9, 5], k=4)[0] == []  # "9 5" never occurred; "5" ends the output: nothing followed
    assert table.lookup("b", [8, 9], k=4)[0] == []  # another namespace sees nothing
    table.add("a", [0], [2, 3, 9])  # a more recent output with "2 3": its continuation wins
    assert table.lookup("a", [6, 2, 3], k=4)[0] == [9]
    assert table.lookup("a", [1, 2, 3], k=4) == ([4, 5], 3)  # the longer n-gram "1 2 3" still points at the first
    # every n-gram (n = 2, 3) followed by an output token, once: 10 from the first output, 2 new from the second
    assert table.num_entries("a") == len({(8, 9), (7, 8, 9), (9, 1), (8, 9, 1), (1, 2), (9, 1, 2), (2, 3),
                                          (1, 2, 3), (3, 4), (2, 3, 4), (0, 2), (0, 2, 3)})


def test_shared_table_is_bounded_and_evicts_the_least_frequently_used():
    table = SharedDraftTable(min_n=1, max_n=1, num_next_tokens=1, max_entries=4)
    table.add("ns", [1], [2, 3, 4])  # 1→2, 2→3, 3→4 (one use each)
    assert table.lookup("ns", [2], k=1)[0] == [3] and table.lookup("ns", [2], k=1)[0] == [3]  # 2: three uses
    assert table.lookup("ns", [3], k=1)[0] == [4]  # 3: two uses
    table.add("ns", [4], [5, 6])  # 4→5, 5→6: 5 entries > 4: a sweep down to 4 - 4 // 4 = 3 entries
    assert table.num_entries("ns") == 3
    assert table.lookup("ns", [1], k=1)[0] == [] and table.lookup("ns", [4], k=1)[0] == []  # fewest uses, oldest first
    # the survivors' uses were halved (rounding up): 2: 3 → 2, 3: 2 → 1, 5: 1 → 1
    table.add("ns", [6], [7])
    table.add("ns", [7], [8])  # 5 entries again: of those used once (3, 5, 6, 7), the two oldest go
    assert table.num_entries("ns") == 3
    assert table.lookup("ns", [3], k=1)[0] == [] and table.lookup("ns", [5], k=1)[0] == []
    assert [table.lookup("ns", [t], k=1)[0] for t in (2, 6, 7)] == [[3], [7], [8]]
    for i in range(100):  # a long stream never holds more than the cap
        table.add("ns", [i], [1000 + i, 2000 + i])
        assert table.num_entries("ns") <= 4


def test_shared_table_drops_the_least_recently_used_namespace():
    table = SharedDraftTable(min_n=1, max_n=2, num_next_tokens=2, max_entries=8, max_namespaces=2)
    table.add("a", [1], [2])
    table.add("b", [1], [3])
    assert table.lookup("a", [1], k=1)[0] == [2]  # a is now the most recently used
    table.add("c", [1], [4])
    assert table.namespaces == ["a", "c"]
    assert table.lookup("b", [1], k=1)[0] == []


def test_proposer_drafts_from_its_own_text_first_then_the_shared_table():
    table = SharedDraftTable(min_n=1, max_n=3, num_next_tokens=4, max_entries=100)
    proposer = NgramProposer(num_draft_tokens=4, min_n=1, max_n=3, shared=table, verify_cost=0.0)
    table.add("ns", [9], [5, 6, 7, 8])
    own = Sequence(seq_id=0, request_id="r", prompt_token_ids=[5, 1, 5], params=GREEDY, namespace="ns")
    assert proposer.propose(own, limit=10) == [1, 5]  # "5" occurred in its own text: that wins
    assert not own.draft_state.is_shared
    fresh = Sequence(seq_id=1, request_id="s", prompt_token_ids=[4, 3, 5], params=GREEDY, namespace="ns")
    assert proposer.propose(fresh, limit=10) == [6, 7, 8]
    assert fresh.draft_state.is_shared
    proposer.update(fresh, 3, 2)
    assert (fresh.draft_state.num_shared_drafted, fresh.draft_state.num_shared_accepted) == (3, 2)
    other = Sequence(seq_id=2, request_id="t", prompt_token_ids=[4, 3, 5], params=GREEDY, namespace="other")
    anonymous = Sequence(seq_id=3, request_id="u", prompt_token_ids=[4, 3, 5], params=GREEDY)
    assert proposer.propose(other, limit=10) == [] and proposer.propose(anonymous, limit=10) == []
    fresh.token_ids += [6, 7, 8, 2]
    proposer.record(fresh)  # a finished sequence's output joins its namespace's table
    assert table.lookup("ns", [7, 8], k=4)[0] == [2]
    proposer.record(anonymous)  # no namespace: nothing recorded
    assert table.namespaces == ["ns"]


def test_engine_shares_drafts_within_a_namespace_only(tiny_model_dir):
    """Two requests in one namespace, the second repeating the first's output (same prompt, greedy): the second
    accepts drafts from the shared table; a request of another namespace gets none from it; every output
    equals speculation off, token for token."""
    folder = tiny_model_dir("llama")
    [prompt] = prompts(1, [23], seed=11)  # random tokens: the prompt itself predicts little
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    [plain] = tiny_engine(folder).generate([prompt], params)
    steps = []  # the per-step split the gateway's by-source counters add up

    class Logger:
        def record(self, scheduler_stats, iteration_stats):
            steps.append(iteration_stats)

    engine = tiny_engine(folder, stat_loggers=[Logger()],
                         speculation=SpeculationConfig(method="ngram", shared_context=True))

    def run(namespace):
        rid = engine.add_request(prompt, params, namespace=namespace)
        [seq] = engine.requests[rid]
        while engine.has_unfinished_requests():
            engine.step()
        return seq

    first = run("team-a")
    assert first.draft_state is None or first.draft_state.num_shared_drafted == 0  # the table was empty
    second = run("team-a")
    assert second.draft_state.num_shared_accepted > 0, "no draft came from the shared table"
    stats = engine.stats()
    assert stats.num_shared_accepted_tokens_total == second.draft_state.num_shared_accepted
    assert stats.num_shared_draft_tokens_total == second.draft_state.num_shared_drafted
    assert sum(it.num_shared_draft_tokens for it in steps) == stats.num_shared_draft_tokens_total
    assert sum(it.num_shared_accepted_tokens for it in steps) == stats.num_shared_accepted_tokens_total
    assert sum(it.num_draft_tokens for it in steps) == stats.num_draft_tokens_total
    third = run("team-b")
    assert third.draft_state is None or third.draft_state.num_shared_drafted == 0
    assert engine.stats().num_shared_draft_tokens_total == stats.num_shared_draft_tokens_total
    for seq in (first, second, third):
        assert seq.output_token_ids == plain.token_ids
    assert engine.proposer.shared.namespaces == ["team-a", "team-b"]
    assert_no_leaks(engine)


def test_shared_table_off_by_default(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"), speculation=NGRAM)
    assert engine.proposer.shared is None
    assert tiny_engine(tiny_model_dir("llama")).proposer is None


# ----------------------------------------------------------------------------------------------- accept rule


def _inp(probs: torch.Tensor, temperature: float, seed: int) -> SamplerInput:
    rows = probs.shape[0]
    params = SamplingParams(temperature=temperature, max_tokens=8)
    g = torch.Generator().manual_seed(seed)
    return SamplerInput(params=[params] * rows, token_ids=[[1]] * rows, num_prompt_tokens=[1] * rows,
                        generators=[g] * rows)


def test_greedy_verify_accepts_the_argmax_prefix_then_appends_the_targets_token():
    logits = torch.full((4, 8), -5.0)
    for row, best in enumerate([3, 5, 6, 2]):
        logits[row, best] = 5.0
    inp = _inp(logits, 0.0, 0)
    assert verify(logits, inp, [[3, 5, 6]])[0].token_ids == [3, 5, 6, 2]  # all accepted + bonus
    assert verify(logits, inp, [[3, 4, 6]])[0].token_ids == [3, 5]  # 2nd rejected: the target's 5 instead
    assert verify(logits, inp, [[0, 5, 6]])[0].token_ids == [3]
    two = verify(logits[:3], _inp(logits[:3], 0.0, 0), [[3], []])  # two sequences: 2 rows + 1 row
    assert [o.token_ids for o in two] == [[3, 5], [6]]


def test_sampling_verify_keeps_the_target_distribution():
    """Point-mass drafts [d0, d1] against fixed target distributions p0, p1 on a 6-token vocabulary: the first
    committed token is distributed as p0 and, when it is d0, the second as p1 (chi-square goodness of fit;
    fixed seeds, so the p-values are fixed numbers far above the threshold)."""
    p0 = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    p1 = torch.tensor([0.40, 0.05, 0.15, 0.10, 0.05, 0.25])
    logits = torch.log(torch.stack([p0, p1, p1]))
    first, second = torch.zeros(6), torch.zeros(6)
    num = 6000
    inp = _inp(logits, 1.0, seed=1234)  # one generator for all rounds: independent draws
    for _ in range(num):
        tokens = verify(logits, inp, [[3, 0]])[0].token_ids
        first[tokens[0]] += 1
        if tokens[0] == 3:
            second[tokens[1]] += 1
    assert chisquare(first, p0 * num).pvalue > 1e-3
    assert chisquare(second, p1 * second.sum()).pvalue > 1e-3
    assert first[3] / num == pytest.approx(0.25, abs=0.03)  # the draft is accepted with its target probability


# ----------------------------------------------------------------------------------------------- engine: greedy


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_greedy_identical_alone(arch, tiny_model_dir):
    folder = tiny_model_dir(arch)
    batch = repetitive_prompts(4, seed=1)
    off = [tiny_engine(folder).generate([p], GREEDY)[0] for p in batch]
    engine = tiny_engine(folder, speculation=NGRAM)
    on = [engine.generate([p], GREEDY)[0] for p in batch]
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert [r.text for r in on] == [r.text for r in off]
    stats = engine.stats()
    assert stats.num_accepted_tokens_total > 0, "no draft was accepted: the test proves nothing"
    assert stats.num_generation_tokens_total == 4 * 40
    assert_no_leaks(engine)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_greedy_identical_in_mixed_batches(arch, tiny_model_dir):
    """Drafting and non-drafting decodes, chunked prefills (small token budget) and prompts arriving while
    others decode, with max_tokens and stop-token variety."""
    folder = tiny_model_dir(arch)
    batch = repetitive_prompts(6, seed=2) + prompts(3, [3, 17, 41], seed=3)  # the last three rarely repeat
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (40, 1, 25, 33, 2, 40, 30, 12, 40)]

    def run(engine):
        first = [engine.add_request(p, sp) for p, sp in zip(batch[:5], params[:5], strict=True)]
        seqs = {rid: engine.requests[rid][0] for rid in first}
        for _ in range(3):
            engine.step()
        late = [engine.add_request(p, sp) for p, sp in zip(batch[5:], params[5:], strict=True)]
        seqs.update({rid: engine.requests[rid][0] for rid in late})
        while engine.has_unfinished_requests():
            engine.step()
        return [seqs[rid].output_token_ids for rid in first + late]

    off = run(tiny_engine(folder, max_num_batched_tokens=24))
    engine = tiny_engine(folder, max_num_batched_tokens=24, speculation=NGRAM)
    on = run(engine)
    assert on == off
    assert [len(t) for t in on] == [40, 1, 25, 33, 2, 40, 30, 12, 40]
    assert engine.stats().num_accepted_tokens_total > 0
    assert_no_leaks(engine)


def test_greedy_identical_with_prefix_hits(tiny_model_dir):
    folder = tiny_model_dir("llama")
    [shared] = repetitive_prompts(1, seed=4)
    shared = (shared * 3)[:24]
    first, second = shared + [7, 8, 9], shared + [10, 11]
    engine = tiny_engine(folder, speculation=NGRAM)
    plain = tiny_engine(folder)
    for prompt in (first, second, first):
        [on] = engine.generate([prompt], GREEDY)
        [off] = plain.generate([prompt], GREEDY)
        assert on.token_ids == off.token_ids
        assert on.num_cached_tokens == off.num_cached_tokens
    assert engine.stats().prefix_hit_rate > 0.5
    assert engine.stats().num_accepted_tokens_total > 0
    # hashed (cached) blocks only ever hold committed tokens: a fresh engine run finds the same outputs, and
    # every cached block's tokens are a full block of some committed sequence
    assert_no_leaks(engine)
    bm = engine.block_manager
    committed = [first + plain.generate([first], GREEDY)[0].token_ids, second + plain.generate([second], GREEDY)[0].token_ids]
    for block_id in bm.cached_block_ids:
        tokens = bm.blocks[block_id].token_ids
        assert any(tokens == tuple(c[i:i + len(tokens)]) for c in committed for i in range(0, len(c), 4))


def test_greedy_identical_after_preemption(tiny_model_dir):
    folder = tiny_model_dir("llama")
    # 64 tokens of KV for 6 sequences that each grow to ~40 tokens: preemption is certain
    options = dict(num_kv_blocks=16, max_model_len=64, block_size=4)
    batch = [p[:12] for p in repetitive_prompts(6, seed=5)]
    params = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    off, on, engine = run_both(folder, batch, params, **options)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.num_accepted_tokens_total > 0
    assert_no_leaks(engine)


def test_stop_strings_tokens_and_logprobs_apply_to_drafted_tokens(tiny_model_dir):
    folder = tiny_model_dir("llama")
    batch = repetitive_prompts(4, seed=6)
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    off, on, engine = run_both(folder, batch, base)
    assert engine.stats().num_accepted_tokens_total > 0
    for a, b in zip(off, on, strict=True):
        assert a.token_ids == b.token_ids
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert [lp.token_id for lp in la] == [lp.token_id for lp in lb] == a.token_ids
        assert [lp.logprob for lp in lb] == pytest.approx([lp.logprob for lp in la], abs=1e-4)
        assert [len(lp.top) for lp in lb] == [2] * len(lb)
    # a stop token in the middle of a run of accepted drafts ends the output there
    tokens = on[0].token_ids
    stop_at = next(i for i in range(5, len(tokens)) if tokens[i] in tokens[:i])  # a repeated (drafted) token
    stop = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=(tokens[stop_at],))
    off, on, engine = run_both(folder, batch[:1], stop)
    assert on[0].token_ids == off[0].token_ids == tokens[:tokens.index(tokens[stop_at]) + 1]
    assert on[0].outputs[0].finish_reason == "stop"
    # a stop string: the text ends before it, identically
    text = off[0].text
    if len(text) > 4:
        s = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=(text[len(text) // 2:][:2],))
        off, on, _ = run_both(folder, batch[:1], s)
        assert on[0].text == off[0].text and on[0].outputs[0].finish_reason == off[0].outputs[0].finish_reason


# ----------------------------------------------------------------------------------------------- engine: sampling


def test_sampled_distribution_unchanged(tiny_model_dir):
    """Many seeded samples (top_k 3: a tiny vocabulary of at most 27 outcomes) of the first 3 tokens after a
    prompt that ends in the model's own greedy continuation (so drafts are proposed at tokens 2-4 and often
    accepted), with speculation off and on: a chi-square contingency test cannot tell the two apart (fixed
    seeds: a fixed p-value, 0.62 when written, far from the threshold). The test has power: with the classic
    bug of resampling a rejected position from p without removing the draft, the same run gives p = 3e-7."""
    folder = tiny_model_dir("llama")
    [prompt] = repetitive_prompts(1, seed=7)
    prompt = prompt + tiny_engine(folder).generate([prompt], SamplingParams(temperature=0, max_tokens=24,
                                                                            ignore_eos=True))[0].token_ids
    counts: dict[str, dict[tuple[int, ...], int]] = {"none": {}, "ngram": {}}
    engines = {}
    for spec in counts:
        engine = engines[spec] = tiny_engine(folder, speculation=SpeculationConfig(method=spec), max_num_seqs=256,
                                             num_kv_blocks=2048)
        for round_ in range(6):
            seed = 1000 * round_ + (0 if spec == "none" else 500)
            p = SamplingParams(temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True, n=200, seed=seed)
            for out in engine.generate([prompt], p)[0].outputs:
                key = tuple(out.token_ids[:3])
                counts[spec][key] = counts[spec].get(key, 0) + 1
    assert engines["ngram"].stats().num_accepted_tokens_total > 0
    # outcomes seen fewer than 10 times in total are pooled into one "other" column
    keys = set(counts["none"]) | set(counts["ngram"])
    common = [k for k in keys if counts["none"].get(k, 0) + counts["ngram"].get(k, 0) >= 10]
    table = [[counts[s].get(k, 0) for k in common] + [sum(v for k, v in counts[s].items() if k not in common)]
             for s in ("none", "ngram")]
    if not table[0][-1] + table[1][-1]:
        table = [row[:-1] for row in table]
    assert len(common) >= 3, table
    assert chi2_contingency(table).pvalue > 1e-3, table


# ----------------------------------------------------------------------------------------------- blocks, grammar


def test_no_leaked_blocks_with_64_concurrent_speculative_requests(tiny_model_dir):
    folder = tiny_model_dir("qwen3")
    batch = repetitive_prompts(64, seed=8)
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=8 + i % 23, ignore_eos=True)
              for i in range(64)]
    engine = tiny_engine(folder, speculation=NGRAM, num_kv_blocks=160, max_num_batched_tokens=128)
    results = engine.generate(batch, params)
    assert [len(r.token_ids) for r in results] == [8 + i % 23 for i in range(64)]
    stats = engine.stats()
    assert stats.num_draft_tokens_total > 0 and stats.num_accepted_tokens_total > 0
    assert_no_leaks(engine)


def test_structured_output_with_speculation_is_schema_valid(tiny_model_dir):
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"enum": ["ab", "cd"]},
                                                         "maxItems": 12}},
              "required": ["items"]}
    folder = tiny_model_dir("qwen2")
    spec = StructuredOutput.json_schema(schema)
    options = dict(num_kv_blocks=256, block_size=16, device="cpu", num_threads=1)
    plain = LLMEngine(folder, EngineArgs(**options))
    engine = LLMEngine(folder, EngineArgs(speculation=SpeculationConfig(method="ngram", min_n=1), **options))
    prompt = plain.tokenizer('{"items":["ab","ab","ab","ab","ab"]} {"items":["ab","ab"')["input_ids"]
    greedy = SamplingParams(temperature=0, max_tokens=200, structured=spec)
    [a] = plain.generate([prompt], greedy)
    [b] = engine.generate([prompt], greedy)
    assert a.token_ids == b.token_ids and b.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(b.text), schema)
    sampled = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, n=4, structured=spec) for s in range(4)]
    outputs = [o for r in engine.generate([prompt] * 4, sampled) for o in r.outputs]
    for o in outputs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)
    assert engine.stats().num_draft_tokens_total > 0
    assert_no_leaks(engine)


def test_stats_report_drafted_and_accepted_tokens(tiny_model_dir):
    records: list[tuple[SchedulerStats, IterationStats]] = []

    class Logger:
        def record(self, s, it):
            records.append((s, it))

    engine = tiny_engine(tiny_model_dir("llama"), stat_loggers=[Logger()], speculation=NGRAM)
    engine.generate(repetitive_prompts(3, seed=9), GREEDY)
    stats = engine.stats()
    assert sum(it.num_draft_tokens for _, it in records) == stats.num_draft_tokens_total > 0
    assert 0 < sum(it.num_drafts for _, it in records) <= sum(it.num_draft_tokens for _, it in records)
    assert sum(it.num_accepted_tokens for _, it in records) == stats.num_accepted_tokens_total > 0
    assert sum(it.num_generation_tokens for _, it in records) == 3 * 40


def test_engine_measures_the_verify_cost_on_its_own_steps(tiny_model_dir):
    """With ``verify_cost`` unset, a single sequence's plain and verify steps set the cost the proposer prices
    drafts with; output stays identical to speculation off."""
    folder = tiny_model_dir("llama")
    batch = repetitive_prompts(1, seed=3)
    [off] = tiny_engine(folder).generate(batch, GREEDY)
    engine = tiny_engine(folder, speculation=SpeculationConfig(method="ngram"))
    [on] = engine.generate(batch, GREEDY)
    assert on.token_ids == off.token_ids
    cost = engine.proposer.cost
    assert not cost.fixed and cost.plain_step_s is not None and cost.plain_step_s > 0
    prior = VerifyCost(max_drafts=4).relative
    assert engine.stats().num_draft_tokens_total > 0
    assert any(a != b for a, b in zip(cost.relative, prior, strict=True)), "no verify step was measured"
    assert all(r >= 1.0 for r in cost.relative)


def test_engine_args_validate_speculation():
    assert EngineArgs().speculation == SpeculationConfig(method="none", shared_context=False)
    for bad, key in ((dict(method="eagle"), "speculation.method must be one of none, ngram"),
                     (dict(min_n=5, max_n=3), "speculation.min_n must be <= speculation.max_n"),
                     (dict(num_draft_tokens=0), "speculation.num_draft_tokens must be >= 1"),
                     (dict(shared_max_entries=0), "speculation.shared_max_entries must be >= 1"),
                     (dict(verify_cost=-0.5), "speculation.verify_cost must be null or between 0 and 10")):
        with pytest.raises(ValueError, match=key):
            SpeculationConfig(**bad)
    with pytest.raises(ValueError, match="speculation must be a SpeculationConfig"):
        EngineArgs(speculation="ngram")


def test_speculation_settings_nest_in_a_pool_and_in_the_engine_serve_flag():
    """The pool setting `engine.speculation: {...}` and `engine serve --speculation` build the same
    SpeculationConfig; a bad value is one line naming the key."""
    from gateway.engine_server import speculation_of
    from gateway.settings import ConfigError, settings_from_dict

    def pool_engine(speculation):
        return settings_from_dict({"pools": [{"name": "slm", "model": "smollm2-135m",
                                              "engine": {"speculation": speculation}},
                                             {"name": "llm", "model": "gemma3-270m"}]}).pool("slm").engine

    want = SpeculationConfig(method="ngram", num_draft_tokens=6, min_n=1, max_n=3, shared_context=True,
                             verify_cost=0.5)
    values = {"method": "ngram", "num_draft_tokens": 6, "min_n": 1, "max_n": 3, "shared_context": True,
              "verify_cost": 0.5}
    assert pool_engine(values).speculation == want
    assert speculation_of(json.dumps(values)) == want
    assert speculation_of("ngram") == SpeculationConfig(method="ngram")
    assert speculation_of("none") == SpeculationConfig()
    with pytest.raises(ConfigError, match=r"pools\.0\.engine\.speculation.*speculation\.min_n must be <= ") as info:
        pool_engine({"method": "ngram", "min_n": 5})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"pools\.0\.engine\.speculation\.ngram_min = 1: Unexpected"):
        pool_engine({"method": "ngram", "ngram_min": 1})
    with pytest.raises(ValueError, match=r"unknown keys \['k'\]"):
        speculation_of('{"method": "ngram", "k": 3}')
    with pytest.raises(ValueError, match="speculation.method must be one of"):
        speculation_of("eagle")


@pytest.mark.slow
def test_bundled_smollm2_greedy_identical(bundled_model_dir):
    """The real model repeating a JSON document it was given: speculation drafts most of it, same tokens."""
    folder = bundled_model_dir("smollm2-135m")
    doc = json.dumps({"tool": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}})
    options = dict(num_kv_blocks=64, block_size=16, max_model_len=512, num_threads=None)
    plain = tiny_engine(folder, **options)
    chat = plain.tokenizer.apply_chat_template([{"role": "user", "content": f"Repeat this JSON exactly:\n{doc}"}],
                                               add_generation_prompt=True, tokenize=False)
    prompt = plain.tokenizer(chat, add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=48)
    [off] = plain.generate([prompt], params)
    engine = tiny_engine(folder, speculation=NGRAM, **options)
    [on] = engine.generate([prompt], params)
    assert on.token_ids == off.token_ids and on.text == off.text
    assert engine.stats().num_accepted_tokens_total > 0
    assert_no_leaks(engine)


def test_the_gateway_turns_the_speculation_stats_into_prometheus_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    from tests.gateway.test_metrics_naming import engine_metrics_text, replica_values

    base = SchedulerStats(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.1, num_kv_blocks=64)
    text = engine_metrics_text(
        (base, IterationStats(num_generation_tokens=4, num_drafts=1, num_draft_tokens=4, num_accepted_tokens=3)),
        (base, IterationStats(num_generation_tokens=1, num_drafts=2, num_draft_tokens=5, num_accepted_tokens=1,
                              num_shared_draft_tokens=3, num_shared_accepted_tokens=1)),
        (base, IterationStats(num_generation_tokens=1)))
    values = replica_values(text)
    assert values["switchyard_spec_decode_num_drafts_total"] == 3
    assert values["switchyard_spec_decode_num_draft_tokens_total"] == 9
    assert values["switchyard_spec_decode_num_accepted_tokens_total"] == 4
    assert values["switchyard_generation_tokens_total"] == 6
    by_source = {(s.name, s.labels["source"]): s.value for f in text_string_to_metric_families(text)
                 for s in f.samples if "source" in s.labels and s.name.endswith("_total")}
    assert by_source == {("switchyard_spec_decode_draft_tokens_by_source_total", "own"): 6,
                         ("switchyard_spec_decode_draft_tokens_by_source_total", "shared"): 3,
                         ("switchyard_spec_decode_accepted_tokens_by_source_total", "own"): 3,
                         ("switchyard_spec_decode_accepted_tokens_by_source_total", "shared"): 1}


async def test_local_backend_streams_multi_token_steps(tiny_model_dir):
    """Through the gateway's Backend: a step that commits several tokens is one delta with all of them; the
    streamed text, ids, logprobs and usage equal speculation off."""
    from backends.base import GenerationRequest
    from backends.local import LocalBackend

    content = "ab ab ab ab ab ab ab ab ab ab ab ab"
    results = {}
    for spec in ("none", "ngram"):
        backend = LocalBackend("slm/0", str(tiny_model_dir("llama")),
                               EngineArgs(num_kv_blocks=128, block_size=4, max_model_len=256, num_threads=1,
                                          device="cpu", speculation=SpeculationConfig(method=spec)))
        await backend.load()
        try:
            request = GenerationRequest(request_id="r1", model="slm", messages=[{"role": "user", "content": content}],
                                        sampling=SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                                logprobs=1))
            deltas = [d async for d in backend.generate(request)]
        finally:
            await backend.close()
        results[spec] = ("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
                         [round(lp.logprob, 3) for d in deltas for lp in d.logprobs], deltas[-1].usage.completion_tokens,
                         max(len(d.token_ids) for d in deltas))
    (text0, ids0, lps0, usage0, _), (text1, ids1, lps1, usage1, widest) = results["none"], results["ngram"]
    assert (text1, ids1, usage1) == (text0, ids0, usage0) and usage0 == 40
    assert lps1 == pytest.approx(lps0, abs=2e-3)
    assert widest > 1, "no delta carried several tokens: the test proves nothing"


def test_scheduler_gives_drafts_spare_blocks_only_and_never_preempts_for_them():
    """Drafts take a block only when one stays free for each running sequence after them; a rejected
    draft's block is given back by ``trim``."""
    from backends.engine.block_manager import BlockManager
    from backends.engine.scheduler import Scheduler

    class Fixed:
        def propose(self, seq, limit):
            return [9, 9, 9, 9][:limit]

    def decoding(num_seqs: int, num_blocks: int):
        bm = BlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_caching=False)
        sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, proposer=Fixed(), max_model_len=64)
        seqs = [Sequence(seq_id=i, request_id=f"r{i}", prompt_token_ids=[1, 2, 3, 4, 5], params=GREEDY, arrival=i)
                for i in range(num_seqs)]
        for seq in seqs:
            sched.add(seq)
        for item in sched.schedule().scheduled:  # prefill: 2 blocks each
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.token_ids.append(7)  # 6 tokens, 5 computed: the next step decodes position 5
        return bm, sched, seqs

    bm, sched, (a, b) = decoding(2, 6)  # 2 blocks spare
    batch = sched.schedule()  # 1 + 4 tokens at positions 5..9 need a 3rd block each: a leaves one for b
    assert [(s.seq.seq_id, s.num_new_tokens, s.draft_token_ids) for s in batch.scheduled] == [
        (0, 5, [9, 9, 9, 9]), (1, 5, [9, 9, 9, 9])]
    assert not batch.preempted and bm.num_free_blocks == 0
    for seq in (a, b):  # every draft rejected: the last token's KV counts, the target's token is appended
        seq.num_computed_tokens += 1
        seq.token_ids.append(8)
        assert bm.trim(seq) == 1
    assert len(a.block_table) == len(b.block_table) == 2 and bm.num_free_blocks == 2

    bm, sched, (a, b, c) = decoding(3, 8)  # 2 blocks spare for 3 sequences
    batch = sched.schedule()
    assert [(s.seq.seq_id, len(s.draft_token_ids)) for s in batch.scheduled] == [(0, 0), (1, 4), (2, 4)]
    assert not batch.preempted and bm.num_free_blocks == 0


async def test_local_backend_passes_the_requests_namespace_to_the_shared_table(tiny_model_dir):
    from backends.base import GenerationRequest
    from backends.local import LocalBackend

    backend = LocalBackend("slm/0", str(tiny_model_dir("llama")),
                           EngineArgs(num_kv_blocks=128, block_size=4, max_model_len=256, num_threads=1, device="cpu",
                                      speculation=SpeculationConfig(method="ngram", shared_context=True)))
    await backend.load()
    try:
        outputs = []
        for i, namespace in enumerate(("team-a", "team-a", "team-b")):
            request = GenerationRequest(request_id=f"r{i}", model="slm", namespace=namespace,
                                        messages=[{"role": "user", "content": "Name three rivers of Europe."}],
                                        sampling=SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            outputs.append([t for d in [d async for d in backend.generate(request)] for t in d.token_ids])
            if i == 1:
                shared = backend.llm_engine.stats().num_shared_accepted_tokens_total
        assert shared > 0
        assert backend.llm_engine.stats().num_shared_accepted_tokens_total == shared  # team-b saw none of it
        assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 24
        assert backend.llm_engine.proposer.shared.namespaces == ["team-a", "team-b"]  # each output joins its own
    finally:
        await backend.close()


def test_the_benchmarks_free_verification_bound():
    """``bench speculation``'s ceiling for a drafter over the request's own text: steps are counted as if every
    verification cost a plain step."""
    from bench.speculation import free_verify_bound

    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    # step 1: "8" never occurred before → plain step (1); step 2: "1" → drafts 2 3 4 5, all right (+ 6);
    # step 3: "... 5 6" → drafts 7 8 1 2, the first wrong (9): 7 tokens in 3 steps
    assert free_verify_bound(prompt, [1, 2, 3, 4, 5, 6, 9], k=4) == pytest.approx(7 / 3)
    assert free_verify_bound(prompt, [1, 2, 3, 4, 5, 6, 9], k=1) == pytest.approx(7 / 4)  # 1, 2+3, 4+5, 6+9
    assert free_verify_bound(prompt, [], k=4) == 1.0
