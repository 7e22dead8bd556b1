"""Anthropic Messages wire types (``POST /v1/messages``) and their translation to the one chat request.

A Messages request becomes a ``ChatCompletionRequest`` (``MessagesRequest.to_chat_request``), so it runs the
same pipeline as every other endpoint: admission, guard, routing, cascade, pools, metrics. Only the shape of
the answer differs (``gateway.streaming.MessagesShaper``) and the error body
(``{"type": "error", "error": {"type", "message"}}``, ``error_body``).

Translation (Anthropic → OpenAI chat):
  * ``system`` (a string or text blocks) → one leading system message;
  * a user turn's ``tool_result`` blocks → ``tool`` messages (``tool_call_id`` = ``tool_use_id``), placed
    before the turn's text, which stays a user message;
  * an assistant turn's ``tool_use`` blocks → ``tool_calls`` (arguments = the JSON of ``input``);
  * ``tools[].input_schema`` (checked as a JSON Schema) → ``function.parameters``; ``tool_choice`` auto /
    any / tool / none → auto / required / the named function / none, its ``disable_parallel_tool_use`` →
    the opposite ``parallel_tool_calls``; ``stop_sequences`` → ``stop``; ``metadata.user_id`` → ``user``.
  * an assistant turn's ``thinking`` / ``redacted_thinking`` blocks (an earlier answer's reasoning, sent back)
    are dropped;
  * a user turn's ``image`` blocks (base64 or url source) → chat ``image_url`` parts (base64 as a data: URL),
    in order with its text; only pools with ``supports_vision`` take them.
    Other block kinds (document, ...) are a 400 naming the tag.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.protocol import (
    ChatCompletionRequest,
    Int,
    SwitchyardOptions,
    ToolName,
    check_json_schema,
    image_part,
)
from gateway.protocol import TextPart as TextBlock  # the same {type: text, text} block

_WIRE = ConfigDict(extra="ignore", strict=True)


class ToolUseBlock(BaseModel):
    model_config = _WIRE
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = _WIRE
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] = ""
    is_error: bool | None = None

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


class Base64Source(BaseModel):
    model_config = _WIRE
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class URLSource(BaseModel):
    model_config = _WIRE
    type: Literal["url"]
    url: str = Field(min_length=1)


class ImageBlock(BaseModel):
    """An image; only pools that declare ``supports_vision`` take it (others answer 400)."""

    model_config = _WIRE
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]

    def url(self) -> str:
        src = self.source
        return src.url if isinstance(src, URLSource) else f"data:{src.media_type};base64,{src.data}"


class UserMessage(BaseModel):
    model_config = _WIRE
    role: Literal["user"]
    content: str | list[Annotated[TextBlock | ImageBlock | ToolResultBlock, Field(discriminator="type")]]


class ThinkingBlock(BaseModel):
    """A thinking block of an earlier answer, sent back: accepted and dropped (pools get no reasoning history)."""

    model_config = _WIRE
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(BaseModel):
    model_config = _WIRE
    type: Literal["redacted_thinking"]
    data: str


class AssistantMessage(BaseModel):
    model_config = _WIRE
    role: Literal["assistant"]
    content: str | list[Annotated[TextBlock | ToolUseBlock | ThinkingBlock | RedactedThinkingBlock,
                                  Field(discriminator="type")]]


Message = Annotated[UserMessage | AssistantMessage, Field(discriminator="role")]


class Tool(BaseModel):
    model_config = _WIRE
    name: ToolName  # what OpenAI-compatible pools accept (up to 64 characters)
    description: str | None = None
    input_schema: dict[str, Any]


class AnyToolChoice(BaseModel):
    model_config = _WIRE
    type: Literal["auto", "any", "none"]
    disable_parallel_tool_use: bool | None = None


class NamedToolChoice(BaseModel):
    model_config = _WIRE
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


ToolChoice = Annotated[AnyToolChoice | NamedToolChoice, Field(discriminator="type")]


class Metadata(BaseModel):
    model_config = _WIRE
    user_id: str | None = Field(None, max_length=256)


class MessagesRequest(BaseModel):
    """POST /v1/messages."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"examples": [
        {"model": "auto", "max_tokens": 64, "messages": [{"role": "user", "content": "What is 2 + 2?"}]},
    ], "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"anyOf": [  # it needs tools
        {"type": "null"}, {"properties": {"type": {"const": "none"}}}]}}}},
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}})

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Int(1, 1_000_000)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=4)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int(0, 1_000_000) | None = None
    stream: bool | None = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    switchyard: SwitchyardOptions | None = None

    @model_validator(mode="after")
    def _check(self) -> MessagesRequest:
        for i, tool in enumerate(self.tools or ()):
            check_json_schema(tool.input_schema, f"tools.{i}.input_schema", f"tool {tool.name!r}")
        return self

    def to_chat_request(self) -> ChatCompletionRequest:
        """The same request as an OpenAI chat request; a ValueError names what cannot be served."""
        messages: list[dict[str, Any]] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            messages.append({"role": "system", "content": system})
        for m in self.messages:
            messages.extend(_chat_messages(m))
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                "stream": bool(self.stream)}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.stop_sequences:
            body["stop"] = list(self.stop_sequences)
        if self.metadata and self.metadata.user_id:
            body["user"] = self.metadata.user_id
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description or "", "parameters": t.input_schema}}
                for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = _tool_choice(self.tool_choice)
            if self.tool_choice.disable_parallel_tool_use is not None:
                body["parallel_tool_calls"] = not self.tool_choice.disable_parallel_tool_use
        if self.switchyard is not None:
            body["switchyard"] = self.switchyard.model_dump(exclude_none=True)
        return ChatCompletionRequest.model_validate(body)


def _chat_messages(m: UserMessage | AssistantMessage) -> list[dict[str, Any]]:
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    texts: list[str] = []
    parts: list[dict[str, Any]] = []  # text and image parts in order: the content when there are images
    tool_calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in m.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(image_part(block.url()))
        elif isinstance(block, ToolUseBlock):
            tool_calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, separators=(",", ":"))}})
        elif isinstance(block, ThinkingBlock | RedactedThinkingBlock):
            continue
        else:
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
    out = list(results)
    if m.role == "assistant":
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        out.append(message)
    elif len(parts) > len(texts):
        out.append({"role": "user", "content": parts})
    elif texts or not results:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _tool_choice(choice: AnyToolChoice | NamedToolChoice) -> str | dict[str, Any]:
    if isinstance(choice, NamedToolChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal",
                "abort": "end_turn"}

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                431: "invalid_request_error", 504: "timeout_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope for an HTTP status (the ``anthropic`` SDK picks its exception by status)."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """Anthropic's error envelope."""

    type: Literal["error"]
    error: ErrorDetail


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None


class MessageResponse(BaseModel):
    """The answer of POST /v1/messages (non-stream); the stream sends Anthropic's event sequence."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None = None
    usage: Usage
    switchyard: dict[str, Any] | None = None
