"""`switchyard bench agents`: the trace is a pure function of its spec, round-trips through JSONL, and each
turn's context extends the previous one; a --quick engine-only run on the tiny model reports every figure."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.agents import (
    Trace,
    TraceSpec,
    kv_blocks_for,
    make_trace,
    parse_args,
    perturbed,
    recompute_sample,
    run,
)

SPEC = TraceSpec(num_programs=3, num_turns=4, system_len=40, user_len=(5, 9), tool_len=(10, 30), output_len=4,
                 pause_mean_s=2.0, arrival_gap_s=1.0, vocab_size=512, seed=3)


def test_the_trace_is_deterministic_from_its_seed_and_round_trips_through_jsonl(tmp_path):
    trace = make_trace(SPEC)
    assert make_trace(SPEC) == trace
    assert make_trace(dataclasses.replace(SPEC, seed=4)) != trace
    path = tmp_path / "trace.jsonl"
    trace.to_jsonl(path)
    assert Trace.from_jsonl(path) == trace
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + SPEC.num_programs and json.loads(lines[0])["spec"]["seed"] == 3
    assert [p.program_id for p in trace.programs] == ["p0", "p1", "p2"]
    arrivals = [p.arrival_s for p in trace.programs]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    for p in trace.programs:
        assert len(p.turns) == 4 and p.turns[0].pause_s == 0 and all(t.pause_s > 0 for t in p.turns[1:])
        assert 5 <= len(p.turns[0].input_token_ids) <= 9
        assert all(10 <= len(t.input_token_ids) <= 30 for t in p.turns[1:])
        assert all(200 <= x < 312 for t in p.turns for x in t.input_token_ids)
    assert len(trace.system_token_ids) == 40
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="2 programs"):
        Trace.from_jsonl(path)
    with pytest.raises(ValueError, match="tool_len"):
        TraceSpec(tool_len=(5, 4))


def test_each_turn_extends_the_previous_context_by_its_answer_and_a_tool_result():
    trace = make_trace(SPEC)
    answers = [[7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18]]
    for p, prog in enumerate(trace.programs):
        previous = trace.context(p, 0, [])
        assert previous == trace.system_token_ids + prog.turns[0].input_token_ids
        for k in range(1, SPEC.num_turns):
            ctx = trace.context(p, k, answers)
            assert ctx == previous + answers[k - 1] + prog.turns[k].input_token_ids
            assert len(ctx) == trace.context_len(p, k)
            previous = ctx
        assert trace.final_len(p) == len(previous) + SPEC.output_len
    with pytest.raises(ValueError, match="answers"):
        trace.context(0, 2, answers[:1])


def test_pool_sizing_sample_and_perturbation():
    trace = make_trace(SPEC)
    shared = 40 // 16
    private = sum(-(-trace.final_len(i) // 16) - shared for i in range(3))
    assert kv_blocks_for(trace, 0.5) == max(shared + -(-private // 2), max(-(-trace.final_len(i) // 16) for i in range(3)) + 1)
    sample = recompute_sample(trace, 3)
    lengths = sorted(trace.context_len(p, k) for p in range(3) for k in range(1, 4))
    assert [trace.context_len(p, k) for p, k in sample] == [lengths[0], lengths[len(lengths) // 2], lengths[-1]]
    assert all(k >= 1 for _, k in sample)
    ctx = trace.context(0, 0, [])
    a, b = perturbed(ctx, 0, 512), perturbed(ctx, 1, 512)
    assert a[1:] == b[1:] == ctx[1:] and len({a[0], b[0], ctx[0]}) == 3


def test_quick_engine_only_run_reports_every_figure(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    trace_file = tmp_path / "t.jsonl"
    opts = parse_args(["--quick", "--skip-llamacpp", "--model", str(folder), "--threads", "1", "--programs", "3",
                       "--turns", "3", "--system-len", "64", "--tool-len", "16,40", "--pause-mean-s", "0.05",
                       "--arrival-gap-s", "0.02", "--max-model-len", "256", "--recompute-samples", "2",
                       "--trace-out", str(trace_file)])
    rep = run(opts)
    assert Trace.from_jsonl(trace_file).spec.num_programs == 3
    off, on = rep["systems"]["switchyard, retention off"], rep["systems"]["switchyard, retention on"]
    for s in (off, on):
        assert s["mean_jct_s"] > 0 and s["ttft_after_pause_ms_p50"] > 0
        assert len(s["turns"]) == 9 and 0 < s["prefix_hit_rate"] <= 1
        assert len(s["recompute_ms"]) == len(s["resume_ms"]) == 2 and s["isolated_speedup_p50"] > 0
    assert on["retained_hit_tokens"] > 0 and off["retained_hit_tokens"] == 0
    assert off["offload_hit_tokens"] == off["offload_saved_blocks"] == 0  # the host tier is on only in "on"
    assert rep["engine"]["kv_offload_gb"] == 1.0 and rep["engine"]["max_num_seqs"] == 3
    assert [t["num_prompt_tokens"] for t in on["turns"]] != [] and rep["ratios"]["mean_jct off / on"] > 0
    # the same turns with the same prompt lengths in both runs
    assert sorted((t["program_id"], t["turn"], t["num_prompt_tokens"]) for t in on["turns"]) == \
        sorted((t["program_id"], t["turn"], t["num_prompt_tokens"]) for t in off["turns"])
    assert set(rep["targets"]) == {"mean JCT >= 1.5x better than retention off",
                                   "TTFT after a pause >= 5x faster than a recompute (in the trace)",
                                   "TTFT after a pause >= 5x faster than a recompute (isolated)"}
