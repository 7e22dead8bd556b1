"""LLMEngine: the synchronous engine loop — schedule → run → postprocess.

Usage::

    from backends.engine.args import EngineArgs
    from backends.engine.llm_engine import LLMEngine
    from backends.engine.sampling_params import SamplingParams, SamplingParamsError

    engine = LLMEngine("/path/to/hf-folder", EngineArgs(max_num_seqs=32))
    results = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=16))
    results[0].token_ids, results[0].text

    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8))   # or step by step
    while engine.has_unfinished_requests():
        for out in engine.step():          # RequestOutput deltas of this step
            ...
    engine.stats()                         # EngineStats: running/waiting, KV usage, prefix hit rate, totals

``stat_loggers`` receive SchedulerStats / IterationStats after every step that ran a batch or released
retained KV blocks (backends/engine/stats.py). Agent sessions: ``add_request(..., session_id=...,
program_id=...)`` — with ``EngineArgs.kv_retain_s`` a finished session's KV stays pinned for its next turn
(block_manager.py), with ``program_scheduling`` a continuing program is admitted first (scheduler.py).
``clock`` (default ``time.monotonic``) is the engine's only time source: arrival and latency times,
retention expiry and program waits; tests pass a controllable one. The model is a local HF folder; bundled names are resolved outside the
engine (``backends.models.resolve_model_path``).

Speculative decoding (``EngineArgs.speculation``, ``speculation.py``): a decoding sequence may be
scheduled with drafts; the step then commits its accepted drafts and one more token, each through
``_postprocess`` (stop conditions, logprobs, grammar), and gives back the blocks that held only rejected drafts.
With ``shared_context``, a finished sequence's output feeds the draft table of its request's ``namespace``
(``add_request(..., namespace=)``), from which later requests of that namespace draft.

Not thread-safe: one thread drives it (AsyncEngine does so for asyncio callers).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backends.engine.args import EngineArgs
from backends.engine.block_manager import BlockManager
from backends.engine.config import EngineConfig
from backends.engine.detokenizer import Detokenizer
from backends.engine.host_cache import HostKVCache
from backends.engine.model_runner import ModelRunner
from backends.engine.sampling_params import SamplingParams, SamplingParamsError
from backends.engine.scheduler import Scheduler
from backends.engine.sequence import Sequence, SequenceStatus, TokenLogprobs
from backends.engine.speculation import NgramProposer
from backends.engine.stats import FinishedRequestStats, IterationStats, SchedulerStats, StatLogger
from backends.engine.structured_output import GrammarCompiler, StructuredOutput


class ContextLengthError(ValueError):
    """The prompt leaves no room for a single output token within max_model_len."""


@dataclass
class RequestOutput:
    """What one choice produced in one step (deltas), plus its running totals."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs]
    finish_reason: str | None


@dataclass
class RequestResult:
    """Everything ``generate`` produced for one prompt; ``token_ids``/``text`` are choice 0's."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text


@dataclass
class EngineStats:
    """A snapshot of the engine's counters (totals since start)."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_used_blocks: int
    kv_usage: float
    prefix_hit_rate: float
    num_preemptions: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_requests_finished: int = 0
    num_retained_blocks: int = 0  # blocks pinned now for paused sessions
    num_retained_sessions: int = 0
    num_retained_hits_total: int = 0  # prompt tokens of a session's next request found in its retained blocks
    num_retained_evicted_blocks_total: int = 0  # pinned blocks let go early because memory was short
    num_offload_blocks: int = 0  # KV blocks held in the host tier now (kv_offload_gb)
    num_offload_saved_blocks_total: int = 0  # blocks copied to the host tier when LRU evicted them from the pool
    num_offload_hits_total: int = 0  # prompt tokens of admitted requests found in blocks loaded from the host tier
    num_draft_tokens_total: int = 0  # speculation: draft tokens proposed and verified
    num_accepted_tokens_total: int = 0  # of those, accepted (committed as the target model's own tokens)
    num_shared_draft_tokens_total: int = 0  # of the drafted / accepted ones, those from the shared draft table
    num_shared_accepted_tokens_total: int = 0
    extra: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(self, model: str | Path, args: EngineArgs | EngineConfig | None = None, *,
                 device: str | torch.device | None = None, tokenizer=None,
                 stat_loggers: SequenceOf[StatLogger] = (), clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(args, EngineConfig):
            self.config = args
        else:
            self.config = EngineConfig.from_args(model, args, device)
        cfg, a = self.config, self.config.args
        self.clock = clock
        self.model_runner = ModelRunner(cfg)
        host_cache = None
        if a.kv_offload_gb > 0 and a.enable_prefix_caching:
            kv = self.model_runner.kv_cache
            host_cache = HostKVCache(kv, max(1, HostKVCache.num_blocks_for(kv, a.kv_offload_gb)))
        self.block_manager = BlockManager(self.model_runner.num_blocks, a.block_size, a.enable_prefix_caching,
                                          retain_s=a.kv_retain_s, retain_max_share=a.kv_retain_max_share,
                                          clock=clock, host_cache=host_cache)
        self.proposer = NgramProposer.from_config(a.speculation)
        self.scheduler = Scheduler(self.block_manager, a.max_num_seqs, a.max_num_batched_tokens,
                                   program_scheduling=a.program_scheduling, program_window_s=a.kv_retain_s,
                                   program_max_wait_s=a.program_max_wait_s, clock=clock, proposer=self.proposer,
                                   max_model_len=cfg.max_model_len)
        self.stat_loggers = list(stat_loggers)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(cfg.model_path))
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer)
        self.eos_token_ids = self._eos_ids()
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.requests: dict[str, list[Sequence]] = {}
        self._num_prompt_tokens_total = 0
        self._num_generation_tokens_total = 0
        self._num_finished = 0
        self.last_step_num_tokens = 0
        self._num_prefix_queries_logged = 0
        self._num_prefix_hits_logged = 0
        self._num_preemptions_logged = 0
        self._num_retained_hits_logged = 0
        self._num_retained_evicted_logged = 0
        self._num_offload_saved_logged = 0
        self._num_offload_hits_logged = 0
        self._num_draft_tokens_total = 0  # speculation: draft tokens verified / accepted since start
        self._num_accepted_tokens_total = 0
        self._num_shared_draft_tokens_total = 0
        self._num_shared_accepted_tokens_total = 0
        self._grammar_compiler: GrammarCompiler | None = None

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        candidates = [getattr(self.config.hf_config, "eos_token_id", None)]
        gen_path = self.config.model_path / "generation_config.json"
        if gen_path.is_file():
            import json

            candidates.append(json.loads(gen_path.read_text()).get("eos_token_id"))
        candidates.append(getattr(self.tokenizer, "eos_token_id", None))
        for c in candidates:
            if isinstance(c, int):
                ids.add(c)
            elif isinstance(c, list):
                ids.update(int(x) for x in c)
        return ids

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    # ------------------------------------------------------------------ grammars
    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The engine's grammar compiler and cache (built on first use: it reads the whole vocabulary)."""
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.config.hf_config.vocab_size,
                                                     sorted(self.eos_token_ids))
        return self._grammar_compiler

    def compile_grammar(self, spec: StructuredOutput):
        """Compile (or fetch from the cache) ``spec``; raises GrammarError (a ValueError) when it cannot be.
        Callers on an event loop run this in a worker thread before ``add_request``, which then hits the cache."""
        return self.grammar_compiler.compile(spec)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0, session_id: str | None = None, program_id: str | None = None,
                    namespace: str | None = None) -> str:
        """Queue a request (``params.n`` choices). Raises ContextLengthError / ValueError on bad input.

        ``session_id``: the agent session the request belongs to (its KV is retained after it finishes when
        ``kv_retain_s`` > 0; its next request releases and reuses it). ``program_id``: the job it belongs to
        (program-aware scheduling); None = none, the engine does not default it to the session. ``namespace``:
        the tenant whose requests share speculative drafts (``SpeculationConfig.shared_context``); None = none."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
        if len(prompt) >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {len(prompt)} tokens; the model's context is {self.max_model_len} tokens "
                f"(prompt plus at least 1 output token)"
            )
        vocab = self.config.hf_config.vocab_size
        if max(prompt) >= vocab or min(prompt) < 0:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            raise SamplingParamsError("logit_bias", f"logit_bias token ids must be in [0, {vocab}); "
                                                    f"got {params.logit_bias[-1][0]}")
        compiled = self.compile_grammar(params.structured) if params.structured is not None else None
        arrival = next(self._arrivals)
        now = self.clock()
        seqs: list[Sequence] = []
        for index in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids), request_id=request_id, prompt_token_ids=prompt, params=params,
                index=index, priority=priority, arrival=arrival, parent=seqs[0] if seqs else None,
                session_id=session_id, program_id=program_id, namespace=namespace, arrival_time=now,
            )
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.config.device).manual_seed(params.seed + index)
            if compiled is not None:
                seq.grammar = self.grammar_compiler.matcher(compiled)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self._num_prompt_tokens_total += len(prompt)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Finish every choice of the request with "abort" and free its blocks now. False if unknown."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the deltas of every choice that produced tokens or finished."""
        num_retained = self.block_manager.num_retained_blocks
        batch = self.scheduler.schedule()
        self.last_step_num_tokens = batch.num_tokens
        if batch.is_empty:
            if self.stat_loggers and self.block_manager.num_retained_blocks != num_retained:
                self._log_stats(IterationStats())  # retention expired while idle: the gauge follows
            return []
        scheduled_at = self.clock()
        for item in batch.scheduled:
            if not item.seq.first_scheduled_time:
                item.seq.first_scheduled_time = scheduled_at
        started = time.perf_counter()
        committed = self.model_runner.run(batch)
        if self.proposer is not None:
            self.proposer.observe(batch, time.perf_counter() - started)
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens - len(item.draft_token_ids)
            self.block_manager.commit(item.seq)
        outputs = []
        iteration = IterationStats() if self.stat_loggers else None
        for item, result in committed:
            seq, out = item.seq, None
            for i, token_id in enumerate(result.token_ids):
                if i > 0:  # the token before this one was an accepted draft: its KV (computed this step) is valid
                    seq.num_computed_tokens += 1
                    self.block_manager.commit(seq)
                lp = None
                if result.logprobs[i] is not None:
                    lp = TokenLogprobs(token_id, result.logprobs[i], result.top_logprobs[i] or [])
                delta = self._postprocess(seq, token_id, lp, iteration)
                self._num_generation_tokens_total += 1
                out = delta if out is None else _merge(out, delta)
                if delta.finished:
                    break  # the rest of the accepted drafts are discarded
            if item.draft_token_ids:
                self._speculated(item, len(result.token_ids) - 1, iteration)
            outputs.append(out)
        if iteration is not None:
            self._log_stats(iteration)
        return outputs

    def _speculated(self, item, num_accepted: int, iteration: IterationStats | None) -> None:
        """Bookkeeping after a verification: counters, the proposer's acceptance estimates, and the blocks that held
        only rejected drafts (a finished sequence has already freed all of its blocks)."""
        num_drafts = len(item.draft_token_ids)
        self._num_draft_tokens_total += num_drafts
        self._num_accepted_tokens_total += num_accepted
        if iteration is not None:
            iteration.num_drafts += 1
            iteration.num_draft_tokens += num_drafts
            iteration.num_accepted_tokens += num_accepted
        if item.seq.draft_state.is_shared:
            self._num_shared_draft_tokens_total += num_drafts
            self._num_shared_accepted_tokens_total += num_accepted
            if iteration is not None:
                iteration.num_shared_draft_tokens += num_drafts
                iteration.num_shared_accepted_tokens += num_accepted
        self.proposer.update(item.seq, num_drafts, num_accepted)
        if not item.seq.is_finished:
            self.block_manager.trim(item.seq)

    def _log_stats(self, iteration: IterationStats) -> None:
        bm = self.block_manager
        host = bm.host_cache
        stats = SchedulerStats(
            num_running_reqs=len(self.scheduler.running), num_waiting_reqs=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage, num_kv_blocks=bm.num_blocks,
            prefix_cache_queries=bm.num_prefix_queries - self._num_prefix_queries_logged,
            prefix_cache_hits=bm.num_prefix_hits - self._num_prefix_hits_logged,
            num_preemptions=self.scheduler.num_preemptions - self._num_preemptions_logged,
            num_retained_blocks=bm.num_retained_blocks,
            retained_hits=bm.num_retained_hits - self._num_retained_hits_logged,
            num_retained_evicted_blocks=bm.num_retained_evicted_blocks - self._num_retained_evicted_logged,
            num_offload_blocks=host.num_used_blocks if host else 0,
            offload_saved_blocks=(host.num_saved_blocks if host else 0) - self._num_offload_saved_logged,
            offload_hits=bm.num_host_hits - self._num_offload_hits_logged,
        )
        self._num_offload_saved_logged = host.num_saved_blocks if host else 0
        self._num_offload_hits_logged = bm.num_host_hits
        self._num_retained_hits_logged = bm.num_retained_hits
        self._num_retained_evicted_logged = bm.num_retained_evicted_blocks
        self._num_prefix_queries_logged = bm.num_prefix_queries
        self._num_prefix_hits_logged = bm.num_prefix_hits
        self._num_preemptions_logged = self.scheduler.num_preemptions
        for logger in self.stat_loggers:
            logger.record(stats, iteration)

    def _postprocess(self, seq: Sequence, token_id: int, logprob: TokenLogprobs | None,
                     iteration: IterationStats | None) -> RequestOutput:
        seq.token_ids.append(token_id)
        now = self.clock()
        if iteration is not None:
            iteration.num_generation_tokens += 1
            if seq.num_output_tokens == 1:
                if seq.index == 0:
                    iteration.num_prompt_tokens += seq.num_prompt_tokens
                iteration.time_to_first_tokens_s.append(now - seq.arrival_time)
            else:
                iteration.inter_token_latencies_s.append(now - seq.last_token_time)
        seq.last_token_time = now
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        params = seq.params
        reason = None
        is_stop_token = token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
        refused = (seq.grammar is not None and not seq.grammar.is_terminated()
                   and not seq.grammar.accept_token(token_id))  # unreachable while the mask is applied
        if is_stop_token or refused:
            reason = "abort" if refused else "stop"  # never emit text the grammar refused, never claim it done
            self.detokenizer.append(seq, seq.output_token_ids[:-1], flush=True)
        else:
            before = len(seq.output_text)
            self.detokenizer.append(seq, seq.output_token_ids)
            if self.detokenizer.find_stop(seq, len(seq.output_text) - before):
                reason = "stop"
        if reason is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
            self.detokenizer.append(seq, seq.output_token_ids, flush=True)
            if self.detokenizer.find_stop(seq, len(seq.output_text)):
                reason = "stop"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._num_finished += 1
            if self.proposer is not None:
                self.proposer.record(seq)
            if iteration is not None:
                iteration.finished_requests.append(FinishedRequestStats(
                    finish_reason=reason, e2e_latency_s=now - seq.arrival_time,
                    queue_time_s=max(0.0, seq.first_scheduled_time - seq.arrival_time),
                    num_prompt_tokens=seq.num_prompt_tokens, num_generation_tokens=seq.num_output_tokens))
            siblings = self.requests.get(seq.request_id, [])
            if all(s.is_finished for s in siblings):
                self.requests.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id, index=seq.index, new_token_ids=[token_id],
            new_text=self.detokenizer.emittable(seq), new_logprobs=[logprob] if logprob else [],
            finished=reason is not None, finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens, num_output_tokens=seq.num_output_tokens,
        )

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestResult]:
        """Run prompts to completion (batched); results in prompt order."""
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, param_list, strict=True)]
        seqs = {rid: list(self.requests[rid]) for rid in ids}
        texts: dict[tuple[str, int], str] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                texts[(out.request_id, out.index)] = texts.get((out.request_id, out.index), "") + out.new_text
        results = []
        for rid, prompt in zip(ids, prompts, strict=True):
            outs = [
                CompletionOutput(s.index, s.output_token_ids, texts.get((rid, s.index), ""), s.output_logprobs,
                                 s.finish_reason)
                for s in seqs[rid]
            ]
            results.append(RequestResult(rid, list(prompt), outs, seqs[rid][0].num_cached_tokens))
        return results

    def stats(self) -> EngineStats:
        bm = self.block_manager
        host = bm.host_cache
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=bm.num_blocks, num_used_blocks=bm.num_used_blocks, kv_usage=bm.usage,
            prefix_hit_rate=bm.prefix_hit_rate, num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens_total=self._num_prompt_tokens_total,
            num_generation_tokens_total=self._num_generation_tokens_total,
            num_requests_finished=self._num_finished, num_retained_blocks=bm.num_retained_blocks,
            num_retained_sessions=len(bm.retentions), num_retained_hits_total=bm.num_retained_hits,
            num_retained_evicted_blocks_total=bm.num_retained_evicted_blocks,
            num_offload_blocks=host.num_used_blocks if host else 0,
            num_offload_saved_blocks_total=host.num_saved_blocks if host else 0,
            num_offload_hits_total=bm.num_host_hits,
            num_draft_tokens_total=self._num_draft_tokens_total,
            num_accepted_tokens_total=self._num_accepted_tokens_total,
            num_shared_draft_tokens_total=self._num_shared_draft_tokens_total,
            num_shared_accepted_tokens_total=self._num_shared_accepted_tokens_total,
        )


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One choice's deltas of one step (speculation commits several tokens): ``a`` then ``b``."""
    return RequestOutput(
        request_id=a.request_id, index=a.index, new_token_ids=a.new_token_ids + b.new_token_ids,
        new_text=a.new_text + b.new_text, new_logprobs=a.new_logprobs + b.new_logprobs, finished=b.finished,
        finish_reason=b.finish_reason, num_prompt_tokens=b.num_prompt_tokens, num_cached_tokens=b.num_cached_tokens,
        num_output_tokens=b.num_output_tokens,
    )


__all__ = ["LLMEngine", "RequestOutput", "RequestResult", "CompletionOutput", "EngineStats", "ContextLengthError",
           "SequenceStatus"]
