"""`switchyard bench agents`: a replayable agent trace on the embedded engine (KV retention and program-aware
scheduling off, then on) and on llama.cpp's ``llama-server``, same machine, one run.

The trace (generated from ``--seed``, or read from a JSONL file written by ``--trace-out``), token ids only:

* ``--programs`` N agent programs (default 8) of ``--turns`` M turns (default 6), one shared system prompt of
  ``--system-len`` tokens (1,024). Turn 0 = system prompt + a user message (``--user-len``, 64–128 tokens);
  turn k = turn k-1's prompt + its answer + a tool result (``--tool-len``, 100–300 tokens, uniform), so every
  turn's prompt extends the previous one and contexts grow to about 2.5k tokens (max ~2.9k at the defaults).
* Every answer is ``--output-len`` tokens (32; greedy, EOS ignored) and is the system's *own* output: each
  system appends what it generated, so contexts have the same lengths everywhere and only the answer ids may
  differ (the two switchyard runs produce the same ids).
* Tool pauses before turns 1..M-1: exponential with mean ``--pause-mean-s`` (2 s); program arrivals: program 0
  at 0 s, then exponential gaps with mean ``--arrival-gap-s`` (1 s). Both drawn from ``random.Random(seed)``,
  not truncated. Token ids are random, away from the special ids (``bench.engine.make_prompts``).

The systems (``--threads`` each, 2 by default, one at a time, each after a warm-up request):

1. switchyard, retention off: ``LLMEngine`` driven through ``AsyncEngine`` (``kv_retain_s`` 0, program scheduling
   off; prefix caching on, so a context that survives the LRU during a pause still hits);
2. switchyard, retention on: ``kv_retain_s`` (30 s), ``kv_retain_max_share`` (0.5), ``program_scheduling`` and
   the host KV tier ``kv_offload_gb`` (``--kv-offload-gb``, 1 GiB: evicted blocks are copied there and copied back
   on a prefix match; 0 = pinning only, as before). ``--ablation`` adds retention without program scheduling,
   pinning + scheduling without the host tier, and the host tier alone.
   Both send every request with its session and program id (the program's id), run at most ``--max-num-seqs``
   sequences at once (default: one per program) and use the same KV pool:
   ``num_kv_blocks`` = the shared system prompt's blocks + ``--kv-fit`` (0.5) x the sum over programs of their
   private blocks at the last turn (prompt + answer), i.e. the pool holds the working set of about half the
   programs, so without retention the pauses cause evictions;
3. llama-server on the GGUF the model is converted from, ``-np N`` (one slot per program; each request names its
   program's slot with ``id_slot``), ``-c N x (longest context + 64)``, its default host prompt cache, streamed
   ``/completion`` requests with ``cache_prompt`` and ``return_tokens`` (its answer ids feed the next turn).

Reported per system: mean job completion time (a program's arrival → its last token), time to first token of
the turns after a pause (request sent → first token, in the trace, under the other programs' load; p50), the
prefix-hit rate (ours: prompt tokens found in the prefix cache over prompt tokens looked up, from the engine's
stat logger; llama-server: the sum of ``timings.cache_n`` over the sum of ``cache_n + prompt_n``) and the same
for the post-pause turns' own context only (beyond the shared system prompt, which every system caches). Against
a full recompute: ``--recompute-samples`` post-pause turns (spread over the context lengths) are re-sent after
the trace, one at a time on the idle system, ``max_tokens`` 1: *recompute* = the context with its first token
changed (nothing can hit; llama-server also gets ``cache_prompt: false``), *resume* = the previous turn's context
+ answer sent first, then this turn's (both with another first token): a turn whose context survived its
pause, without competition. Ratios: on vs off, on vs llama-server, the trace's TTFT and the isolated resume vs
the isolated recompute (the switchyard runs share one isolated measurement: same engine, idle).

``switchyard bench agents [--quick] [--json] [--skip-llamacpp] [--programs 8] [--turns 6] [--seed 0]
[--trace FILE | --trace-out FILE] [--threads 2] [--model smollm2-135m] ...`` (``--help`` lists all).
The load average is printed with every result: numbers taken while other jobs run are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.engine import LlamaServer, ensure_llama_server, make_prompts, say

TRACE_VERSION = 1
BLOCK_SIZE = 16


# ----------------------------------------------------------------------------- the trace
@dataclass(frozen=True)
class TraceSpec:
    """How a trace is drawn; stored in its file so a replay says what it is."""

    num_programs: int = 8
    num_turns: int = 6
    system_len: int = 1024
    user_len: tuple[int, int] = (64, 128)  # uniform, inclusive
    tool_len: tuple[int, int] = (100, 300)
    output_len: int = 32
    pause_mean_s: float = 2.0  # exponential
    arrival_gap_s: float = 1.0  # exponential gaps between program arrivals
    vocab_size: int = 49152
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_programs", "num_turns", "system_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("user_len", "tool_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be LO,HI with 1 <= LO <= HI, got {lo},{hi}")
        if self.pause_mean_s < 0 or self.arrival_gap_s < 0:
            raise ValueError("pause_mean_s and arrival_gap_s must be >= 0")
        if self.vocab_size < 401:
            raise ValueError(f"vocab_size must be >= 401 (ids are drawn from [200, vocab - 200)), got {self.vocab_size}")


@dataclass(frozen=True)
class Turn:
    input_token_ids: list[int]  # turn 0: the user message; later turns: the tool result
    pause_s: float  # the tool pause before this turn is sent (0 for turn 0)


@dataclass(frozen=True)
class Program:
    program_id: str
    arrival_s: float
    turns: list[Turn]


@dataclass(frozen=True)
class Trace:
    spec: TraceSpec
    system_token_ids: list[int]
    programs: list[Program]

    def context(self, program: int, turn: int, answers: list[list[int]]) -> list[int]:
        """The prompt of ``turn``: system prompt, then each earlier turn's input and answer, then its input."""
        if len(answers) < turn:
            raise ValueError(f"turn {turn} needs the answers of the {turn} turns before it, got {len(answers)}")
        turns = self.programs[program].turns
        tokens = list(self.system_token_ids)
        for k in range(turn):
            tokens += turns[k].input_token_ids + answers[k]
        return tokens + turns[turn].input_token_ids

    def context_len(self, program: int, turn: int) -> int:
        """Length of ``context(program, turn, ...)`` (answers are ``output_len`` tokens each)."""
        turns = self.programs[program].turns
        return (len(self.system_token_ids) + sum(len(t.input_token_ids) for t in turns[:turn + 1])
                + turn * self.spec.output_len)

    def final_len(self, program: int) -> int:
        """Tokens of the program's last prompt plus its answer: its working set at the end."""
        return self.context_len(program, len(self.programs[program].turns) - 1) + self.spec.output_len

    def to_jsonl(self, path: Path) -> None:
        spec = asdict(self.spec)
        lines = [json.dumps({"kind": "trace", "version": TRACE_VERSION, "spec": spec,
                             "system_token_ids": self.system_token_ids})]
        for p in self.programs:
            lines.append(json.dumps({"kind": "program", "program_id": p.program_id, "arrival_s": p.arrival_s,
                                     "turns": [{"pause_s": t.pause_s, "input_token_ids": t.input_token_ids}
                                               for t in p.turns]}))
        path.write_text("\n".join(lines) + "\n")

    @classmethod
    def from_jsonl(cls, path: Path) -> Trace:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows or rows[0].get("kind") != "trace" or rows[0].get("version") != TRACE_VERSION:
            raise ValueError(f"{path}: the first line must be a version-{TRACE_VERSION} trace header")
        raw = dict(rows[0]["spec"])
        raw["user_len"], raw["tool_len"] = tuple(raw["user_len"]), tuple(raw["tool_len"])
        spec = TraceSpec(**raw)
        programs = []
        for i, row in enumerate(rows[1:], start=2):
            if row.get("kind") != "program" or len(row.get("turns", [])) != spec.num_turns:
                raise ValueError(f"{path}:{i}: expected a program with {spec.num_turns} turns")
            programs.append(Program(row["program_id"], float(row["arrival_s"]),
                                    [Turn(list(t["input_token_ids"]), float(t["pause_s"])) for t in row["turns"]]))
        if len(programs) != spec.num_programs:
            raise ValueError(f"{path}: {len(programs)} programs, the header says {spec.num_programs}")
        return cls(spec, list(rows[0]["system_token_ids"]), programs)


def make_trace(spec: TraceSpec) -> Trace:
    """The trace ``spec`` describes; the same spec (seed included) always gives the same trace."""
    rng = random.Random(spec.seed)

    def tokens(n: int) -> list[int]:
        return make_prompts(1, n, spec.vocab_size, seed=rng.randrange(2**31))[0]

    system = tokens(spec.system_len)
    programs, arrival = [], 0.0
    for i in range(spec.num_programs):
        if i:
            arrival += rng.expovariate(1 / spec.arrival_gap_s) if spec.arrival_gap_s > 0 else 0.0
        turns = [Turn(tokens(rng.randint(*spec.user_len)), 0.0)]
        for _ in range(spec.num_turns - 1):
            pause = rng.expovariate(1 / spec.pause_mean_s) if spec.pause_mean_s > 0 else 0.0
            turns.append(Turn(tokens(rng.randint(*spec.tool_len)), round(pause, 4)))
        programs.append(Program(f"p{i}", round(arrival, 4), turns))
    return Trace(spec, system, programs)


def kv_blocks_for(trace: Trace, fit: float, min_tokens: int = 0, block_size: int = BLOCK_SIZE) -> int:
    """A KV pool holding the shared system prompt plus ``fit`` of the programs' private blocks at their last
    turn; never less than the longest program needs alone plus one block, nor than ``min_tokens`` (the
    engine's pool must hold max_model_len)."""
    shared = len(trace.system_token_ids) // block_size
    finals = [math.ceil(trace.final_len(i) / block_size) for i in range(len(trace.programs))]
    return max(shared + math.ceil(fit * sum(f - shared for f in finals)), max(finals) + 1,
               math.ceil(min_tokens / block_size))


def recompute_sample(trace: Trace, num: int) -> list[tuple[int, int]]:
    """``num`` post-pause turns (program, turn) spread evenly over the context lengths (shortest to longest)."""
    turns = sorted((trace.context_len(p, k), p, k) for p in range(len(trace.programs))
                    for k in range(1, trace.spec.num_turns))
    if not turns or num < 1:
        return []
    picks = sorted({round(j * (len(turns) - 1) / max(num - 1, 1)) for j in range(min(num, len(turns)))})
    return [(turns[i][1], turns[i][2]) for i in picks]


# ----------------------------------------------------------------------------- replaying it
@dataclass
class Reply:
    """What a system answered to one turn (``perf_counter`` times)."""

    first_token_at: float
    done_at: float
    token_ids: list[int]
    num_cached_tokens: int | None = None  # llama-server: timings.cache_n; ours: the request's own count
    num_computed_tokens: int | None = None  # llama-server: timings.prompt_n


@dataclass
class TurnResult:
    program_id: str
    turn: int
    num_prompt_tokens: int
    sent_s: float  # since the run started
    first_token_s: float
    done_s: float
    num_cached_tokens: int | None
    num_computed_tokens: int | None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.sent_s


Send = Callable[[int, Program, int, list[int]], Awaitable[Reply]]


async def replay(trace: Trace, send: Send) -> tuple[list[TurnResult], list[list[list[int]]], float]:
    """Every program of the trace, concurrently, in real time: arrive, send turn 0, and for each later turn
    sleep its tool pause and send the context extended by the answer. Returns (turns, answers per program,
    wall seconds)."""
    start = time.perf_counter()
    results: list[TurnResult] = []
    answers: list[list[list[int]]] = [[] for _ in trace.programs]

    async def program(i: int, prog: Program) -> None:
        await asyncio.sleep(max(0.0, start + prog.arrival_s - time.perf_counter()))
        for k, turn in enumerate(prog.turns):
            if k:
                await asyncio.sleep(turn.pause_s)
            prompt = trace.context(i, k, answers[i])
            sent = time.perf_counter()
            reply = await send(i, prog, k, prompt)
            if len(reply.token_ids) != trace.spec.output_len:
                raise RuntimeError(f"{prog.program_id} turn {k}: {len(reply.token_ids)} output tokens, "
                                   f"not {trace.spec.output_len}")
            answers[i].append(reply.token_ids)
            results.append(TurnResult(prog.program_id, k, len(prompt), sent - start, reply.first_token_at - start,
                                      reply.done_at - start, reply.num_cached_tokens, reply.num_computed_tokens))

    await asyncio.gather(*(program(i, p) for i, p in enumerate(trace.programs)))
    return results, answers, time.perf_counter() - start


SendOne = Callable[[str, list[int], bool, int | None], Awaitable[Reply]]  # (request id, prompt, cache, slot)


async def isolated_ttfts(trace: Trace, answers: list[list[list[int]]], sample: list[tuple[int, int]],
                         send_one: SendOne) -> tuple[dict[str, float], dict[str, float]]:
    """On an idle system, one request at a time, ``max_tokens`` 1, for each sampled turn (program, k):
    * recompute: its context with the first token changed, so nothing of it can be cached;
    * resume: the previous turn's context + answer sent first (cached, as a retained turn would be), then
      this turn's context (= that + the tool result), both with another first token, so only the first
      request's blocks can hit — a turn after a pause whose context survived it.
    Returns (recompute ms, resume ms), keyed "p3/t4". ``send_one(request_id, prompt, cache, slot)``."""
    recompute, resume = {}, {}
    vocab = trace.spec.vocab_size
    for j, (p, k) in enumerate(sample):
        key = f"p{p}/t{k}"
        full = trace.context(p, k, answers[p])
        sent = time.perf_counter()
        reply = await send_one(f"recompute-{j}", perturbed(full, 2 * j, vocab), False, None)
        recompute[key] = (reply.first_token_at - sent) * 1e3
        before = trace.context(p, k - 1, answers[p]) + answers[p][k - 1]
        await send_one(f"resume-{j}-before", perturbed(before, 2 * j + 1, vocab), True, j)
        sent = time.perf_counter()
        reply = await send_one(f"resume-{j}", perturbed(full, 2 * j + 1, vocab), True, j)
        resume[key] = (reply.first_token_at - sent) * 1e3
    return recompute, resume


def perturbed(prompt: list[int], index: int, vocab_size: int) -> list[int]:
    """The prompt with its first token replaced by one that depends on ``index``: the same work, no prefix hit
    (and no hit on another perturbed prompt)."""
    token = 200 + index
    if token == prompt[0]:
        token = 200 + vocab_size // 2 + index
    return [token % vocab_size, *prompt[1:]]


@dataclass
class SystemRun:
    system: str
    turns: list[TurnResult]
    arrivals: dict[str, float]
    wall_s: float
    prefix_hit_tokens: int
    prefix_query_tokens: int
    recompute_ms: dict[str, float] = field(default_factory=dict)  # "p3/t4" → isolated_ttfts
    resume_ms: dict[str, float] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before / after
    extra: dict[str, Any] = field(default_factory=dict)

    def jct_s(self) -> dict[str, float]:
        last = {}
        for t in self.turns:
            last[t.program_id] = max(last.get(t.program_id, 0.0), t.done_s)
        return {p: last[p] - a for p, a in self.arrivals.items()}

    def post_pause(self) -> list[TurnResult]:
        return [t for t in self.turns if t.turn > 0]

    def context_hit_rate(self, shared_len: int) -> float:
        """Of the post-pause turns' own context (their prompt beyond the shared system prompt), the share
        found cached: what retention is for (the shared prompt hits on every system after its first use)."""
        post = [t for t in self.post_pause() if t.num_cached_tokens is not None]
        total = sum(t.num_prompt_tokens - shared_len for t in post)
        return sum(max(0, t.num_cached_tokens - shared_len) for t in post) / total if total else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


# ----------------------------------------------------------------------------- switchyard
class _PrefixCounter:
    """A StatLogger that sums the engine's prefix-cache and retention counters (engine thread)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.queries = self.hits = self.retained_hits = self.retained_evicted_blocks = self.preemptions = 0
        self.offload_hits = self.offload_saved_blocks = 0

    def record(self, scheduler_stats, iteration_stats) -> None:
        self.queries += scheduler_stats.prefix_cache_queries
        self.hits += scheduler_stats.prefix_cache_hits
        self.retained_hits += scheduler_stats.retained_hits
        self.retained_evicted_blocks += scheduler_stats.num_retained_evicted_blocks
        self.preemptions += scheduler_stats.num_preemptions
        self.offload_hits += scheduler_stats.offload_hits
        self.offload_saved_blocks += scheduler_stats.offload_saved_blocks


def engine_args(opts: argparse.Namespace, trace: Trace, retention: bool, program_scheduling: bool,
                offload: bool = False):
    from backends.engine.args import EngineArgs

    return EngineArgs(
        quantization=opts.quantization, max_model_len=opts.max_model_len,
        max_num_seqs=opts.max_num_seqs or len(trace.programs),
        block_size=BLOCK_SIZE, num_kv_blocks=kv_blocks_for(trace, opts.kv_fit, opts.max_model_len), enable_prefix_caching=True,
        num_threads=opts.threads, device="cpu",
        kv_retain_s=opts.kv_retain_s if retention else 0.0, kv_retain_max_share=opts.kv_retain_max_share,
        program_scheduling=program_scheduling, kv_offload_gb=opts.kv_offload_gb if offload else 0.0,
    )


async def ours(opts: argparse.Namespace, trace: Trace, retention: bool, program_scheduling: bool, label: str,
               recompute: list[tuple[int, int]] | None = None, offload: bool = False) -> SystemRun:
    """Replay on a fresh engine; with ``recompute`` (sampled turns), then ``isolated_ttfts`` on them."""
    from backends.engine.async_engine import AsyncEngine
    from backends.engine.llm_engine import LLMEngine
    from backends.engine.sampling_params import SamplingParams
    from backends.models import resolve_model_path

    counter = _PrefixCounter()
    args = engine_args(opts, trace, retention, program_scheduling, offload)
    say(f"[{label}] loading {opts.model}: {args.num_kv_blocks} KV blocks x {BLOCK_SIZE} tokens, kv_retain_s="
        f"{args.kv_retain_s}, kv_retain_max_share={args.kv_retain_max_share}, program_scheduling="
        f"{args.program_scheduling}, kv_offload_gb={args.kv_offload_gb}")
    engine = await asyncio.to_thread(LLMEngine, resolve_model_path(opts.model), args, device="cpu",
                                     stat_loggers=[counter])
    aengine = AsyncEngine(engine)
    aengine.start()
    params = SamplingParams(temperature=0, max_tokens=trace.spec.output_len, ignore_eos=True)

    async def run_one(request_id: str, prompt: list[int], sampling, session: str | None) -> Reply:
        first, tokens, cached = None, [], None
        async for out in aengine.stream(request_id, prompt, sampling, session_id=session, program_id=session):
            if out.new_token_ids and first is None:
                first = time.perf_counter()
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
        return Reply(first or time.perf_counter(), time.perf_counter(), tokens, cached)

    async def send(i: int, prog: Program, k: int, prompt: list[int]) -> Reply:
        return await run_one(f"{prog.program_id}-t{k}", prompt, params, prog.program_id)

    try:
        warm = make_prompts(1, 64, trace.spec.vocab_size, seed=7)[0]
        await run_one("warm-up", warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), None)
        counter.reset()
        load_before = os.getloadavg()[0]
        turns, answers, wall = await replay(trace, send)
        load_after = os.getloadavg()[0]
        run = SystemRun(label, turns, {p.program_id: p.arrival_s for p in trace.programs}, wall, counter.hits,
                        counter.queries, load=(load_before, load_after),
                        extra={"num_kv_blocks": args.num_kv_blocks, "retained_hit_tokens": counter.retained_hits,
                               "retained_evicted_blocks": counter.retained_evicted_blocks,
                               "preemptions": counter.preemptions, "offload_hit_tokens": counter.offload_hits,
                               "offload_saved_blocks": counter.offload_saved_blocks})
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

        async def send_one(request_id: str, prompt: list[int], cache: bool, slot: int | None) -> Reply:
            return await run_one(request_id, prompt, one, None)  # prefix caching keeps an idle engine's blocks

        run.recompute_ms, run.resume_ms = await isolated_ttfts(trace, answers, recompute or [], send_one)
    finally:
        await aengine.shutdown()
    say(_summary(run))
    return run


# ----------------------------------------------------------------------------- llama.cpp
async def _llama_turn(client, url: str, prompt: list[int], max_tokens: int, slot: int | None,
                      cache_prompt: bool = True) -> Reply:
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "cache_prompt": cache_prompt, "return_tokens": True}
    if slot is not None:
        body["id_slot"] = slot
    first, tokens, timings = None, [], {}
    async with client.stream("POST", f"{url}/completion", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("tokens"):
                first = first or time.perf_counter()
                tokens += chunk["tokens"]
            timings = chunk.get("timings", timings)
    return Reply(first or time.perf_counter(), time.perf_counter(), tokens, timings.get("cache_n"),
                 timings.get("prompt_n"))


async def llama(opts: argparse.Namespace, trace: Trace, recompute: list[tuple[int, int]]) -> SystemRun:
    import httpx

    from backends.models import source_gguf

    binary = opts.llama_server or ensure_llama_server(opts.bench_dir)
    gguf = source_gguf(opts.model)
    slots = len(trace.programs)
    ctx_per_slot = max(trace.final_len(i) for i in range(slots)) + 64
    log = opts.bench_dir.resolve() / "llama-server-agents.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    label = f"llama.cpp ({gguf.name.split('.')[-2]} GGUF, -np {slots})"
    say(f"[llama.cpp] {binary.name} on {gguf.name}, {slots} slots x {ctx_per_slot} ctx, {opts.threads} threads")
    with LlamaServer(binary, gguf, opts.threads, slots, ctx_per_slot, log) as server:
        url = server.base_url
        # a fresh connection per request: this llama-server dropped requests sent on a reused connection
        # after a streamed response (RemoteProtocolError on the 5th request of one connection); loopback
        # connects cost well under a millisecond
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as c:
            warm = make_prompts(1, 64, trace.spec.vocab_size, seed=7)[0]
            await _llama_turn(c, url, warm, 4, None)

            async def send(i: int, prog: Program, k: int, prompt: list[int]) -> Reply:
                return await _llama_turn(c, url, prompt, trace.spec.output_len, i)

            load_before = os.getloadavg()[0]
            turns, answers, wall = await replay(trace, send)
            load_after = os.getloadavg()[0]
            missing = [t for t in turns if t.num_cached_tokens is None or t.num_computed_tokens is None]
            if missing:
                raise RuntimeError(f"llama-server sent no timings.cache_n / prompt_n for {len(missing)} turns")
            hits = sum(t.num_cached_tokens for t in turns)
            run = SystemRun(label, turns, {p.program_id: p.arrival_s for p in trace.programs}, wall, hits,
                            hits + sum(t.num_computed_tokens for t in turns), load=(load_before, load_after),
                            extra={"slots": slots, "ctx_per_slot": ctx_per_slot})

            async def send_one(request_id: str, prompt: list[int], cache: bool, slot: int | None) -> Reply:
                return await _llama_turn(c, url, prompt, 1, None if slot is None else slot % slots, cache)

            run.recompute_ms, run.resume_ms = await isolated_ttfts(trace, answers, recompute, send_one)
    say(_summary(run))
    return run


# ----------------------------------------------------------------------------- the run
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="switchyard bench agents", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or HF folder (llama.cpp needs a bundled GGUF)")
    p.add_argument("--programs", type=int, default=None, help="agent programs (default 8; --quick 4)")
    p.add_argument("--turns", type=int, default=None, help="turns per program (default 6; --quick 3)")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    p.add_argument("--system-len", type=int, default=None, help="shared system prompt tokens (default 1024)")
    p.add_argument("--user-len", default=None, help="LO,HI first user message tokens (default 64,128)")
    p.add_argument("--tool-len", default=None, help="LO,HI tool result tokens (default 100,300)")
    p.add_argument("--output-len", type=int, default=None, help="answer tokens per turn, EOS ignored (default 32)")
    p.add_argument("--pause-mean-s", type=float, default=None, help="mean of the exponential tool pause (default 2)")
    p.add_argument("--arrival-gap-s", type=float, default=None, help="mean exponential gap between program arrivals (default 1)")
    p.add_argument("--trace", type=Path, default=None, help="replay this JSONL trace (the trace flags are ignored)")
    p.add_argument("--trace-out", type=Path, default=None, help="write the trace to this JSONL file")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every system (default 2)")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"], help="switchyard weights")
    p.add_argument("--max-model-len", type=int, default=None, help="switchyard context (default 4096; --quick 512)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="switchyard (both runs): sequences running at once (default: one per program)")
    p.add_argument("--kv-fit", type=float, default=0.5,
                   help="KV pool = shared prompt + this share of the programs' private working set (default 0.5)")
    p.add_argument("--kv-retain-s", type=float, default=30.0, help="retention on: kv_retain_s (default 30)")
    p.add_argument("--kv-retain-max-share", type=float, default=0.5, help="kv_retain_max_share (default 0.5)")
    p.add_argument("--kv-offload-gb", type=float, default=1.0,
                   help="retention on: kv_offload_gb, the host KV tier (default 1; 0 = pinning only)")
    p.add_argument("--recompute-samples", type=int, default=None, help="contexts re-sent cold (default 8; --quick 3)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--skip-llamacpp", action="store_true", help="do not build/run llama-server")
    p.add_argument("--ablation", action="store_true",
                   help="also run switchyard with retention on and program scheduling off")
    p.add_argument("--llama-server", type=Path, default=None, help="use this llama-server binary (no build)")
    p.add_argument("--bench-dir", type=Path, default=Path(".bench"), help="where peers are built (git-ignored)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    opts = p.parse_args(argv)
    quick = opts.quick

    def pair(value: str | None, default: tuple[int, int], name: str) -> tuple[int, int]:
        if value is None:
            return default
        try:
            lo, hi = (int(x) for x in value.split(","))
        except ValueError:
            raise ValueError(f"--{name}: expected LO,HI (two integers), got {value!r}") from None
        return lo, hi

    opts.max_model_len = opts.max_model_len or (512 if quick else 4096)
    opts.recompute_samples = opts.recompute_samples if opts.recompute_samples is not None else (3 if quick else 8)
    opts.spec_overrides = dict(
        num_programs=opts.programs or (4 if quick else 8), num_turns=opts.turns or (3 if quick else 6),
        system_len=opts.system_len or (256 if quick else 1024),
        user_len=pair(opts.user_len, (16, 32) if quick else (64, 128), "user-len"),
        tool_len=pair(opts.tool_len, (32, 96) if quick else (100, 300), "tool-len"),
        output_len=opts.output_len or (8 if quick else 32),
        pause_mean_s=opts.pause_mean_s if opts.pause_mean_s is not None else (0.5 if quick else 2.0),
        arrival_gap_s=opts.arrival_gap_s if opts.arrival_gap_s is not None else (0.25 if quick else 1.0),
        seed=opts.seed,
    )
    if opts.threads < 1 or not 0 < opts.kv_fit <= 1 or opts.recompute_samples < 0 or opts.kv_offload_gb < 0 \
            or (opts.max_num_seqs is not None and opts.max_num_seqs < 1):
        raise ValueError("--threads and --max-num-seqs must be >= 1, --kv-fit in (0, 1], --recompute-samples >= 0, "
                         "--kv-offload-gb >= 0")
    return opts


def load_trace(opts: argparse.Namespace, vocab_size: int) -> Trace:
    trace = Trace.from_jsonl(opts.trace) if opts.trace else make_trace(
        TraceSpec(**opts.spec_overrides, vocab_size=vocab_size))
    if trace.spec.vocab_size > vocab_size:
        raise ValueError(f"the trace draws ids from a {trace.spec.vocab_size}-token vocabulary; the model has {vocab_size}")
    longest = max(trace.final_len(i) for i in range(len(trace.programs)))
    if longest > opts.max_model_len:
        raise ValueError(f"the trace's longest context + answer is {longest} tokens > --max-model-len {opts.max_model_len}")
    if opts.trace_out:
        trace.to_jsonl(opts.trace_out)
        say(f"[trace] written to {opts.trace_out}")
    return trace


def run(opts: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import torch

    from backends.models import resolve_model_path

    torch.set_num_threads(opts.threads)
    folder = resolve_model_path(opts.model)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    trace = load_trace(opts, vocab)
    sample = recompute_sample(trace, opts.recompute_samples)
    notes: list[str] = []
    runs = [asyncio.run(ours(opts, trace, False, False, "switchyard, retention off", sample)),
            asyncio.run(ours(opts, trace, True, True, "switchyard, retention on", offload=opts.kv_offload_gb > 0))]
    if opts.ablation:  # program scheduling's window is kv_retain_s: without retention it has no pauses to bridge
        runs.append(asyncio.run(ours(opts, trace, True, False, "switchyard, retention only")))
        if opts.kv_offload_gb > 0:
            runs.append(asyncio.run(ours(opts, trace, True, True, "switchyard, pin + sched, no host")))
            runs.append(asyncio.run(ours(opts, trace, False, False, "switchyard, host tier only", offload=True)))
    # same engine, same contexts: the isolated TTFTs are measured once (idle, prefix caching holds the resumed
    # context with or without retention)
    for r in runs[1:]:
        r.recompute_ms, r.resume_ms = dict(runs[0].recompute_ms), dict(runs[0].resume_ms)
        r.extra["isolated_ttfts_from"] = runs[0].system
    if not opts.skip_llamacpp:
        try:
            runs.append(asyncio.run(llama(opts, trace, sample)))
        except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError, httpx.HTTPError) as e:
            notes.append(f"llama.cpp failed, not reported: {type(e).__name__}: {e}")
            say(f"[llama.cpp] failed: {type(e).__name__}: {e}")
    busy = [r for r in runs if max(r.load) > opts.threads + 0.5]
    if busy:
        notes.append(f"measured while other jobs ran (1-minute load average up to {max(max(r.load) for r in busy):.1f} "
                     f"on {os.cpu_count()} CPUs): numbers are noisy")
    return report(opts, trace, runs, notes)


# ----------------------------------------------------------------------------- the report
def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _summary(run: SystemRun) -> str:
    ttft = [t.ttft_s * 1e3 for t in run.post_pause()]
    return (f"  {run.system:34s} mean JCT {statistics.mean(run.jct_s().values()):7.2f} s   TTFT after pause p50 "
            f"{_p50(ttft):8.1f} ms   prefix hits {run.prefix_hit_rate:6.1%}   wall {run.wall_s:.1f} s   "
            f"load {run.load[0]:.1f} → {run.load[1]:.1f}")


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b and not math.isnan(a) and not math.isnan(b) else None


def report(opts: argparse.Namespace, trace: Trace, runs: list[SystemRun], notes: list[str]) -> dict[str, Any]:
    spec = trace.spec
    systems: dict[str, dict[str, Any]] = {}
    for r in runs:
        jct = r.jct_s()
        post = r.post_pause()
        ttft_ms = [t.ttft_s * 1e3 for t in post]
        by_turn = {f"{t.program_id}/t{t.turn}": t.ttft_s * 1e3 for t in post}
        speedups = [ms / by_turn[key] for key, ms in r.recompute_ms.items() if by_turn.get(key)]
        systems[r.system] = {
            "mean_jct_s": round(statistics.mean(jct.values()), 3), "jct_s": {p: round(v, 3) for p, v in jct.items()},
            "ttft_after_pause_ms_p50": round(_p50(ttft_ms), 2), "ttft_after_pause_ms_mean": round(statistics.mean(ttft_ms), 2)
            if ttft_ms else None,
            "ttft_first_turn_ms_p50": round(_p50([t.ttft_s * 1e3 for t in r.turns if t.turn == 0]), 2),
            "recompute_ms": {k: round(v, 2) for k, v in r.recompute_ms.items()},
            "recompute_ms_p50": round(_p50(list(r.recompute_ms.values())), 2) if r.recompute_ms else None,
            "sampled_ttft_after_pause_ms_p50": round(_p50([by_turn[k] for k in r.recompute_ms if k in by_turn]), 2)
            if r.recompute_ms else None,
            "speedup_vs_recompute_p50": round(_p50(speedups), 2) if speedups else None,
            "resume_ms": {k: round(v, 2) for k, v in r.resume_ms.items()},
            "resume_ms_p50": round(_p50(list(r.resume_ms.values())), 2) if r.resume_ms else None,
            "isolated_speedup_p50": round(_p50([r.recompute_ms[k] / v for k, v in r.resume_ms.items() if v]), 2)
            if r.resume_ms else None,
            "prefix_hit_rate": round(r.prefix_hit_rate, 4), "prefix_hit_tokens": r.prefix_hit_tokens,
            "context_hit_rate_after_pause": round(r.context_hit_rate(spec.system_len), 4),
            "prefix_query_tokens": r.prefix_query_tokens, "wall_s": round(r.wall_s, 2),
            "load_before_after": [round(x, 2) for x in r.load], **r.extra,
            "turns": [asdict(t) for t in r.turns],
        }
    off, on = runs[0].system, runs[1].system
    peer = next((r.system for r in runs if r.system.startswith("llama.cpp")), None)
    ratios: dict[str, float | None] = {
        "mean_jct off / on": _ratio(systems[off]["mean_jct_s"], systems[on]["mean_jct_s"]),
        "ttft_after_pause p50 off / on": _ratio(systems[off]["ttft_after_pause_ms_p50"],
                                                systems[on]["ttft_after_pause_ms_p50"]),
        "ttft_after_pause recompute / on (p50 per sampled turn)": systems[on]["speedup_vs_recompute_p50"],
        "isolated: recompute / resume, switchyard (p50 per sampled turn)": systems[on]["isolated_speedup_p50"],
    }
    for r in runs[2:]:
        if r.system.startswith("switchyard"):
            ratios[f"mean_jct off / {r.system.removeprefix('switchyard, ')}"] = _ratio(
                systems[off]["mean_jct_s"], systems[r.system]["mean_jct_s"])
    targets = {"mean JCT >= 1.5x better than retention off": _met(ratios["mean_jct off / on"], 1.5),
               "TTFT after a pause >= 5x faster than a recompute (in the trace)": _met(ratios[
                   "ttft_after_pause recompute / on (p50 per sampled turn)"], 5.0),
               "TTFT after a pause >= 5x faster than a recompute (isolated)": _met(ratios[
                   "isolated: recompute / resume, switchyard (p50 per sampled turn)"], 5.0)}
    if peer:
        ratios["mean_jct llama.cpp / on"] = _ratio(systems[peer]["mean_jct_s"], systems[on]["mean_jct_s"])
        ratios["ttft_after_pause p50 llama.cpp / on"] = _ratio(systems[peer]["ttft_after_pause_ms_p50"],
                                                               systems[on]["ttft_after_pause_ms_p50"])
        ratios["ttft_after_pause recompute / llama.cpp (p50 per sampled turn)"] = systems[peer]["speedup_vs_recompute_p50"]
        ratios["isolated: recompute / resume, llama.cpp (p50 per sampled turn)"] = systems[peer]["isolated_speedup_p50"]
        ratios["isolated resume p50 llama.cpp / switchyard"] = _ratio(systems[peer]["resume_ms_p50"] or float("nan"),
                                                                      systems[on]["resume_ms_p50"] or float("nan"))
        targets["mean JCT better than llama-server"] = _met(ratios["mean_jct llama.cpp / on"], 1.0, strict=True)
        targets["TTFT after a pause no slower than llama-server (in the trace)"] = _met(
            ratios["ttft_after_pause p50 llama.cpp / on"], 1.0)
        targets["TTFT after a pause no slower than llama-server (isolated)"] = _met(
            ratios["isolated resume p50 llama.cpp / switchyard"], 1.0)
    contexts = [trace.context_len(p, k) for p in range(len(trace.programs)) for k in range(spec.num_turns)]
    return {
        "benchmark": "agents", "model": opts.model, "threads": opts.threads, "quantization": opts.quantization,
        "quick": opts.quick, "trace": {**asdict(spec), "source": str(opts.trace) if opts.trace else "generated",
                                       "context_len_min": min(contexts), "context_len_max": max(contexts),
                                       "pauses_s": [t.pause_s for p in trace.programs for t in p.turns[1:]],
                                       "arrivals_s": [p.arrival_s for p in trace.programs]},
        "engine": {"max_model_len": opts.max_model_len, "block_size": BLOCK_SIZE, "kv_fit": opts.kv_fit,
                   "num_kv_blocks": kv_blocks_for(trace, opts.kv_fit, opts.max_model_len), "kv_retain_s": opts.kv_retain_s,
                   "kv_retain_max_share": opts.kv_retain_max_share, "kv_offload_gb": opts.kv_offload_gb,
                   "max_num_seqs": opts.max_num_seqs or len(trace.programs),
                   "working_set_tokens": sum(trace.final_len(i) for i in range(len(trace.programs)))
                   - (len(trace.programs) - 1) * (spec.system_len // BLOCK_SIZE * BLOCK_SIZE)},
        "recompute_sample": [f"p{p}/t{k}" for p, k in recompute_sample(trace, opts.recompute_samples)],
        "systems": systems, "ratios": ratios, "targets": targets, "notes": notes,
    }


def _met(value: float | None, target: float, strict: bool = False) -> str:
    if value is None:
        return "not measured"
    ok = value > target if strict else value >= target
    return f"{'met' if ok else 'NOT met'} ({value:.2f}x)"


def _print(rep: dict[str, Any], opts: argparse.Namespace) -> None:
    t, e = rep["trace"], rep["engine"]
    print(f"switchyard bench agents — {rep['model']} ({rep['quantization']}), {rep['threads']} threads; trace "
          f"{t['source']} (seed {t['seed']}): {t['num_programs']} programs x {t['num_turns']} turns, shared system "
          f"prompt {t['system_len']} tokens, user {t['user_len'][0]}–{t['user_len'][1]}, tool results "
          f"{t['tool_len'][0]}–{t['tool_len'][1]} tokens, {t['output_len']} output tokens per turn (greedy, EOS "
          f"ignored), pauses Exp(mean {t['pause_mean_s']} s), arrivals Exp(gap {t['arrival_gap_s']} s); contexts "
          f"{t['context_len_min']}–{t['context_len_max']} tokens")
    print(f"switchyard KV pool: {e['num_kv_blocks']} blocks x {e['block_size']} = {e['num_kv_blocks'] * e['block_size']} "
          f"tokens (system prompt + {e['kv_fit']:.0%} of the private working set; all programs' last contexts "
          f"need {e['working_set_tokens']}); retention on = kv_retain_s {e['kv_retain_s']}, max share "
          f"{e['kv_retain_max_share']}, program scheduling, host KV tier kv_offload_gb {e['kv_offload_gb']}; "
          f"max_num_seqs {e['max_num_seqs']} (both)")
    widths = (34, 8, 10, 11, 11, 11, 11, 12, 8, 9, 7, 12)
    heads = (("", "system"), ("mean", "JCT s"), ("TTFT p50", "pause ms"), ("TTFT p50", "sample ms"),
             ("recompute", "/TTFT (2)"), ("isolated", "recomp ms"), ("isolated", "resume ms"),
             ("recompute", "/resume (3)"), ("prefix", "hits"), ("context", "hits (1)"), ("wall", "s"),
             ("load", "1-min"))
    for line in (0, 1):
        print(("\n" if line == 0 else "") + "".join(
            f"{h[line]:{'<' if i == 0 else '>'}{w}s}" for i, (h, w) in enumerate(zip(heads, widths, strict=True))))

    def cell(value: float | None, fmt: str, width: int) -> str:
        return f"{(format(value, fmt) if value is not None else '-'):>{width}s}"

    for name, s in rep["systems"].items():
        cells = [f"{name:34s}", cell(s["mean_jct_s"], ".1f", 8), cell(s["ttft_after_pause_ms_p50"], ".0f", 10),
                 cell(s["sampled_ttft_after_pause_ms_p50"], ".0f", 11), cell(s["speedup_vs_recompute_p50"], ".2f", 11),
                 cell(s["recompute_ms_p50"], ".0f", 11), cell(s["resume_ms_p50"], ".0f", 11),
                 cell(s["isolated_speedup_p50"], ".2f", 12), f"{s['prefix_hit_rate']:8.1%}",
                 f"{s['context_hit_rate_after_pause']:9.1%}", cell(s["wall_s"], ".0f", 7),
                 f"{'{:.1f} → {:.1f}'.format(*s['load_before_after']):>12s}"]
        print("".join(cells))
    for name, s in rep["systems"].items():
        if "preemptions" in s:
            print(f"{name}: {s['prefix_hit_tokens']} of {s['prefix_query_tokens']} prompt tokens hit, "
                  f"{s['retained_hit_tokens']} of them in retained blocks, {s['offload_hit_tokens']} loaded from the "
                  f"host tier; {s['retained_evicted_blocks']} pinned blocks dropped for memory, "
                  f"{s['offload_saved_blocks']} blocks copied to the host tier; {s['preemptions']} preemptions")
        elif "slots" in s:
            print(f"{name}: timings.cache_n {s['prefix_hit_tokens']} of {s['prefix_query_tokens']} prompt tokens")
    print(f"(1) post-pause turns: share of their prompt beyond the {t['system_len']}-token system prompt found cached")
    print("(2) the sampled post-pause turns (spread over the context lengths): their TTFT in the trace, and the p50 "
          "over them of\n    (isolated recompute of the same context / that TTFT)")
    print("(3) the same contexts on the idle system, one at a time: recompute (nothing cached) / resume (the previous "
          "turn + answer cached)")
    print()
    for name, value in rep["ratios"].items():
        print(f"ratio {name:60s}{(f'{value:.2f}x' if value is not None else '-'):>10s}")
    print()
    for name, verdict in rep["targets"].items():
        print(f"target {name:59s} {verdict}")
    for note in rep["notes"]:
        print(f"\nnote: {note}")
    if opts.json:
        print(json.dumps(rep))


def main(args: argparse.Namespace) -> int:
    opts = parse_args(list(getattr(args, "bench_args", None) or []))
    rep = run(opts)
    _print(rep, opts)
    return 0
