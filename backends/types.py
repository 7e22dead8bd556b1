"""The boundary types between the gateway and the backends: GenerationRequest in, Deltas out.

``SamplingParams`` is the engine's own (``backends/engine/sampling_params.py``), re-exported here: the
wire request builds it once (``to_sampling_params()``), and the same object reaches a local engine as is
or is serialised for a remote pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from backends.engine.sampling_params import SamplingParams, SamplingParamsError

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "abort"]


def num_image_parts(messages: list[dict[str, Any]] | None) -> int:
    """Image parts (OpenAI ``{"type": "image_url", ...}``) in chat messages; a message's content is a string
    or a list of parts. Only pools that take images (remote ``supports_vision``) may get a request with any."""
    return sum(1 for m in messages or () if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")


@dataclass
class GenerationRequest:
    """One request to one backend. Exactly one of ``messages`` (chat) or ``prompt`` (completion) is set.

    ``sampling`` is validated already (a SamplingParams cannot exist invalid); ``n`` is ``sampling.n``.
    """

    request_id: str
    model: str  # the model id the backend serves (remote: upstream model name)
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # OpenAI agent fields: remote pools get them as is; local pools render, constrain and parse them.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # None: the backend's default; sent to remote pools only when set
    response_format: dict[str, Any] | None = None
    user: str | None = None
    deadline: float | None = None  # time.monotonic() by which the request must finish
    priority: int = 0  # lower runs first (engine scheduler)
    trace_headers: dict[str, str] = field(default_factory=dict)  # x-request-id, traceparent: sent to remote pools
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template
    session_id: str | None = None  # an agent session (x-session-id, prompt_cache_key, ...): placement and KV retention
    program_id: str | None = None  # a multi-agent job (x-program-id; defaults to the session): engine scheduling
    namespace: str | None = None  # the tenant (API key's namespace): local engines share speculative drafts within it

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of messages or prompt")

    @property
    def n(self) -> int:
        return self.sampling.n

    @property
    def has_images(self) -> bool:
        return num_image_parts(self.messages) > 0


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
    reasoning_tokens: int = 0  # completion tokens an upstream spent reasoning (its completion_tokens_details)

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
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI stream pieces (delta.tool_calls): index, id, name, arguments
    reasoning: str = ""  # an upstream's reasoning_content (vLLM / SGLang reasoning parsers), passed through
    is_final: bool = False  # last Delta of the whole request
    usage: Usage | None = None  # set on the final Delta


__all__ = ["Delta", "FinishReason", "GenerationRequest", "SamplingParams", "SamplingParamsError", "TokenLogprob",
           "Usage", "num_image_parts"]
