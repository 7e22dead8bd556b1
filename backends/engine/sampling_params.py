"""SamplingParams: the one description of how to sample a request and when to stop (vLLM's SamplingParams).

Built once per request — by the wire request's ``to_sampling_params()`` in the gateway, or directly by
engine callers — validated in ``__post_init__``, then read-only. The same object travels inside
``backends.types.GenerationRequest`` to a local engine (passed as is) or a remote pool (serialised).
Stop strings are matched on the detokenized text; stop token ids on the sampled ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.engine.structured_output import StructuredOutput


class SamplingParamsError(ValueError):
    """An invalid sampling value; ``param`` names the field (the OpenAI error's ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop. ``temperature == 0`` means greedy (argmax).

    ``logprobs``: None = off; k >= 0 = return the sampled token's logprob plus the top-k alternatives
    (chat ``logprobs: true, top_logprobs: k``; completions ``logprobs: k``).
    ``n`` choices share the prompt's KV blocks. ``structured`` constrains every choice to a grammar
    (JSON Schema, any JSON object, or a structural tag for tool calls). ``top_k`` -1 = off.
    ``logit_bias``: (token id, bias) pairs sorted by token id, each bias in [-100, 100] (OpenAI's range), added
    to that token's logit after the grammar mask and before penalties and temperature; the engine refuses ids
    outside its vocabulary when the request is added. Construction raises ``SamplingParamsError`` (a ValueError
    naming the field) for values no backend can honour.
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
    structured: StructuredOutput | None = None  # a grammar the output must follow (structured_output.py)
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise SamplingParamsError("n", f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise SamplingParamsError("top_k", f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.repetition_penalty <= 0:
            raise SamplingParamsError("repetition_penalty",
                                      f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise SamplingParamsError("presence_penalty",
                                      f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise SamplingParamsError("frequency_penalty",
                                      f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise SamplingParamsError("logprobs",
                                      f"logprobs (top alternatives) must be in [0, 20], got {self.logprobs}")
        if self.stop and any(not s for s in self.stop):
            raise SamplingParamsError("stop", "stop strings must be non-empty")
        if self.stop_token_ids and any(t < 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", "stop_token_ids must be >= 0")
        if self.logit_bias:
            ids = [t for t, _ in self.logit_bias]
            if any(t < 0 for t in ids):
                raise SamplingParamsError("logit_bias", "logit_bias token ids must be >= 0")
            if ids != sorted(set(ids)):
                raise SamplingParamsError("logit_bias", "logit_bias must list each token id once, sorted")
            if any(not -100 <= b <= 100 for _, b in self.logit_bias):
                raise SamplingParamsError("logit_bias", "logit_bias values must be in [-100, 100]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
