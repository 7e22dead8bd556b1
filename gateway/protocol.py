"""OpenAI wire types: request bodies (parsed and validated), response shapes (documented in OpenAPI).

Requests are pydantic models: a bad field is a 400 ``invalid_request_error`` naming the field. Unknown
top-level fields are ignored (as vLLM does), so newer SDKs keep working.

Responses are built as plain dicts on the hot path (``gateway/streaming.py``); the pydantic models below
describe exactly those dicts for the OpenAPI schema, and the tests validate served bodies against them.

switchyard extensions:
  * request body ``switchyard: {"quality": "low"|"medium"|"high"}`` — a routing hint (same as the
    ``x-switchyard-quality`` header); ``model: "auto"`` routes, any pool alias goes straight there;
  * every response body (and the last stream chunk) has a ``switchyard`` object with the decision,
    guard verdict, overhead and cost (``SwitchyardInfo``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.types import SamplingParams

INT64_MAX = 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def to_backend(self) -> dict[str, Any]:
        """The message as backends see it: content flattened to one string."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class SwitchyardOptions(BaseModel):
    """Per-request routing hint: ``quality`` low prefers the SLM, high prefers the LLM."""

    model_config = ConfigDict(extra="forbid")
    quality: Literal["low", "medium", "high"] | None = None


Stop = str | list[str] | None


def _check_stop(stop: Stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 4:
        raise ValueError("stop: at most 4 sequences")
    if any(s == "" for s in items):
        raise ValueError("stop: sequences must not be empty")
    return tuple(items)


class _Sampling(_Request):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    user: str | None = Field(None, max_length=256)
    switchyard: SwitchyardOptions | None = None
    # vLLM's extra sampling fields (``extra_body``): the engine honours them; remote pools get them when set.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    priority: int | None = Field(None, description="engine scheduling: lower runs first (vLLM's priority)")

    def stop_sequences(self) -> tuple[str, ...]:
        return _check_stop(self.stop)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """None = no logprobs; k = the sampled token's plus the top-k alternatives."""
        return None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The request's one SamplingParams (vLLM's ``to_sampling_params``): OpenAI's defaults where a field
        is unset (temperature 1, top_p 1), ``default_max_tokens`` when no max_tokens is given. Raises
        ``SamplingParamsError`` (a ValueError whose ``param`` names the field) for values no backend can
        honour; the routes answer it with a 400 ``invalid_request_error``, for local and remote pools alike."""
        return SamplingParams(
            n=self.n or 1,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            max_tokens=self.max_new_tokens() or default_max_tokens,
            stop=self.stop_sequences(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logprobs=self.num_logprobs(),
            ignore_eos=bool(self.ignore_eos),
        )


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        {"model": "slm", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hello"}],
         "stream": True, "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": 16},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        _check_stop(self.stop)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    """POST /v1/completions. One prompt per request: a string, or a list of token ids."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "slm", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
    ]})

    prompt: str | list[int] | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1, le=1_000_000)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] | None = Field(False, description="not supported: only false")
    suffix: Literal[""] | None = Field(None, description="not supported: only empty")

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        _check_stop(self.stop)
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request (a list of strings must have length 1)")
        if isinstance(self.prompt, list) and any(isinstance(t, int) and t < 0 for t in self.prompt):
            raise ValueError("prompt: token ids must be >= 0")
        return self

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]  # type: ignore[return-value]
        return self.prompt  # type: ignore[return-value]

    def num_logprobs(self) -> int | None:
        return self.logprobs


# ------------------------------------------------------------------------------------- responses


class SwitchyardInfo(BaseModel):
    """What the gateway decided for this request (also in the x-switchyard-* headers)."""

    route: str = Field(description="slm | slm_then_escalate | llm | explicit | guard | policy")
    model: str = Field(description="the pool alias that produced the answer")
    guard: str = Field(description="domain | ood | unsafe | off | exempt")
    score: float | None = Field(None, description="router P(SLM good enough), when a router ran")
    threshold: float | None = None
    escalated: bool = False
    num_examples: int = Field(0, description="example-cache entries given to the SLM")
    overhead_ms: float = Field(description="gateway time not spent waiting on backends")
    cost_usd: float
    reason: str = ""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "abort"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    switchyard: SwitchyardInfo


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed chat completion; the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    switchyard: SwitchyardInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A completion, or (``object: text_completion`` too) one stream chunk of one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    switchyard: SwitchyardInfo | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
