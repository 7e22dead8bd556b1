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

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# I-JSON (RFC 7493): integers beyond ±(2**53 - 1) are not exact in every JSON parser (schema checkers
# included), so a seed lives in that range.
MAX_SAFE_INTEGER = 2**53 - 1

# Strict JSON types on every request field (as OpenAI's API): "stream": "yes", "n": "2" or
# "temperature": "0.5" are 400s, not coerced. Integers are accepted where a number is expected.
_WIRE = ConfigDict(extra="ignore", strict=True)


def _only_bool(value: Any) -> Any:
    """Literal[False] alone compares with ==, so 0 would pass as false: only JSON booleans (or null) do."""
    if value is not None and not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


OnlyFalse = Annotated[Literal[False] | None, BeforeValidator(_only_bool)]


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 4.0: accept a float with no fraction as that integer, nothing else."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(ge: int | None = None, le: int | None = None) -> Any:  # noqa: N802 - a type, read as one
    """An integer field: JSON integers, and floats with no fraction (JSON Schema counts 4.0 as one)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


class _Request(BaseModel):
    model_config = _WIRE


class TextPart(BaseModel):
    model_config = _WIRE
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _WIRE
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
    model_config = _WIRE
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"]


class SwitchyardOptions(BaseModel):
    """Per-request routing hint: ``quality`` low prefers the SLM, high prefers the LLM;
    ``max_strong_share`` caps the share of traffic the router may send to the LLM (give one of the two)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "not": {"required": ["quality", "max_strong_share"],
                "properties": {"quality": {"type": "string"}, "max_strong_share": {"type": "number"}}}})
    quality: Literal["low", "medium", "high"] | None = None
    max_strong_share: float | None = Field(None, ge=0, le=1)


StopSequence = Annotated[str, Field(min_length=1)]
Stop = StopSequence | Annotated[list[StopSequence], Field(max_length=4)] | None


def _check_stop(stop: Stop) -> tuple[str, ...]:
    """The stop sequences as a tuple; the field's type already holds 1-4 non-empty strings."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class _Sampling(_Request):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: Int(1, 128) | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    max_tokens: Int(1, 1_000_000) | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: Int(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) | None = None
    user: str | None = Field(None, max_length=256)
    switchyard: SwitchyardOptions | None = None

    def stop_sequences(self) -> tuple[str, ...]:
        return _check_stop(self.stop)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        {"model": "slm", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hello"}],
         "stream": True, "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": 16},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(1, 1_000_000) | None = None
    logprobs: bool | None = False
    top_logprobs: Int(0, 20) | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """POST /v1/completions. One prompt per request: a string, or a list of token ids."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "slm", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
    ]})

    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Int(0)], Field(min_length=1)]
             | Annotated[list[str], Field(min_length=1, max_length=1, description="one prompt per request")])
    max_tokens: Int(1, 1_000_000) | None = 16
    logprobs: Int(0, 5) | None = None
    echo: OnlyFalse = Field(False, description="not supported: only false")
    suffix: Literal[""] | None = Field(None, description="not supported: only empty")

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]  # type: ignore[return-value]
        return self.prompt  # type: ignore[return-value]

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


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
