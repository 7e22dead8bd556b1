"""What the engine reports to its StatLoggers after each step (backends/engine/stats.py): exact counts."""

from __future__ import annotations

from backends.engine.sampling_params import SamplingParams
from backends.engine.stats import IterationStats, SchedulerStats
from tests.engine.helpers import prompts, tiny_engine


class Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[SchedulerStats, IterationStats]] = []

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        self.steps.append((scheduler_stats, iteration_stats))

    def total(self, name: str) -> int:
        return sum(getattr(it, name) for _, it in self.steps)

    def all(self, name: str) -> list:
        return [x for _, it in self.steps for x in getattr(it, name)]


def test_stat_loggers_get_every_token_latency_and_finished_choice(tiny_model_dir):
    recorder = Recorder()
    engine = tiny_engine(tiny_model_dir("llama"), stat_loggers=[recorder])
    batch = prompts(3, [5, 9, 14], seed=7)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.generate(batch, params)
    assert recorder.total("num_generation_tokens") == 3 * 6
    assert recorder.total("num_prompt_tokens") == 5 + 9 + 14
    assert len(recorder.all("time_to_first_tokens_s")) == 3  # one first token per choice
    assert len(recorder.all("inter_token_latencies_s")) == 3 * 5  # and the gaps between the others
    finished = recorder.all("finished_requests")
    assert sorted((f.num_prompt_tokens, f.num_generation_tokens, f.finish_reason) for f in finished) == [
        (5, 6, "length"), (9, 6, "length"), (14, 6, "length")]
    assert all(f.e2e_latency_s >= f.queue_time_s >= 0 for f in finished)
    assert all(v >= 0 for v in recorder.all("time_to_first_tokens_s") + recorder.all("inter_token_latencies_s"))
    last, _ = recorder.steps[-1]
    assert (last.num_running_reqs, last.num_waiting_reqs, last.kv_cache_usage) == (0, 0, 0.0)
    assert last.num_kv_blocks == engine.block_manager.num_blocks
    assert all(0 <= s.kv_cache_usage <= 1 for s, _ in recorder.steps)


def test_prefix_cache_queries_and_hits_are_per_step_deltas(tiny_model_dir):
    recorder = Recorder()
    engine = tiny_engine(tiny_model_dir("llama"), stat_loggers=[recorder])  # block_size 4
    [prompt] = prompts(1, [24], seed=3)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.generate([prompt], params)
    engine.generate([prompt], params)
    queries = sum(s.prefix_cache_queries for s, _ in recorder.steps)
    hits = sum(s.prefix_cache_hits for s, _ in recorder.steps)
    assert (queries, hits) == (engine.block_manager.num_prefix_queries, engine.block_manager.num_prefix_hits)
    assert (queries, hits) == (48, 20)  # the second lookup finds 5 full blocks (one token is always computed)


def test_no_loggers_no_stats_work(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"))
    assert engine.stat_loggers == []
    [result] = engine.generate(prompts(1, [6]), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(result.token_ids) == 3 and engine.stats().num_generation_tokens_total == 3
