"""Per-request sampling parameters for the engine (token level; stop strings are matched on text)."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import SamplingOptions


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop. ``temperature == 0`` means greedy (argmax).

    ``logprobs``: None = off; k >= 0 = return the sampled token's logprob plus the top-k alternatives.
    ``n`` choices share the prompt's KV blocks.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    ignore_eos: bool = False
    n: int = 1

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs (top alternatives) must be in [0, 20], got {self.logprobs}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @classmethod
    def from_options(cls, options: SamplingOptions, n: int = 1) -> SamplingParams:
        return cls(
            temperature=options.temperature, top_p=options.top_p, top_k=options.top_k, min_p=options.min_p,
            max_tokens=options.max_tokens, stop=tuple(options.stop), stop_token_ids=tuple(options.stop_token_ids),
            seed=options.seed, presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty, repetition_penalty=options.repetition_penalty,
            logprobs=(options.top_logprobs if options.logprobs else None), ignore_eos=options.ignore_eos, n=n,
        )
