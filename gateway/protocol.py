"""OpenAI wire types: request bodies (parsed and validated), response shapes (documented in OpenAPI).

Requests are pydantic models: a bad field is a 400 ``invalid_request_error`` naming the field. Unknown
top-level fields are ignored (as vLLM does), so newer SDKs keep working. Rules across fields are model
validators raising ``FieldError`` with the ``param`` OpenAI would name: a tool's ``parameters`` and a
``json_schema`` response format's ``schema`` are JSON Schemas, a ``tool_choice`` other than none needs
``tools`` (a named one, one of them), a ``tool`` message answers a call of an earlier assistant message.

Responses are built as plain dicts on the hot path (``gateway/streaming.py``); the pydantic models below
describe exactly those dicts for the OpenAPI schema, and the tests validate served bodies against them.

switchyard extensions:
  * request body ``switchyard: {"quality": "low"|"medium"|"high"}`` — a routing hint (same as the
    ``x-switchyard-quality`` header); ``model: "auto"`` routes, any pool alias goes straight there;
  * every response body (and the last stream chunk) has a ``switchyard`` object with the decision,
    guard verdict, overhead and cost (``SwitchyardInfo``).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from backends.types import SamplingParams
from routers.text import content_text

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


class FieldError(ValueError):
    """A field that is valid alone but not with the rest of the body (a tool_choice naming no tool, a
    ``parameters`` that is no JSON Schema, a tool message answering no call). Raised inside a model
    validator; the 400 takes ``param`` (OpenAI's form: ``tools[0].function.parameters``) and ``code`` from
    it (``gateway.responder.invalid_request``)."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.code = code


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """What makes ``schema`` an invalid JSON Schema under its own ``$schema`` draft (2020-12 when it names
    none), or None."""
    from jsonschema import Draft202012Validator, SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as e:
        return f"{e.message} (at {e.json_path})"
    return None


@functools.lru_cache(maxsize=1024)
def _cached_schema_problem(canonical: bytes) -> str | None:
    """``_schema_problem`` by the schema's sorted-key JSON: agents send the same tools every turn, and one
    check costs about a millisecond."""
    return _schema_problem(orjson.loads(canonical))


def check_json_schema(schema: dict[str, Any], param: str, what: str, code: str | None = None) -> None:
    """Raise ``FieldError(param)`` when ``schema`` is not a valid JSON Schema; ``what`` names its owner in the
    message (``function 'get_weather'``)."""
    try:
        problem = _cached_schema_problem(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    except TypeError:  # an integer beyond 64 bits (orjson's range): checked without the cache
        problem = _schema_problem(schema)
    if problem is not None:
        raise FieldError(param, f"invalid JSON Schema for {what}: {problem}", code)


# OpenAI's rule for function and response-format names: a-z, A-Z, 0-9, underscores and dashes, up to 64.
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]

# The rules across fields that JSON Schema can state, for the served OpenAPI schema: a tool_choice other
# than "none" needs tools. (That a named tool_choice names one of them, that a tool message answers an
# earlier call, that a schema is a JSON Schema: checked by the validators, not statable here.)
TOOL_CHOICE_NEEDS_TOOLS = {
    "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": ["none", None]}}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}


class TextPart(BaseModel):
    model_config = _WIRE
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _WIRE
    url: str = Field(min_length=1, description="an http(s) URL or a data: URL (base64)")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """An image in a message; only pools that declare ``supports_vision`` take it (others answer 400)."""

    model_config = _WIRE
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    """One chat ``image_url`` part as backends see it (what the Responses and Messages images become)."""
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


class CalledFunction(BaseModel):
    model_config = _WIRE
    name: str
    arguments: str = Field(description="the arguments as JSON text, as the model wrote them")


class ToolCall(BaseModel):
    """One call of an assistant turn (``tool_calls``); a ``tool`` message answers it by ``id``."""

    model_config = _WIRE
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    # A tool message says which call it answers (which earlier call: ``_check_tool_messages``).
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={
        "if": {"properties": {"role": {"const": "tool"}}},
        "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}}})
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        return content_text(self.content)

    def to_backend(self) -> dict[str, Any]:
        """The message as backends see it: content flattened to one string, or — when it has images — the
        list of text and ``image_url`` parts, in order."""
        has_images = isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)
        content = ([p.model_dump(exclude_none=True) for p in self.content] if has_images  # type: ignore[union-attr]
                   else self.text())
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(BaseModel):
    model_config = _WIRE
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: ToolName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON Schema (checked as one)")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``json_schema`` is required with type json_schema (and ignored with the other types)."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={
        "if": {"properties": {"type": {"const": "json_schema"}}}, "then": {"required": ["json_schema"]}})
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("response_format.json_schema", "required with type 'json_schema'")
        return self


class FunctionDefinition(BaseModel):
    model_config = _WIRE
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema (checked as one); left out: "
                                                                 "no parameters")
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _WIRE
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` forcing one tool of ``tools`` by name."""

    model_config = _WIRE
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def _check_tools(tools: list[ChatTool] | None, tool_choice: ToolChoice | None) -> None:
    """Each tool's ``parameters`` is a JSON Schema; a ``tool_choice`` other than none has tools, and a named
    one names one of them (OpenAI's rules; raises FieldError)."""
    for i, tool in enumerate(tools or ()):
        if tool.function.parameters is not None:
            check_json_schema(tool.function.parameters, f"tools[{i}].function.parameters",
                              f"function {tool.function.name!r}", "invalid_function_parameters")
    if tool_choice is None or tool_choice == "none":
        return
    if not tools:
        raise FieldError("tool_choice", f"{_choice_text(tool_choice)} is only allowed when tools are given")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in {
            t.function.name for t in tools}:
        raise FieldError("tool_choice", f"function {tool_choice.function.name!r} is not in tools")


def _choice_text(tool_choice: ToolChoice) -> str:
    return repr(tool_choice) if isinstance(tool_choice, str) else f"function {tool_choice.function.name!r}"


def _check_tool_messages(messages: list[ChatMessage]) -> None:
    """Every ``tool`` message answers (``tool_call_id``) a call of an earlier assistant message."""
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.tool_calls:
            call_ids.update(call.id for call in m.tool_calls)
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise FieldError(f"messages[{i}].tool_call_id", "a tool message needs the tool_call_id of "
                                                                "the call it answers")
            if m.tool_call_id not in call_ids:
                raise FieldError(f"messages[{i}].tool_call_id", f"{m.tool_call_id!r} answers no tool call of "
                                                                "an earlier assistant message")


class SwitchyardOptions(BaseModel):
    """Per-request routing hint: ``quality`` low prefers the SLM, high prefers the LLM;
    ``max_strong_share`` caps the share of traffic the router may send to the LLM (give one of the two)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "not": {"required": ["quality", "max_strong_share"],
                "properties": {"quality": {"type": "string"}, "max_strong_share": {"type": "number"}}}})
    quality: Literal["low", "medium", "high"] | None = None
    max_strong_share: float | None = Field(None, ge=0, le=1)
    session_id: str | None = Field(None, min_length=1, max_length=256, description="the agent session this "
                                   "request belongs to (as the x-session-id header; gateway/sessions.py)")


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
    top_p: float | None = Field(None, gt=0, le=1)
    n: Int(1, 128) | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    max_tokens: Int(1, 1_000_000) | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]] | None = (
        Field(None, description="token id → bias in [-100, 100], added to that token's logit",
              json_schema_extra={"anyOf": [  # keys other than token ids are refused: say so in the schema
                  {"type": "object", "additionalProperties": False, "patternProperties": {
                      "^[0-9]+$": {"type": "number", "minimum": -100, "maximum": 100}}},
                  {"type": "null"}]}))
    seed: Int(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) | None = None
    user: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256, description="OpenAI's cache key: also the "
                                         "request's agent session unless x-session-id or switchyard.session_id "
                                         "name one")
    switchyard: SwitchyardOptions | None = None
    # vLLM's extra sampling fields (``extra_body``): the engine honours them; remote pools get them when set.
    top_k: Int(-1, 1_000_000) | None = Field(None, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool | None = None
    stop_token_ids: list[Int(0)] | None = None
    priority: Int(-(2**31), 2**31 - 1) | None = Field(None, description="engine scheduling: lower runs first "
                                                                        "(vLLM's priority)")

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
            top_k=-1 if not self.top_k else self.top_k,
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
            logit_bias=tuple(sorted((int(t), float(b)) for t, b in (self.logit_bias or {}).items())),
        )


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        {"model": "slm", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hello"}],
         "stream": True, "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": 16},
    ], "allOf": [TOOL_CHOICE_NEEDS_TOOLS]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(1, 1_000_000) | None = None
    logprobs: bool | None = False
    top_logprobs: Int(0, 20) | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra chat-template variables "
                                                        "(vLLM's; e.g. enable_thinking)")
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call per answer")

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        _check_tools(self.tools, self.tool_choice)
        _check_tool_messages(self.messages)
        spec = self.response_format.json_schema if self.response_format else None
        if spec is not None and spec.schema_ is not None:
            check_json_schema(spec.schema_, "response_format.json_schema.schema", f"response format {spec.name!r}")
        return self

    def tools_for_backend(self) -> list[dict[str, Any]] | None:
        """``tools`` as backends see them: OpenAI's dicts, unset fields left out."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools is not None else None

    def tool_choice_for_backend(self) -> str | dict[str, Any] | None:
        return self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice

    def response_format_for_backend(self) -> dict[str, Any] | None:
        fmt = self.response_format
        if fmt is None:
            return None
        if fmt.type != "json_schema":
            return {"type": fmt.type}
        return {"type": fmt.type, "json_schema": fmt.json_schema.model_dump(by_alias=True, exclude_none=True)}

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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

    def num_logprobs(self) -> int | None:
        return self.logprobs


# ------------------------------------------------------------------------------------- responses


class SwitchyardInfo(BaseModel):
    """What the gateway decided for this request (also in the x-switchyard-* headers)."""

    route: str = Field(description="slm | slm_then_escalate | llm | pool (an N-model router chose the pool) | "
                                   "session | explicit | guard | policy")
    model: str = Field(description="the pool alias that produced the answer")
    guard: str = Field(description="domain | ood | unsafe | off | exempt")
    score: float | None = Field(None, description="two-pool router: P(SLM good enough), when it ran")
    threshold: float | None = None
    scores: dict[str, float] | None = Field(None, description="N-model router: predicted answer quality per pool "
                                            "alias (also the x-switchyard-scores header), when it ran")
    tolerance: float | None = Field(None, description="N-model router: the cheapest pool predicted within this "
                                    "of the best predicted quality was chosen")
    escalated: bool = False
    num_examples: int = Field(0, description="example-cache entries given to the SLM")
    example_similarity: float | None = Field(None, description="cosine similarity of the best example given "
                                             "to the SLM (None: none)")
    overhead_ms: float = Field(description="gateway time not spent waiting on backends")
    cost_usd: float
    reason: str = ""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = None


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
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


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
    reasoning_content: str | None = None
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


# ------------------------------------------------------------------------------------ Responses API


class InputText(BaseModel):
    model_config = _WIRE
    type: Literal["input_text", "output_text"]
    text: str


class InputImage(BaseModel):
    """An image by URL (http(s) or data:); ``file_id`` (the Files API) is not served: ``image_url`` is required."""

    model_config = _WIRE
    type: Literal["input_image"]
    image_url: str = Field(min_length=1, description="an http(s) URL or a data: URL (base64); file_id is not "
                           "supported")
    detail: Literal["auto", "low", "high"] | None = None


class InputMessage(BaseModel):
    """A message item; ``type`` may be left out (the SDK's "easy input message")."""

    model_config = _WIRE
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[InputText | InputImage, Field(discriminator="type")]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, InputText))

    def chat_content(self) -> str | list[dict[str, Any]]:
        """The chat message content: the text, or — when there are images — text and image_url parts."""
        if isinstance(self.content, str) or not any(isinstance(p, InputImage) for p in self.content):
            return self.text()
        return [{"type": "text", "text": p.text} if isinstance(p, InputText) else image_part(p.image_url, p.detail)
                for p in self.content]


class FunctionCallItem(BaseModel):
    model_config = _WIRE
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = _WIRE
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str
    id: str | None = None
    status: str | None = None


class ReasoningItem(BaseModel):
    """A reasoning item of an earlier response, sent back (the Agents SDK does): accepted and dropped, as the
    stored conversation drops it (pools get no reasoning history)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["reasoning"]
    id: str | None = None


def _item_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("function_call", "function_call_output", "reasoning") else "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind)]


class FunctionTool(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


def _only_function_tools(value: Any) -> Any:
    """Built-in tools (web search, file search, ...) are named in the 400, not lost in a union error."""
    if isinstance(value, list):
        for i, tool in enumerate(value):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "function":
                raise ValueError(f"tools.{i}: the built-in tool {kind!r} is not supported here; "
                                 "only function tools are")
    return value


class NamedFunction(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    name: str = Field(min_length=1)


class PlainFormat(BaseModel):
    model_config = _WIRE
    type: Literal["text", "json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    type: Literal["json_schema"]
    name: ToolName
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(BaseModel):
    model_config = _WIRE
    format: Annotated[PlainFormat | JsonSchemaFormat, Field(discriminator="type")] | None = None


class ResponsesRequest(_Request):
    """POST /v1/responses (the fields a chat model can serve; built-in tools are a 400 naming them)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True, json_schema_extra={"examples": [
        {"model": "auto", "input": "What is 2 + 2?"},
        {"model": "slm", "instructions": "Be brief.", "input": [{"role": "user", "content": "Hello"}],
         "max_output_tokens": 16, "temperature": 0},
    ], "allOf": [TOOL_CHOICE_NEEDS_TOOLS]})

    model: str = Field(min_length=1, max_length=256)
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: Annotated[list[FunctionTool] | None, BeforeValidator(_only_function_tools)] = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    max_output_tokens: Int(1, 1_000_000) | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    previous_response_id: str | None = Field(None, min_length=1, max_length=256)
    store: bool | None = True
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)
    switchyard: SwitchyardOptions | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        """The schemas are JSON Schemas, named as this API names them (``tools[0].parameters``); the other
        rules (tool_choice, function call outputs) are the chat request's (``to_chat_request``)."""
        for i, tool in enumerate(self.tools or ()):
            if tool.parameters is not None:
                check_json_schema(tool.parameters, f"tools[{i}].parameters", f"function {tool.name!r}",
                                  "invalid_function_parameters")
        fmt = self.text.format if self.text else None
        if isinstance(fmt, JsonSchemaFormat):
            check_json_schema(fmt.schema_, "text.format.schema", f"text format {fmt.name!r}")
        return self

    def input_messages(self) -> list[dict[str, Any]]:
        """``input`` as chat messages: consecutive function calls become one assistant turn's tool_calls,
        each function output a ``tool`` message."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out: list[dict[str, Any]] = []
        for item in self.input:
            if isinstance(item, InputMessage):
                out.append({"role": item.role, "content": item.chat_content()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                    out[-1]["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return out

    def to_chat_request(self, history: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat request for ``history`` (the stored conversation of ``previous_response_id``) + input."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += history + self.input_messages()
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": bool(self.stream)}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        for name in ("temperature", "top_p", "user", "prompt_cache_key"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description or "", "parameters": t.parameters or {},
                **({"strict": t.strict} if t.strict is not None else {})}} for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = (self.tool_choice if isinstance(self.tool_choice, str) else
                                   {"type": "function", "function": {"name": self.tool_choice.name}})
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif isinstance(fmt, JsonSchemaFormat):
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "schema": fmt.schema_, "strict": bool(fmt.strict)}}
        if self.switchyard is not None:
            body["switchyard"] = self.switchyard.model_dump(exclude_none=True)
        return ChatCompletionRequest.model_validate(body)


class ResponseObject(BaseModel):
    """The answer of POST /v1/responses (non-stream; the stream's ``response.completed`` carries the same)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    switchyard: SwitchyardInfo | None = None
