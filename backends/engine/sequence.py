"""One sequence in the engine: its tokens, how many have KV in the cache, and its block table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprobs:
    """The sampled token's logprob and the best alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Sequence:
    """``token_ids`` = prompt + generated; ``num_computed_tokens`` of them have KV in ``block_table``.

    ``seq_id`` is the engine's int id; ``request_id`` the caller's str id (shared by the ``n`` choices,
    told apart by ``index``). ``parent`` is set for choices 1..n-1: they share the parent's prompt blocks.
    ``session_id`` (an agent session: its KV is retained across tool pauses) and ``program_id`` (a job of
    one or more sessions: program-aware scheduling) are None for a lone request. ``namespace`` (the tenant)
    scopes the speculative drafts shared between requests; None = shares none.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0
    priority: int = 0
    arrival: int = 0
    parent: Sequence | None = None
    session_id: str | None = None
    program_id: str | None = None
    namespace: str | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first scheduling)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    grammar: Any = None  # xgrammar GrammarMatcher when params.structured is set; advanced on each committed token
    draft_state: Any = None  # speculation.DraftState once an n-gram proposer has looked at it
    arrival_time: float = 0.0  # the engine's clock (time.monotonic by default) when added
    first_scheduled_time: float = 0.0  # the engine's clock at the first step that scheduled it; 0 = not yet
    last_token_time: float = 0.0
    # incremental detokenization state (owned by the engine's detokenizer)
    output_text: str = ""
    num_emitted_chars: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then arrival (FCFS)."""
        return (self.priority, self.arrival)
