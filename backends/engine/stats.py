"""What the engine reports about itself, as plain numbers (vLLM v1's SchedulerStats / IterationStats).

After every step that ran a batch, ``LLMEngine`` hands each registered ``StatLogger`` one
``SchedulerStats`` (state now) and one ``IterationStats`` (what happened in that step). The engine never
imports a metrics library: whoever registers a logger (``backends/local.py`` → the gateway's Prometheus
registry) turns these numbers into metrics. Loggers run on the engine's thread, between steps: they must
be quick and must not raise.

All times are seconds of the engine's clock (``time.monotonic()`` unless a test injects one); latencies are
per choice (one sequence). A step that ran nothing but let retained KV blocks expire reports too (an empty
IterationStats), so a pinned-blocks gauge follows expiry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SchedulerStats:
    """The engine's state after a step. ``prefix_cache_*`` count prompt tokens looked up / found in the
    prefix cache during this step (deltas, as vLLM's counters); ``num_preemptions`` likewise.

    KV retention across tool pauses: ``num_retained_blocks`` = blocks pinned for paused sessions now;
    ``retained_hits`` = prompt tokens of sessions' next requests found in the blocks they retained (delta);
    ``num_retained_evicted_blocks`` = pinned blocks let go early because memory was short (delta).
    Host KV tier (``kv_offload_gb``): ``num_offload_blocks`` = blocks held there now; ``offload_saved_blocks`` =
    blocks copied there from the pool (delta); ``offload_hits`` = prompt tokens of admitted requests found in
    blocks loaded back from it (delta; also counted in ``prefix_cache_hits``)."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_kv_blocks: int
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_retained_blocks: int = 0
    retained_hits: int = 0
    num_retained_evicted_blocks: int = 0
    num_offload_blocks: int = 0
    offload_saved_blocks: int = 0
    offload_hits: int = 0


@dataclass(frozen=True)
class FinishedRequestStats:
    """One choice that finished ("stop" or "length") in this step."""

    finish_reason: str
    e2e_latency_s: float  # arrival → last token
    queue_time_s: float  # arrival → first scheduled
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class IterationStats:
    """What one step produced: token counts, the first-token and inter-token latencies it observed, the
    choices it finished, and (speculation) the draft tokens it verified and accepted."""

    num_prompt_tokens: int = 0  # prompts of requests whose first choice got its first token in this step
    num_generation_tokens: int = 0
    time_to_first_tokens_s: list[float] = field(default_factory=list)
    inter_token_latencies_s: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
    num_drafts: int = 0  # speculation: sequences that verified drafts in this step (one draft each)
    num_draft_tokens: int = 0  # speculation: draft tokens verified in this step
    num_accepted_tokens: int = 0  # of those, accepted
    num_shared_draft_tokens: int = 0  # of num_draft_tokens / num_accepted_tokens, those from the shared draft
    num_shared_accepted_tokens: int = 0  # table (the rest came from the sequence's own prompt and output)


class StatLogger(Protocol):
    """Receives the numbers of every step that ran (on the engine thread; quick, never raises)."""

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None: ...
