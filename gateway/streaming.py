"""Deltas → OpenAI bodies: one ``chat.completion`` / ``text_completion``, or SSE chunks ending in [DONE].

``ResponseShaper`` is built once per request and knows the wire flavour (chat or completion), the model
name, and what the caller asked for (logprobs, include_usage). It has two modes:

* ``frames(delta)`` → the SSE bytes for one Delta (possibly b""), and ``closing(usage, info)`` → the last
  frames (usage chunk when asked, then ``data: [DONE]``). The chunk of a choice that carries its
  ``finish_reason`` is held back until the next Delta so that the request's last choice chunk can carry
  the ``switchyard`` field (no extra chunk with an empty ``choices`` list unless usage was asked for).
  ``finish_reason`` is sent exactly once per choice.
* ``add(delta)`` to accumulate, then ``body(usage, info)`` → the full response dict; tool-call pieces are
  merged by ``index`` into whole calls (``ToolCalls``), as OpenAI's ``message.tool_calls``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.base import Delta, TokenLogprob, Usage, json_bytes

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


def error_event(message: str, code: str | None = None, error_type: str = "upstream_error") -> bytes:
    """The SSE frame that ends a stream that failed after tokens were sent (never a silent truncation)."""
    return sse({"error": {"message": message, "type": error_type, "param": None, "code": code}})


def usage_dict(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                           "total_tokens": usage.total_tokens}
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def _chat_logprob_items(logprobs: tuple[TokenLogprob, ...], top_n: int) -> list[dict[str, Any]]:
    items = []
    for lp in logprobs:
        tops = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top_logprobs[:top_n]]
        items.append({"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                      "top_logprobs": tops})
    return items


class ToolCalls:
    """OpenAI tool-call pieces (stream deltas carry ``index`` with ``id``/``name`` first, then ``arguments``
    fragments; whole answers carry complete calls) merged into whole calls, in order of first appearance."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, pieces: list[dict[str, Any]]) -> list[tuple[int, bool, str]]:
        """Merge ``pieces``; returns (call position, is_new, argument fragment) for each piece."""
        out = []
        for piece in pieces:
            key = piece.get("index", len(self.calls))
            fn = piece.get("function") or {}
            call = self.calls.get(key)
            is_new = call is None
            if call is None:
                call = self.calls[key] = {"id": piece.get("id") or f"call_{len(self.calls)}", "name": "",
                                          "arguments": ""}
            if fn.get("name"):
                call["name"] = fn["name"]
            fragment = fn.get("arguments") or ""
            call["arguments"] += fragment
            out.append((list(self.calls).index(key), is_new, fragment))
        return out

    def whole(self) -> list[dict[str, Any]]:
        return list(self.calls.values())

    def openai(self) -> list[dict[str, Any]]:
        """The whole calls in OpenAI's message shape: ``{"id", "type": "function", "function": {"name",
        "arguments"}}``."""
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.calls.values()]


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: ToolCalls = field(default_factory=ToolCalls)
    reasoning: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_chars: int = 0  # completion text_offset bookkeeping
    sent_role: bool = False


class ResponseShaper:
    def __init__(self, *, kind: str, request_id: str, created: int, model: str, logprobs: bool = False,
                 top_logprobs: int = 0, include_usage: bool = False, prompt_chars: int = 0) -> None:
        if kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', got {kind!r}")
        self.kind = kind
        self.request_id = request_id
        self.created = created
        self.model = model
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.include_usage = include_usage
        self.prompt_chars = prompt_chars
        self.choices: dict[int, _Choice] = {}
        self._held: dict[str, Any] | None = None  # a finish chunk waiting to learn if it is the last one
        self._object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _choice(self, index: int) -> _Choice:
        c = self.choices.get(index)
        if c is None:
            c = self.choices[index] = _Choice()
        return c

    # ------------------------------------------------------------------------------ accumulate

    def add(self, delta: Delta) -> None:
        c = self._choice(delta.index)
        if delta.text:
            c.text.append(delta.text)
        if delta.logprobs:
            c.logprobs.extend(delta.logprobs)
        if delta.tool_calls:
            c.tool_calls.add(delta.tool_calls)
        if delta.reasoning:
            c.reasoning.append(delta.reasoning)
        if delta.finish_reason is not None and c.finish_reason is None:
            c.finish_reason = delta.finish_reason

    def text_of(self, index: int = 0) -> str:
        c = self.choices.get(index)
        return "".join(c.text) if c else ""

    def body(self, usage: Usage, info: dict[str, Any]) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices) or [0]:
            c = self._choice(index)
            text = "".join(c.text)
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if c.tool_calls.calls:
                    message["tool_calls"] = c.tool_calls.openai()
                    message["content"] = text or None
                if c.reasoning:
                    message["reasoning_content"] = "".join(c.reasoning)
                lp = ({"content": _chat_logprob_items(tuple(c.logprobs), self.top_logprobs)}
                      if self.logprobs else None)
                choices.append({"index": index, "message": message, "logprobs": lp,
                                "finish_reason": c.finish_reason or "stop"})
            else:
                lp = self._completion_logprobs(tuple(c.logprobs), self.prompt_chars) if self.logprobs else None
                choices.append({"index": index, "text": text, "logprobs": lp,
                                "finish_reason": c.finish_reason or "stop"})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_dict(usage), "switchyard": info}

    def _completion_logprobs(self, logprobs: tuple[TokenLogprob, ...], start: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        pos = start
        for lp in logprobs:
            tokens.append(lp.token)
            values.append(lp.logprob)
            tops.append(dict(lp.top_logprobs[: self.top_logprobs]))
            offsets.append(pos)
            pos += len(lp.token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    # ---------------------------------------------------------------------------------- stream

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.request_id, "object": self._object, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def frames(self, delta: Delta) -> bytes:
        """SSE bytes for one Delta; the finish chunk of a choice is held back one step (see module doc)."""
        out = b""
        if self._held is not None:
            out = sse(self._held)
            self._held = None
        c = self._choice(delta.index)
        if c.finish_reason is not None:
            return out  # finish_reason already sent for this choice: nothing more for it
        if not (delta.text or delta.logprobs or delta.tool_calls or delta.finish_reason or delta.reasoning):
            return out
        if self.kind == "chat":
            d: dict[str, Any] = {}
            if not c.sent_role:
                d["role"] = "assistant"
                c.sent_role = True
            d["content"] = delta.text
            if delta.reasoning:
                d["reasoning_content"] = delta.reasoning
            if delta.tool_calls:
                d["tool_calls"] = delta.tool_calls
            lp = ({"content": _chat_logprob_items(delta.logprobs, self.top_logprobs)}
                  if self.logprobs else None)
            choice = {"index": delta.index, "delta": d, "logprobs": lp, "finish_reason": delta.finish_reason}
        else:
            lp = self._completion_logprobs(delta.logprobs, self.prompt_chars + c.num_chars) if self.logprobs \
                else None
            c.num_chars += len(delta.text)
            choice = {"index": delta.index, "text": delta.text, "logprobs": lp,
                      "finish_reason": delta.finish_reason}
        if delta.finish_reason is not None:
            c.finish_reason = delta.finish_reason
            self._held = self._chunk([choice])
            return out
        return out + sse(self._chunk([choice]))

    def error_frame(self, status: int, message: str, code: str | None, error_type: str) -> bytes:
        """The frame that ends a stream which failed after its headers were sent."""
        return error_event(message, code, error_type)

    def closing(self, usage: Usage | None, info: dict[str, Any]) -> bytes:
        """Last frames: choices never finished get finish_reason, the held chunk gets ``switchyard``,
        then the usage chunk (when asked) and ``data: [DONE]``."""
        out = b""
        for index in sorted(self.choices) or [0]:
            c = self._choice(index)
            if c.finish_reason is None:
                if self._held is not None:
                    out += sse(self._held)
                c.finish_reason = "stop"
                choice: dict[str, Any] = ({"index": index, "delta": {}, "logprobs": None, "finish_reason": "stop"}
                                          if self.kind == "chat" else
                                          {"index": index, "text": "", "logprobs": None, "finish_reason": "stop"})
                self._held = self._chunk([choice])
        if self._held is not None:
            self._held["switchyard"] = info
            out += sse(self._held)
            self._held = None
        if self.include_usage:
            final = {"id": self.request_id, "object": self._object, "created": self.created, "model": self.model,
                     "choices": [], "usage": usage_dict(usage) if usage else None, "switchyard": info}
            out += sse(final)
        return out + DONE


def sse_event(name: str, obj: Any) -> bytes:
    """An SSE frame with an ``event:`` line (the Responses and Anthropic Messages streams name every event)."""
    return b"event: " + name.encode() + b"\ndata: " + json_bytes(obj) + b"\n\n"


def _json_object(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as an object (Anthropic's ``input``); text that is not a JSON object is kept
    under ``_raw`` rather than lost."""
    import json

    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


class MessagesShaper:
    """Deltas → Anthropic Messages: one ``message`` object, or the event sequence ``message_start``,
    (``content_block_start``, ``content_block_delta``…, ``content_block_stop``) per block, ``message_delta``
    with ``stop_reason`` and usage, ``message_stop``. Choice 0 only (Messages has no ``n``).

    An upstream's reasoning (``Delta.reasoning``) is a ``thinking`` block (streamed: ``content_block_start``
    of type thinking, ``thinking_delta``…, then one ``signature_delta`` before ``content_block_stop``). Its
    ``signature`` is always empty: the text comes from an open model, not from Anthropic, and there is
    nothing to sign; thinking blocks sent back in a later request are accepted and dropped."""

    def __init__(self, *, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.tools = ToolCalls()
        self.finish_reason: str | None = None
        self._started = False
        # ("text" | "thinking", block index) | ("tool", call position)
        self._open: tuple[str, int] | None = None
        self._num_blocks = 0
        self._block_of_call: dict[int, int] = {}

    def _message(self, usage: Usage | None, info: dict[str, Any] | None, content: list[dict[str, Any]]) -> dict:
        from gateway.anthropic import STOP_REASONS

        stop = STOP_REASONS.get(self.finish_reason or "", None) if self.finish_reason else None
        out = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
               "content": content, "stop_reason": stop, "stop_sequence": None,
               "usage": {"input_tokens": usage.prompt_tokens if usage else 0,
                         "output_tokens": usage.completion_tokens if usage else 0}}
        if info is not None:
            out["switchyard"] = info
        return out

    # ------------------------------------------------------------------------------ accumulate

    def add(self, delta: Delta) -> None:
        if delta.index != 0:
            return
        if delta.reasoning:
            self.thinking.append(delta.reasoning)
        if delta.text:
            self.text.append(delta.text)
        if delta.tool_calls:
            self.tools.add(delta.tool_calls)
        if delta.finish_reason is not None and self.finish_reason is None:
            self.finish_reason = delta.finish_reason

    def body(self, usage: Usage, info: dict[str, Any]) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if self.thinking:
            content.append({"type": "thinking", "thinking": "".join(self.thinking), "signature": ""})
        if self.text or not self.tools.calls:
            content.append({"type": "text", "text": "".join(self.text)})
        for call in self.tools.whole():
            content.append({"type": "tool_use", "id": call["id"], "name": call["name"],
                            "input": _json_object(call["arguments"])})
        self.finish_reason = self.finish_reason or "stop"
        return self._message(usage, info, content)

    # ---------------------------------------------------------------------------------- stream

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return sse_event("message_start", {"type": "message_start", "message": self._message(None, None, [])})

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        kind, index = self._open
        index = self._block_of_call[index] if kind == "tool" else index
        self._open = None
        out = b""
        if kind == "thinking":
            out = sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": {"type": "signature_delta", "signature": ""}})
        return out + sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self._open = (kind, self._num_blocks)
        self._num_blocks += 1
        return out + sse_event("content_block_start", {"type": "content_block_start", "index": self._open[1],
                                                       "content_block": block})

    def frames(self, delta: Delta) -> bytes:
        out = self._start()
        if delta.index != 0 or self.finish_reason is not None:
            return out
        if delta.reasoning:
            if self._open is None or self._open[0] != "thinking":
                out += self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.thinking.append(delta.reasoning)
            out += sse_event("content_block_delta", {"type": "content_block_delta", "index": self._open[1],
                                                     "delta": {"type": "thinking_delta", "thinking": delta.reasoning}})
        if delta.text:
            if self._open is None or self._open[0] != "text":
                out += self._open_block("text", {"type": "text", "text": ""})
            self.text.append(delta.text)
            out += sse_event("content_block_delta", {"type": "content_block_delta", "index": self._open[1],
                                                     "delta": {"type": "text_delta", "text": delta.text}})
        for position, is_new, fragment in self.tools.add(delta.tool_calls or []):
            if is_new or self._open != ("tool", position):
                out += self._close_block()
                self._block_of_call[position] = self._num_blocks
                self._num_blocks += 1
                self._open = ("tool", position)
                call = self.tools.whole()[position]
                out += sse_event("content_block_start", {
                    "type": "content_block_start", "index": self._block_of_call[position],
                    "content_block": {"type": "tool_use", "id": call["id"], "name": call["name"], "input": {}}})
            if fragment:
                out += sse_event("content_block_delta", {
                    "type": "content_block_delta", "index": self._block_of_call[position],
                    "delta": {"type": "input_json_delta", "partial_json": fragment}})
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        return out

    def closing(self, usage: Usage | None, info: dict[str, Any]) -> bytes:
        from gateway.anthropic import STOP_REASONS

        out = self._start()
        if not self.text and not self.tools.calls:  # an answer without text or calls has one (empty) text block
            out += self._open_block("text", {"type": "text", "text": ""})
        out += self._close_block()
        usage_out = {"input_tokens": usage.prompt_tokens if usage else 0,
                     "output_tokens": usage.completion_tokens if usage else 0}
        out += sse_event("message_delta", {
            "type": "message_delta", "usage": usage_out, "switchyard": info,
            "delta": {"stop_reason": STOP_REASONS.get(self.finish_reason or "stop", "end_turn"),
                      "stop_sequence": None}})
        return out + sse_event("message_stop", {"type": "message_stop"})

    def error_frame(self, status: int, message: str, code: str | None, error_type: str) -> bytes:
        from gateway.anthropic import error_body

        return sse_event("error", error_body(status, message))


class ResponsesShaper:
    """Deltas → the Responses API: one ``response`` object, or its event stream (``response.created``,
    ``response.in_progress``, per output item ``response.output_item.added`` … ``.done`` with the text,
    reasoning text or function-call argument deltas between, then ``response.completed`` or
    ``response.incomplete``). Every event carries ``sequence_number``. Choice 0 only (Responses has no ``n``).
    The shaper keeps the whole answer either way, for the stored conversation (``output_messages``).

    An upstream's reasoning (``Delta.reasoning``) is a ``reasoning`` output item whose ``content`` is one
    ``reasoning_text`` part and whose ``summary`` is empty (the raw text of an open model, as vLLM serves it;
    no summary is made up); streamed as ``response.content_part.added`` with a ``reasoning_text`` part,
    ``response.reasoning_text.delta``…, ``response.reasoning_text.done``, ``response.content_part.done``. It is
    not kept in the stored conversation."""

    def __init__(self, *, response_id: str, model: str, created_at: int, echo: dict[str, Any]) -> None:
        self.response_id = response_id
        self.model = model
        self.created_at = created_at
        self.echo = echo  # request fields a response object repeats (instructions, tools, ...)
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tools = ToolCalls()
        self.finish_reason: str | None = None
        self._seq = 0
        self._started = False
        # output order: ("reasoning", 0) | ("message", 0) | ("call", call position)
        self._items: list[tuple[str, int]] = []
        self._open: int | None = None  # output index of the item being streamed

    @property
    def _message_id(self) -> str:
        return "msg_" + self.response_id.removeprefix("resp_")

    @property
    def _reasoning_id(self) -> str:
        return "rs_" + self.response_id.removeprefix("resp_")

    def _call_id(self, position: int) -> str:
        return f"fc_{self.response_id.removeprefix('resp_')}_{position}"

    def _item(self, kind: str, position: int, done: bool) -> dict[str, Any]:
        status = "completed" if done else "in_progress"
        if kind == "message":
            text = "".join(self.text) if done else ""
            content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []
            return {"id": self._message_id, "type": "message", "status": status, "role": "assistant",
                    "content": content}
        if kind == "reasoning":
            content = [{"type": "reasoning_text", "text": "".join(self.reasoning)}] if done else []
            return {"id": self._reasoning_id, "type": "reasoning", "status": status, "summary": [],
                    "content": content}
        call = self.tools.whole()[position]
        return {"id": self._call_id(position), "type": "function_call", "status": status,
                "call_id": call["id"], "name": call["name"], "arguments": call["arguments"] if done else ""}

    def _response(self, status: str, usage: Usage | None, info: dict[str, Any] | None) -> dict[str, Any]:
        done = status != "in_progress"
        out: dict[str, Any] = {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": [self._item(k, p, True) for k, p in self._items] if done else [],
            "error": None, "incomplete_details": None, **self.echo,
            "usage": None if usage is None else {
                "input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
                "total_tokens": usage.total_tokens}}
        if status == "incomplete":
            out["incomplete_details"] = {
                "reason": "content_filter" if self.finish_reason == "content_filter" else "max_output_tokens"}
        if info is not None:
            out["switchyard"] = info
        return out

    def _status(self) -> str:
        return "incomplete" if self.finish_reason in ("length", "content_filter") else "completed"

    def output_messages(self) -> list[dict[str, Any]]:
        """The answer as chat messages (what a stored conversation keeps)."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.tools.calls:
            message["tool_calls"] = self.tools.openai()
        return [message]

    # ------------------------------------------------------------------------------ accumulate

    def add(self, delta: Delta) -> None:
        if delta.index != 0:
            return
        if delta.reasoning:
            if not self.reasoning:
                self._items.append(("reasoning", 0))
            self.reasoning.append(delta.reasoning)
        if delta.text:
            if not self.text:
                self._items.append(("message", 0))
            self.text.append(delta.text)
        for position, is_new, _ in self.tools.add(delta.tool_calls or []):
            if is_new:
                self._items.append(("call", position))
        if delta.finish_reason is not None and self.finish_reason is None:
            self.finish_reason = delta.finish_reason

    def body(self, usage: Usage, info: dict[str, Any]) -> dict[str, Any]:
        if not any(kind != "reasoning" for kind, _ in self._items):  # an empty answer is one empty message
            self._items.append(("message", 0))
        return self._response(self._status(), usage, info)

    # ---------------------------------------------------------------------------------- stream

    def _event(self, event: str, **fields: Any) -> bytes:
        frame = sse_event(event, {"type": event, "sequence_number": self._seq, **fields})
        self._seq += 1
        return frame

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return (self._event("response.created", response=self._response("in_progress", None, None))
                + self._event("response.in_progress", response=self._response("in_progress", None, None)))

    def _add_item(self, kind: str, position: int) -> bytes:
        out = self._close_item()
        self._items.append((kind, position))
        self._open = len(self._items) - 1
        out += self._event("response.output_item.added", output_index=self._open,
                           item=self._item(kind, position, False))
        if kind == "message":
            out += self._event("response.content_part.added", item_id=self._message_id, output_index=self._open,
                               content_index=0, part={"type": "output_text", "text": "", "annotations": []})
        elif kind == "reasoning":
            out += self._event("response.content_part.added", item_id=self._reasoning_id, output_index=self._open,
                               content_index=0, part={"type": "reasoning_text", "text": ""})
        return out

    def _close_item(self) -> bytes:
        if self._open is None:
            return b""
        index, (kind, position) = self._open, self._items[self._open]
        self._open = None
        item = self._item(kind, position, True)
        if kind == "message":
            text = item["content"][0]["text"]
            out = self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=text, logprobs=[])
            out += self._event("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part={"type": "output_text", "text": text, "annotations": []})
        elif kind == "reasoning":
            part = item["content"][0]
            out = self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=part["text"])
            out += self._event("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part=part)
        else:
            out = self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                              name=item["name"], arguments=item["arguments"])
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def frames(self, delta: Delta) -> bytes:
        out = self._start()
        if delta.index != 0 or self.finish_reason is not None:
            return out
        if delta.reasoning:
            if not self.reasoning:
                out += self._add_item("reasoning", 0)
            self.reasoning.append(delta.reasoning)
            if self._open is not None and self._items[self._open][0] == "reasoning":
                out += self._event("response.reasoning_text.delta", item_id=self._reasoning_id,
                                   output_index=self._open, content_index=0, delta=delta.reasoning)
        if delta.text:
            if not self.text:
                out += self._add_item("message", 0)
            self.text.append(delta.text)
            if self._open is None or self._items[self._open][0] != "message":
                return out  # text after a function call: kept for the stored conversation only
            out += self._event("response.output_text.delta", item_id=self._message_id, output_index=self._open,
                               content_index=0, delta=delta.text, logprobs=[])
        for position, is_new, fragment in self.tools.add(delta.tool_calls or []):
            if is_new:
                out += self._add_item("call", position)
            if fragment:
                out += self._event("response.function_call_arguments.delta", item_id=self._call_id(position),
                                   output_index=self._items.index(("call", position)), delta=fragment)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        return out

    def closing(self, usage: Usage | None, info: dict[str, Any]) -> bytes:
        out = self._start()
        if not any(kind != "reasoning" for kind, _ in self._items):  # an empty answer is one empty message
            out += self._add_item("message", 0)
        out += self._close_item()
        status = self._status()
        name = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(name, response=self._response(status, usage, info))

    def error_frame(self, status: int, message: str, code: str | None, error_type: str) -> bytes:
        return self._event("error", code=code or error_type, message=message, param=None)
