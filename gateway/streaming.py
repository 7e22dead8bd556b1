"""Deltas → OpenAI bodies: one ``chat.completion`` / ``text_completion``, or SSE chunks ending in [DONE].

``ResponseShaper`` is built once per request and knows the wire flavour (chat or completion), the model
name, and what the caller asked for (logprobs, include_usage). It has two modes:

* ``frames(delta)`` → the SSE bytes for one Delta (possibly b""), and ``closing(usage, info)`` → the last
  frames (usage chunk when asked, then ``data: [DONE]``). The chunk of a choice that carries its
  ``finish_reason`` is held back until the next Delta so that the request's last choice chunk can carry
  the ``switchyard`` field (no extra chunk with an empty ``choices`` list unless usage was asked for).
  ``finish_reason`` is sent exactly once per choice.
* ``add(delta)`` to accumulate, then ``body(usage, info)`` → the full response dict.
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
    return out


def _chat_logprob_items(logprobs: tuple[TokenLogprob, ...], top_n: int) -> list[dict[str, Any]]:
    items = []
    for lp in logprobs:
        tops = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top_logprobs[:top_n]]
        items.append({"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                      "top_logprobs": tops})
    return items


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
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
            c.tool_calls.extend(delta.tool_calls)
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
                if c.tool_calls:
                    message["tool_calls"] = c.tool_calls
                    message["content"] = text or None
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
        if not (delta.text or delta.logprobs or delta.tool_calls or delta.finish_reason):
            return out
        if self.kind == "chat":
            d: dict[str, Any] = {}
            if not c.sent_role:
                d["role"] = "assistant"
                c.sent_role = True
            d["content"] = delta.text
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
