"""LLMEngine: the synchronous engine loop — schedule → run → postprocess.

Usage::

    from backends.engine.llm_engine import LLMEngine
    from backends.engine.sampling_params import SamplingParams
    from gateway.settings import EngineOptions

    engine = LLMEngine("smollm2-135m", EngineOptions(max_num_seqs=32))   # name or HF folder
    results = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=16))
    results[0].token_ids, results[0].text

    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8))   # or step by step
    while engine.has_unfinished_requests():
        for out in engine.step():          # RequestOutput deltas of this step
            ...
    engine.stats()                         # EngineStats: running/waiting, KV usage, prefix hit rate, tok/s

Not thread-safe: one thread drives it (AsyncEngine does so for asyncio callers).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backends.engine.block_manager import BlockManager
from backends.engine.config import EngineConfig
from backends.engine.detokenizer import Detokenizer
from backends.engine.loader import resolve_model_path
from backends.engine.model_runner import ModelRunner
from backends.engine.sampling_params import SamplingParams
from backends.engine.scheduler import Scheduler
from backends.engine.sequence import Sequence, SequenceStatus, TokenLogprobs
from gateway.settings import EngineOptions


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
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_used_blocks: int
    kv_usage: float
    prefix_hit_rate: float
    num_preemptions: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    generation_tokens_per_s: float  # over the last ~10 s
    num_requests_finished: int = 0
    ttft_ms_p50: float = 0.0  # time to first token, over the last 256 sequences
    itl_ms_p50: float = 0.0  # inter-token latency, over the last 4096 tokens
    extra: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(self, model: str | Path, config: EngineOptions | EngineConfig | None = None, *,
                 device: str | torch.device | None = None, tokenizer=None) -> None:
        if isinstance(config, EngineConfig):
            self.config = config
        else:
            self.config = EngineConfig.from_options(resolve_model_path(model), config, device)
        cfg = self.config
        self.model_runner = ModelRunner(cfg)
        self.block_manager = BlockManager(self.model_runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
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
        self._recent: deque[tuple[float, int]] = deque()
        self.last_step_num_tokens = 0
        self._ttft: deque[float] = deque(maxlen=256)
        self._itl: deque[float] = deque(maxlen=4096)

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

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0) -> str:
        """Queue a request (``params.n`` choices). Raises ContextLengthError / ValueError on bad input."""
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
        arrival = next(self._arrivals)
        now = time.monotonic()
        seqs: list[Sequence] = []
        for index in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids), request_id=request_id, prompt_token_ids=prompt, params=params,
                index=index, priority=priority, arrival=arrival, parent=seqs[0] if seqs else None,
                arrival_time=now,
            )
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.config.device).manual_seed(params.seed + index)
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
        batch = self.scheduler.schedule()
        self.last_step_num_tokens = batch.num_tokens
        if batch.is_empty:
            return []
        sampled, result = self.model_runner.run(batch)
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(item.seq)
        outputs = []
        if result is None:
            return outputs
        now = time.monotonic()
        self._recent.append((now, len(sampled)))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()
        self._num_generation_tokens_total += len(sampled)
        for i, item in enumerate(sampled):
            lp = None
            if result.logprobs[i] is not None:
                lp = TokenLogprobs(result.token_ids[i], result.logprobs[i], result.top_logprobs[i] or [])
            outputs.append(self._postprocess(item.seq, result.token_ids[i], lp))
        return outputs

    def _postprocess(self, seq: Sequence, token_id: int, logprob: TokenLogprobs | None) -> RequestOutput:
        seq.token_ids.append(token_id)
        now = time.monotonic()
        if seq.num_output_tokens == 1:
            self._ttft.append(now - seq.arrival_time)
        else:
            self._itl.append(now - seq.last_token_time)
        seq.last_token_time = now
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        params = seq.params
        reason = None
        is_stop_token = token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
        if is_stop_token:
            reason = "stop"
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
        window = [n for t, n in self._recent]
        span = (self._recent[-1][0] - self._recent[0][0]) if len(self._recent) > 1 else 0.0
        tps = (sum(window) - window[0]) / span if span > 0 else 0.0
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=bm.num_blocks, num_used_blocks=bm.num_used_blocks, kv_usage=bm.usage,
            prefix_hit_rate=bm.prefix_hit_rate, num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens_total=self._num_prompt_tokens_total,
            num_generation_tokens_total=self._num_generation_tokens_total,
            generation_tokens_per_s=tps, num_requests_finished=self._num_finished,
            ttft_ms_p50=_median_ms(self._ttft), itl_ms_p50=_median_ms(self._itl),
        )


def _median_ms(values: deque[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[len(ordered) // 2] * 1000


__all__ = ["LLMEngine", "RequestOutput", "RequestResult", "CompletionOutput", "EngineStats", "ContextLengthError",
           "SequenceStatus"]
