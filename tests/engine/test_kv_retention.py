"""KV retention across tool pauses and program-aware scheduling (issue 20, engine side).

Exact block ids, ref counts and drop order on the block manager; admission order on the scheduler; then the
tiny engine: an agent's turn 2 hits its retained context after a competing burst that evicts it without
retention, pins expire back to baseline, 64 concurrent sessions leak no block. Time is a controllable clock.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from backends.engine.args import EngineArgs
from backends.engine.async_engine import AsyncEngine
from backends.engine.block_manager import BlockManager
from backends.engine.sampling_params import SamplingParams
from backends.engine.scheduler import Scheduler
from backends.engine.sequence import Sequence
from tests.engine.helpers import prompts, tiny_engine

_ids = iter(range(100_000))


class Clock:
    """A clock the test moves by hand (the engine's ``clock`` argument)."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def seq(tokens: list[int], session: str | None = None, program: str | None = None, priority: int = 0,
        arrival_time: float = 0.0) -> Sequence:
    sid = next(_ids)
    return Sequence(seq_id=sid, request_id=f"r{sid}", prompt_token_ids=tokens, params=SamplingParams(),
                    session_id=session, program_id=program, priority=priority, arrival=sid,
                    arrival_time=arrival_time)


def prefill(bm: BlockManager, s: Sequence, num_output_tokens: int = 0) -> list[int]:
    """Prefill the prompt after a prefix match, then append output tokens; the last one is never computed
    (sampled, not fed), as in the engine."""
    shared = bm.match_prefix(s)
    new = bm.allocate(s, s.num_tokens - len(shared) * bm.block_size, shared)
    assert new is not None
    s.num_computed_tokens = s.num_tokens
    for i in range(num_output_tokens):
        s.token_ids.append(100 + i)
        if i < num_output_tokens - 1:
            assert bm.allocate(s, 1) is not None
            s.num_computed_tokens += 1
    bm.commit(s)
    return new


def assert_consistent(bm: BlockManager, live: list[Sequence] = ()) -> None:
    """Every block is referenced (by live sequences and pins, exactly), cached (hashed) or free — once."""
    refs = {b: bm.num_pins.get(b, 0) for b in range(bm.num_blocks)}
    for s in live:
        for b in s.block_table:
            refs[b] += 1
    assert [blk.ref_count for blk in bm.blocks] == [refs[b] for b in range(bm.num_blocks)]
    cached, free = set(bm.cached_block_ids), set(bm.free_block_ids)
    referenced = {b for b in range(bm.num_blocks) if refs[b]}
    assert not (cached & free) and not (cached & referenced) and not (free & referenced)
    assert len(cached) + len(free) + len(referenced) == bm.num_blocks
    assert all(bm.blocks[b].block_hash is not None for b in cached)
    assert bm.num_retained_blocks == len({b for r in bm.retentions.values() for b in r.block_ids})


# ------------------------------------------------------------------------------------ block manager


def test_retained_blocks_survive_allocation_pressure_then_expire_to_the_lru():
    clock = Clock()
    bm = BlockManager(num_blocks=8, block_size=2, retain_s=10, retain_max_share=0.5, clock=clock)
    a = seq([1, 2, 3, 4, 5], session="s")
    prefill(bm, a, num_output_tokens=2)  # 7 tokens, 6 computed (the last output was never fed): 3 full blocks
    assert a.block_table == [0, 1, 2] and len(a.block_hashes) == 3
    assert bm.retain("s", a) == 3
    bm.free(a)
    assert [b.ref_count for b in bm.blocks] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert bm.num_pins == {0: 1, 1: 1, 2: 1} and bm.num_retained_blocks == 3
    assert list(bm.cached_block_ids) == [] and list(bm.free_block_ids) == [3, 4, 5, 6, 7]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (5, 3)
    # a burst takes every free block: LRU would have evicted 0..2 by now; the pins keep them
    b = seq([9] * 10)
    assert bm.allocate(b, 10) == [3, 4, 5, 6, 7]
    assert bm.match_prefix(seq([1, 2, 3, 4, 5, 100, 101, 7])) == [0, 1, 2]
    assert_consistent(bm, [b])
    bm.free(b)
    clock.t = 9.99
    assert bm.release_expired() == 0 and bm.next_expiry() == 10
    clock.t = 10
    assert bm.release_expired() == 3
    assert bm.num_pins == {} and bm.retentions == {} and bm.num_retained_blocks == 0
    assert list(bm.cached_block_ids) == [2, 1, 0]  # released tail first, as a free: the head is evicted last
    assert bm.num_retained_evicted_blocks == 0  # expiry is not an eviction
    assert_consistent(bm)


def test_next_turn_hits_the_retained_blocks_and_ends_the_pin():
    clock = Clock()
    bm = BlockManager(num_blocks=8, block_size=2, retain_s=10, retain_max_share=0.5, clock=clock)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, clock=clock)
    turn1 = seq([1, 2, 3, 4, 5], session="s")
    prefill(bm, turn1, num_output_tokens=3)  # prompt 5 + answer 3; 7 computed → 3 full blocks
    sched.finish(turn1, "stop")  # a session's choice 0 finishing: retained, then freed
    assert bm.num_pins == {0: 1, 1: 1, 2: 1}
    turn2 = seq(turn1.token_ids + [50, 51], session="s")  # turn 1 prompt + answer + tool result
    sched.add(turn2)
    clock.t = 5
    batch = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in batch.scheduled] == [(turn2.seq_id, 4)]
    assert turn2.num_cached_tokens == 6 == 5 + 3 - bm.block_size  # prompt + answer minus one block
    assert turn2.block_table[:3] == [0, 1, 2]
    assert bm.retentions == {} and bm.num_pins == {} and bm.num_retained_hits == 6
    assert [bm.blocks[b].ref_count for b in (0, 1, 2)] == [1, 1, 1]  # the new request's own references
    assert_consistent(bm, [turn2])


def test_abort_and_other_choices_and_sessionless_requests_retain_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, retain_s=10)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    for s, reason in [(seq([1, 2, 3, 4, 5], session="s"), "abort"), (seq([1, 2, 3, 4, 5]), "stop")]:
        prefill(bm, s, 1)
        sched.finish(s, reason)
    assert bm.retentions == {}
    off = BlockManager(num_blocks=8, block_size=2, retain_s=0)
    no_cache = BlockManager(num_blocks=8, block_size=2, retain_s=10, enable_prefix_caching=False)
    for m in (off, no_cache):
        s = seq([1, 2, 3, 4, 5], session="s")
        prefill(m, s, 1)
        assert m.retain("s", s) == 0 and m.num_retained_blocks == 0


def test_cap_keeps_the_head_of_a_long_context_and_drops_older_sessions():
    clock = Clock()
    bm = BlockManager(num_blocks=16, block_size=2, retain_s=60, retain_max_share=0.25, clock=clock)  # cap 4
    assert bm.max_retained_blocks == 4
    long = seq(list(range(1, 13)), session="long")  # 6 full blocks: only the leading 4 fit the cap
    prefill(bm, long, 1)
    assert bm.retain("long", long) == 4
    assert bm.retentions["long"].block_ids == long.block_table[:4]
    bm.free(long)
    clock.t = 1
    other = seq([40, 41, 42, 43, 44], session="other")
    prefill(bm, other, 1)
    assert bm.retain("other", other) == 2  # 4 + 2 > cap: "long" (older) is dropped whole
    other_blocks = list(other.block_table)
    bm.free(other)
    assert list(bm.retentions) == ["other"] and bm.num_retained_blocks == 2
    assert bm.num_retained_evicted_blocks == 4
    # re-retaining a session replaces its pin without a moment at ref count 0 (nothing is evicted meanwhile)
    again = seq([40, 41, 42, 43, 44, 45, 46], session="other")
    prefill(bm, again, 1)
    assert bm.retain("other", again) == 3 and bm.num_retained_blocks == 3
    assert bm.retentions["other"].block_ids[:2] == other_blocks[:2]
    bm.free(again)
    assert_consistent(bm)


def test_memory_short_drops_the_cheapest_retention_per_block_second():
    """InferCept's waste rule: drop min num_tokens / (reclaimable blocks × seconds paused). Session "a" is
    older, but most of its blocks are shared with a running request (dropping it frees one block for six
    tokens of recompute); private "b" frees two blocks for four tokens: "b" goes."""
    clock = Clock()
    bm = BlockManager(num_blocks=8, block_size=2, retain_s=60, retain_max_share=1.0, clock=clock)
    running = seq([1, 2, 3, 4, 5])
    prefill(bm, running)  # blocks 0, 1 (hashed) and 2
    a = seq([1, 2, 3, 4, 5, 6, 7], session="a")
    assert prefill(bm, a) == [3, 4]  # shares 0, 1
    bm.retain("a", a)
    bm.free(a)
    clock.t = 5
    b = seq([20, 21, 22, 23, 24], session="b")
    assert prefill(bm, b) == [5, 6, 7]
    bm.retain("b", b)
    bm.free(b)
    assert bm.num_pins == {0: 1, 1: 1, 3: 1, 5: 1, 6: 1} and list(bm.free_block_ids) == [4, 7]
    clock.t = 10
    c = seq([30, 31, 32, 33, 34, 35])
    assert bm.allocate(c, 6) == [4, 7, 6]  # two free blocks, then b's tail (released tail first)
    assert list(bm.retentions) == ["a"] and bm.num_retained_evicted_blocks == 2
    assert_consistent(bm, [running, c])
    # does not fit even if every retention is dropped: None, and nothing changed
    d = seq(list(range(60, 66)))
    assert bm.allocate(d, 6) is None
    assert list(bm.retentions) == ["a"] and bm.num_pins == {0: 1, 1: 1, 3: 1}
    assert bm.allocate(d, 4) == [5, 3]  # fits by dropping "a": only its private block 3 comes back
    assert bm.retentions == {} and bm.num_retained_evicted_blocks == 5
    assert_consistent(bm, [running, c, d])


def test_a_session_whose_next_request_is_queued_keeps_its_pin_longest():
    clock = Clock()
    bm = BlockManager(num_blocks=6, block_size=2, retain_s=60, retain_max_share=1.0, clock=clock)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64, clock=clock)
    old, young = seq([1, 2, 3], session="old"), seq([4, 5, 6], session="young")
    for t, s in ((0, old), (5, young)):
        clock.t = t
        prefill(bm, s, 1)  # 4 tokens, 3 computed: one full block pinned each
        sched.finish(s, "stop")
    blocker = seq([7, 8, 9, 10, 11, 12, 13])
    sched.add(blocker)
    sched.schedule()  # takes the 4 free blocks; the next request must wait for a slot
    assert bm.num_free_blocks == 0
    back = seq([1, 2, 3, 100, 9], session="old")
    sched.add(back)  # "old" is back: its pause is over
    assert bm.retentions["old"].is_returned and not bm.retentions["young"].is_returned
    clock.t = 10
    grower = seq([20, 21])
    assert bm.allocate(grower, 2) is not None  # memory short: the younger, still-paused pin goes
    assert list(bm.retentions) == ["old"]
    sched.finish(blocker, "stop")
    sched.finish(grower, "stop")
    assert sched.schedule().scheduled[0].seq is back and back.num_cached_tokens == 2


# ------------------------------------------------------------------------------------ scheduler


def _admit_one(sched: Scheduler) -> Sequence:
    (item,) = sched.schedule().scheduled
    return item.seq


def test_program_scheduling_admits_a_continuing_program_first_and_bounds_starvation():
    clock = Clock()
    bm = BlockManager(num_blocks=64, block_size=2)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64, program_scheduling=True,
                      program_window_s=10, program_max_wait_s=5, clock=clock)
    a1 = seq([1, 2, 3], program="A")
    sched.add(a1)
    assert _admit_one(sched) is a1
    clock.t = 1
    sched.finish(a1, "stop")  # program A paused on a tool at t=1
    clock.t = 2
    b1 = seq([4, 5, 6], program="B", arrival_time=2)  # a new program, earlier arrival
    a2 = seq([1, 2, 3, 9], program="A", arrival_time=3)  # A's next turn
    sched.add(b1)
    sched.add(a2)
    clock.t = 3
    assert _admit_one(sched) is a2  # A finished within the window: ahead of B's first request
    # while A runs, its next request still goes first; B has waited 4 s < 5 s
    a3 = seq([1, 2, 3, 9, 9], program="A", arrival_time=6)
    sched.add(a3)
    clock.t = 6
    sched.finish(a2, "stop")
    assert _admit_one(sched) is a3
    # B has now waited longer than program_max_wait_s: it goes first although A continues
    a4 = seq([7, 7, 7], program="A", arrival_time=7.5)
    sched.add(a4)
    clock.t = 7.5
    sched.finish(a3, "stop")
    assert _admit_one(sched) is b1
    clock.t = 8
    sched.finish(b1, "stop")
    assert _admit_one(sched) is a4
    # priority still comes first: a new program's urgent request beats a continuing one
    c1 = seq([8, 8], program="C", priority=-1, arrival_time=8)
    a5 = seq([6, 6], program="A", arrival_time=8)
    sched.add(a5)
    sched.add(c1)
    sched.finish(a4, "stop")
    assert _admit_one(sched) is c1


def test_program_fcfs_orders_continuing_programs_by_their_first_arrival_and_off_means_plain_fcfs():
    clock = Clock()
    order = {}
    for on in (True, False):
        bm = BlockManager(num_blocks=64, block_size=2)
        sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64, program_scheduling=on,
                          program_window_s=10, program_max_wait_s=100, clock=clock)
        first = {p: seq([1, 2], program=p) for p in ("old", "young")}
        for p in ("old", "young"):
            sched.add(first[p])
            sched.finish(first[p], "stop")  # both programs continuing (finished just now)
        new = seq([3], program="new")
        young, old = seq([4], program="young"), seq([5], program="old")
        for s in (new, young, old):
            sched.add(s)
        admitted = []
        while sched.waiting:
            s = _admit_one(sched)
            admitted.append(s.program_id)
            sched.finish(s, "stop")
        order[on] = admitted
    assert order[True] == ["old", "young", "new"]  # program FCFS, then the new program
    assert order[False] == ["new", "young", "old"]  # arrival order


def test_program_scheduling_orders_running_sequences_by_program_so_an_older_programs_prefill_goes_first():
    order = {}
    for on in (True, False):
        clock = Clock()
        bm = BlockManager(num_blocks=32, block_size=2)
        sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=12, program_scheduling=on,
                          program_window_s=10, program_max_wait_s=100, clock=clock)
        old1 = seq([1, 2], program="old")
        sched.add(old1)
        sched.schedule()
        sched.finish(old1, "stop")
        young = seq(list(range(10, 30)), program="young")  # a newer program's long prefill, admitted first
        sched.add(young)
        batch = sched.schedule()
        assert [(s.seq.program_id, s.num_new_tokens) for s in batch.scheduled] == [("young", 12)]
        young.num_computed_tokens = 12
        old2 = seq(list(range(30, 46)), program="old")  # the old program's next turn
        sched.add(old2)
        batch = sched.schedule()  # young finishes its prefill, old2 is admitted with the rest of the budget
        assert [(s.seq.program_id, s.num_new_tokens) for s in batch.scheduled] == [("young", 8), ("old", 4)]
        young.num_computed_tokens = 20
        young.token_ids.append(99)  # young now decodes
        old2.num_computed_tokens = 4
        batch = sched.schedule()  # both running: the running order decides who gets the budget first
        order[on] = ([s.program_id for s in sched.running], [(s.seq.program_id, s.num_new_tokens)
                                                             for s in batch.scheduled])
    assert order[True] == (["old", "young"], [("old", 12)])  # the older program's chunk first, the whole budget
    assert order[False] == (["young", "old"], [("young", 1), ("old", 11)])  # request FCFS


# ------------------------------------------------------------------------------------ engine


def run_turn(engine, prompt: list[int], session: str | None, max_tokens: int = 16):
    """One request to completion: (output token ids, num_cached_tokens)."""
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                             session_id=session)
    tokens, cached = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
                cached = out.num_cached_tokens
    return tokens, cached


class Recorder:
    def __init__(self) -> None:
        self.steps = []

    def record(self, scheduler_stats, iteration_stats) -> None:
        self.steps.append(scheduler_stats)


MESSAGES = [
    {"role": "system", "content": "You are a helpful agent. Paged attention stores the KV cache in fixed-size blocks."},
    {"role": "user", "content": "What is the weather in Paris?"},
]
TOOL_RESULT = {"role": "user", "content": "Tool result: 21 degrees and sunny. Hello world!"}
ANSWER = "\x00ANSWER\x00"  # where the answer's own token ids go in the rendered turn 2


def agent_turns(tokenizer, answer_token_ids: list[int]) -> tuple[list[int], list[int]]:
    """(turn 1 prompt ids, turn 2 prompt ids), both rendered through the chat template. Turn 2 = turn 1 +
    the answer + a tool result; the answer enters as the ids the engine generated (an agent that keeps
    token ids). The retokenised text variant is measured in the test."""
    def render(messages) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    text1 = render(MESSAGES)
    text2 = render([*MESSAGES, {"role": "assistant", "content": ANSWER}, TOOL_RESULT])
    before, after = text2.split(ANSWER)
    assert before == text1  # the template is prefix-stable: turn 2's text extends turn 1's
    return ids(text1), ids(before) + answer_token_ids + ids(after)


def burst(engine, seed: int) -> None:
    """Competing traffic during the pause: 16 short requests, 4 at a time (cumulatively 2x the pool)."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.generate(prompts(16, [24], seed=seed), params)


@pytest.mark.parametrize("render", ["token_ids", "chat_template"])
def test_turn_two_hits_the_retained_context_after_a_burst_that_evicts_it_without_retention(tiny_model_dir,
                                                                                          render):
    folder = tiny_model_dir("llama")
    results = {}
    for retain_s in (30.0, 0.0):
        clock, recorder = Clock(), Recorder()
        engine = tiny_engine(folder, stat_loggers=[recorder], clock=clock, num_kv_blocks=64, block_size=4,
                             max_num_seqs=4, kv_retain_s=retain_s, kv_retain_max_share=0.5)
        if render == "token_ids":
            [turn1] = prompts(1, [60], seed=5)
            answer, cached1 = run_turn(engine, turn1, "agent-1")
            turn2 = turn1 + answer + prompts(1, [9], seed=6)[0]  # + the tool result
        else:
            turn1, _ = agent_turns(engine.tokenizer, [])
            answer, cached1 = run_turn(engine, turn1, "agent-1")
            turn1_again, turn2 = agent_turns(engine.tokenizer, answer)
            assert turn1_again == turn1 and turn2[:len(turn1) + len(answer)] == turn1 + answer
        assert cached1 == 0
        pinned = engine.block_manager.num_retained_blocks
        clock.t = 20  # the tool runs; other agents' requests arrive meanwhile
        burst(engine, seed=7)
        evicted = engine.block_manager.num_retained_evicted_blocks
        clock.t = 25
        tokens2, cached2 = run_turn(engine, turn2, "agent-1")
        results[retain_s] = dict(pinned=pinned, evicted=evicted, cached=cached2, tokens=tokens2,
                                 hits=engine.stats().num_retained_hits_total, recorder=recorder, engine=engine,
                                 clock=clock, turn1=turn1, answer=answer)
    on, off = results[30.0], results[0.0]
    bs = 4
    computed = len(on["turn1"]) + len(on["answer"]) - 1  # the answer's last token was sampled, never fed
    assert on["pinned"] == computed // bs and on["evicted"] == 0
    assert on["cached"] >= len(on["turn1"]) + len(on["answer"]) - bs
    assert on["cached"] == on["hits"] == computed // bs * bs
    assert off["pinned"] == 0 and off["cached"] == 0 and off["hits"] == 0  # the burst evicted turn 1
    assert on["tokens"] == off["tokens"]  # the retained KV gives the same greedy continuation as a recompute

    # pinned blocks return to baseline after expiry (turn 2 re-pinned its longer context)
    engine, clock, recorder = on["engine"], on["clock"], on["recorder"]
    assert engine.block_manager.num_retained_blocks > 0 and recorder.steps[-1].num_retained_blocks > 0
    assert sum(s.retained_hits for s in recorder.steps) == on["hits"]
    clock.t = 25 + 30
    assert engine.step() == []  # an idle step lets the expired pin go and reports it
    assert engine.block_manager.num_retained_blocks == 0 and recorder.steps[-1].num_retained_blocks == 0
    stats = engine.stats()
    assert (stats.num_retained_blocks, stats.num_retained_sessions, stats.num_used_blocks) == (0, 0, 0)
    assert_consistent(engine.block_manager)


def test_the_text_a_client_sends_back_retokenises_and_still_hits_up_to_where_it_differs(tiny_model_dir):
    """The gateway re-renders the answer *text*; a random model's bytes need not re-tokenise to the same ids.
    Retention still serves every full block of the common prefix."""
    folder = tiny_model_dir("llama")
    clock = Clock()
    engine = tiny_engine(folder, clock=clock, num_kv_blocks=64, block_size=4, max_num_seqs=4, kv_retain_s=30,
                         kv_retain_max_share=0.5)
    tok = engine.tokenizer
    turn1, _ = agent_turns(tok, [])
    answer, _ = run_turn(engine, turn1, "agent-1")
    text = tok.decode(answer, skip_special_tokens=True)
    messages = [*MESSAGES, {"role": "assistant", "content": text}, TOOL_RESULT]
    turn2 = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"]
    computed = turn1 + answer[:-1]
    common = next((i for i, (x, y) in enumerate(zip(computed, turn2, strict=False)) if x != y), len(computed))
    assert common >= len(turn1)
    clock.t = 20
    burst(engine, seed=7)
    _, cached = run_turn(engine, turn2, "agent-1")
    assert cached == common // 4 * 4


def test_program_scheduling_in_the_engine(tiny_model_dir):
    clock = Clock()
    engine = tiny_engine(tiny_model_dir("llama"), clock=clock, max_num_seqs=1, kv_retain_s=10,
                         program_scheduling=True, program_max_wait_s=5)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    [pa, pb] = prompts(2, [8], seed=9)
    engine.add_request(pa, params, "a1", session_id="s-a", program_id="A")
    while engine.has_unfinished_requests():
        engine.step()
    clock.t = 1
    engine.add_request(pb, params, "b1", session_id="s-b", program_id="B")  # new program, first in line
    engine.add_request(pa + [7], params, "a2", session_id="s-a", program_id="A")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["a2", "b1"]
    # without program scheduling: arrival order
    plain = tiny_engine(tiny_model_dir("llama"), clock=clock, max_num_seqs=1, kv_retain_s=10)
    for rid, prompt, program in [("a1", pa, "A"), ("b1", pb, "B"), ("a2", pa + [7], "A")]:
        plain.add_request(prompt, params, rid, program_id=program)
    finished = []
    while plain.has_unfinished_requests():
        finished += [o.request_id for o in plain.step() if o.finished]
    assert finished == ["a1", "b1", "a2"]


async def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def two_turn_agents(aengine: AsyncEngine, observe=lambda: None) -> list[int]:
    """64 agents × 2 turns (prompt, answer, a tool pause, a tool result) through ``aengine``; each turn-2
    request's cached prompt tokens, in agent order. ``observe`` is called after every streamed output."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    firsts = prompts(64, [20, 27, 33], seed=11)
    results = prompts(64, [5], seed=12)

    async def agent(i: int) -> int:
        answer = []
        async for out in aengine.stream(f"s{i}-t1", firsts[i], params, session_id=f"s{i}", program_id=f"s{i}"):
            answer += out.new_token_ids
            observe()
        await asyncio.sleep(0.001 * (i % 7))  # the tool
        cached = 0
        async for out in aengine.stream(f"s{i}-t2", firsts[i] + answer + results[i], params,
                                        session_id=f"s{i}", program_id=f"s{i}"):
            cached = out.num_cached_tokens
            observe()
        return cached

    return await asyncio.gather(*(agent(i) for i in range(64)))


async def test_64_concurrent_sessions_leak_no_block(tiny_model_dir):
    """64 agents × 2 turns through AsyncEngine on a pool too small to keep them all (the cap and admission
    drop pins): after every stream ended and retention expired, each block is free or plain-cached."""
    clock = Clock()
    engine = tiny_engine(tiny_model_dir("llama"), clock=clock, num_kv_blocks=160, block_size=4, max_num_seqs=16,
                         max_num_batched_tokens=128, kv_retain_s=30, kv_retain_max_share=0.25,
                         program_scheduling=True)
    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        cached = await two_turn_agents(aengine)
        bm = engine.block_manager
        assert not engine.requests and bm.num_retained_blocks <= bm.max_retained_blocks == 40
        assert bm.num_retained_blocks > 0 and bm.num_retained_evicted_blocks > 0  # the cap dropped some
        assert sum(cached) > 0 and bm.num_retained_hits > 0
        clock.t = 31
        await _wait_for(lambda: not bm.retentions)  # the idle loop wakes up for the expiry
        assert_consistent(bm)
        assert bm.num_used_blocks == 0 and all(b.ref_count == 0 for b in bm.blocks)
        assert len(bm.free_block_ids) + len(bm.cached_block_ids) == bm.num_blocks
    finally:
        await aengine.shutdown()


def test_engine_args_validate_the_retention_and_program_options():
    assert EngineArgs().kv_retain_s == 0 and not EngineArgs().program_scheduling
    for bad in ({"kv_retain_s": -1}, {"kv_retain_max_share": 0}, {"kv_retain_max_share": 1.5},
                {"program_max_wait_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineArgs(**bad)


async def test_local_backend_passes_the_session_and_program_to_the_engine(tiny_model_dir):
    from backends.base import GenerationRequest
    from backends.local import LocalBackend

    options = EngineArgs(num_kv_blocks=64, block_size=4, max_model_len=128, max_num_batched_tokens=64,
                         num_threads=1, device="cpu", kv_retain_s=30, program_scheduling=True)
    backend = LocalBackend("slm/0", str(tiny_model_dir("llama")), options)
    await backend.load()
    try:
        sampling = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        messages = [{"role": "user", "content": "Hello world! How are you today?"}]
        turn1 = GenerationRequest(request_id="t1", model="slm", messages=messages, sampling=sampling,
                                  session_id="sess")
        deltas = [d async for d in backend.generate(turn1)]
        engine = backend.llm_engine
        assert list(engine.block_manager.retentions) == ["sess"]
        assert "sess" in engine.scheduler.program_finished_at  # the program defaults to the session
        answer = "".join(d.text for d in deltas)
        turn2 = GenerationRequest(request_id="t2", model="slm", sampling=sampling, session_id="sess",
                                  program_id="job", messages=[*messages, {"role": "assistant", "content": answer},
                                                              {"role": "user", "content": "Thanks."}])
        deltas = [d async for d in backend.generate(turn2)]
        assert deltas[-1].usage.cached_tokens >= backend.num_prompt_tokens(turn1) // 4 * 4
        assert engine.stats().num_retained_hits_total == deltas[-1].usage.cached_tokens
        assert "job" in engine.scheduler.program_finished_at
    finally:
        await backend.close()


def test_the_gateway_turns_the_retention_stats_into_prometheus_metrics():
    from backends.engine.stats import IterationStats, SchedulerStats
    from tests.gateway.test_metrics_naming import engine_metrics_text, replica_values

    base = dict(num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.5, num_kv_blocks=64)
    values = replica_values(engine_metrics_text(
        (SchedulerStats(**base, num_retained_blocks=12, retained_hits=40, num_retained_evicted_blocks=3),
         IterationStats()),
        (SchedulerStats(**base, num_retained_blocks=5, retained_hits=8), IterationStats())))
    assert values["switchyard_kv_retained_blocks"] == 5
    assert values["switchyard_kv_retained_hits_total"] == 48
    assert values["switchyard_kv_retained_evicted_blocks_total"] == 3
