"""The Backend protocol: where tokens come from.

A Backend turns one ``GenerationRequest`` into an async stream of ``Delta``s. The embedded engine
(``backends/local.py``) and any OpenAI-compatible server (``backends/openai_upstream.py``) implement it;
``backends/pool.py`` balances requests over replicas of them.

Contract of ``generate``:
  * yields zero or more Deltas per choice index; the last Delta of each choice has ``finish_reason`` set
    (``"stop"`` | ``"length"`` | ``"tool_calls"`` | ``"content_filter"`` | ``"abort"``) and exactly once;
  * the final Delta of the request (``is_final=True``) carries ``usage``;
  * raises ``BackendError`` *before the first Delta* for failures another replica may retry
    (``retryable=True``: connect error, 5xx, timeout) or that the caller must see (``retryable=False``:
    a 4xx such as context too long); after a Delta was yielded it raises ``BackendError`` with
    ``after_first_token=True`` — the caller ends the stream with an error event, never silently;
  * cancellation (``aclose()`` / task cancel, e.g. client disconnect) aborts the request and frees its
    resources at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import orjson

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "abort"]


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the wire encoding of the gateway and its upstream clients (orjson: ~5x the
    stdlib's speed on response chunks; non-finite floats become ``null``, where the stdlib would write
    ``NaN``, which is not JSON). What orjson refuses (integers beyond 64 bits) goes through the stdlib,
    ASCII-escaped so lone surrogates survive too."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling knobs shared by every backend. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    min_p: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    """One request to one backend. Exactly one of ``messages`` (chat) or ``prompt`` (completion) is set."""

    request_id: str
    model: str  # the model id the backend serves (remote: upstream model name)
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    n: int = 1
    # OpenAI fields passed through to backends that support them (remote); local rejects tools.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    deadline: float | None = None  # time.monotonic() by which the request must finish
    priority: int = 0  # lower runs first (engine scheduler)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of messages or prompt")


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    token_id: int | None = None
    top_logprobs: tuple[tuple[str, float], ...] = ()  # (token text, logprob), best first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """A piece of one choice's output. ``text`` may be empty (e.g. a final Delta with only finish_reason)."""

    index: int = 0
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    tool_calls: list[dict[str, Any]] | None = None  # remote passthrough (OpenAI delta.tool_calls)
    is_final: bool = False  # last Delta of the whole request
    usage: Usage | None = None  # set on the final Delta


class BackendError(Exception):
    """A backend failure. ``retryable`` tells the pool whether another replica may try."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status_code: int = 502,
        code: str | None = None,
        after_first_token: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status_code = status_code
        self.code = code
        self.after_first_token = after_first_token


@runtime_checkable
class Backend(Protocol):
    """One replica: an in-process engine or one remote server."""

    name: str  # replica id, e.g. "slm/0" or "http://10.0.0.5:8000/v1"

    async def load(self) -> None:
        """Get ready to serve (load weights / open connections). Idempotent."""

    async def close(self) -> None:
        """Release everything; in-flight requests end with finish_reason 'abort'."""

    async def health(self) -> bool:
        """True when the replica can take requests now."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer; see the module docstring for the contract."""

    def num_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """Prompt length in tokens if cheaply known (local: exact after templating), else None."""
