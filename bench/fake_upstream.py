"""A fast fake OpenAI-compatible server: the upstream for `switchyard bench gateway` and for failover tests.

``FakeUpstream`` is a plain ASGI app (no framework, pre-encoded bytes) so that its own cost stays far below
the gateway overhead being measured. It answers ``POST /v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` (vector ``[len(str(input)), 0.5, ...]`` of ``dimensions``, default 4)
(stream and non-stream, ``n``, ``logprobs``, ``stream_options.include_usage``), ``GET /v1/models`` and
``GET /healthz``.

A chat request that carries ``tools`` (and no ``tool_choice: "none"``) is answered with tool calls as OpenAI
sends them: ``num_tool_calls`` calls (one when ``parallel_tool_calls`` is false) of the named
``tool_choice`` function or of ``tools`` in turn, each with the arguments ``tool_arguments``, and
finish_reason ``tool_calls``. Streamed, a call's first chunk has its ``index``, ``id``, ``type``, ``name``
and ``arguments: ""``, then its arguments follow in pieces of ``argument_piece_chars`` characters; whole,
``message.tool_calls`` holds the complete calls.

Failure modes for tests (``FakeUpstream.behavior``, changeable while it serves):
  * ``ok``             — a normal answer of ``num_tokens`` tokens;
  * ``error_500``      — HTTP 500 with an OpenAI error body (also fails ``/v1/models``);
  * ``error_400``      — HTTP 400 ``invalid_request_error`` (a client error: not retryable);
  * ``hang``           — accepts the request and never answers (until the client goes away);
  * ``die_mid_stream`` — streams ``die_after_tokens`` tokens, then drops the connection without a
    terminating chunk (non-stream requests: the connection drops before the body).
With ``reasoning_text`` set, a chat answer carries it as vLLM's reasoning parsers send it: whole, as
``message.reasoning_content``; streamed, as ``delta.reasoning_content`` pieces (one per word) before the content.
A refused connection is simply a port nothing listens on (``tests.conftest.free_port()``).

CLI (a separate process for the benchmark):
``python -m bench.fake_upstream --port 9100 [--num-tokens 16] [--token-delay-ms 0] [--model fake-model]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["ok", "error_500", "error_400", "hang", "die_mid_stream"]
MODES: tuple[str, ...] = ("ok", "error_500", "error_400", "hang", "die_mid_stream")


@dataclass
class FakeBehavior:
    """How the fake answers. ``first_token_delay_s`` is waited before anything is sent."""

    mode: Mode = "ok"
    num_tokens: int = 8
    token_text: str = "tok"
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    die_after_tokens: int = 2
    prompt_tokens: int = 7
    tool_arguments: str = "{}"  # the arguments (JSON text) of every tool call
    num_tool_calls: int = 1
    argument_piece_chars: int = 4
    reasoning_text: str = ""  # chat answers' reasoning_content ("" = none)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fake upstream mode {self.mode!r}; valid: {list(MODES)}")


class _Dropped(Exception):
    """Raised inside the app to make uvicorn drop the connection mid-response."""


@dataclass
class FakeUpstream:
    """The ASGI app. ``num_requests`` counts generation requests; ``last_bodies`` keeps the recent ones."""

    name: str = "fake"
    model: str = "fake-model"
    behavior: FakeBehavior = field(default_factory=FakeBehavior)
    num_requests: int = 0
    num_in_flight: int = 0
    last_bodies: list[dict[str, Any]] = field(default_factory=list)
    last_headers: dict[str, str] = field(default_factory=dict)  # of the last generation request
    keep_bodies: int = 50

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in ("/v1/models", "/models"):
            if self.behavior.mode == "error_500":
                return await _send_json(send, 500, _error_body("fake upstream is failing", "server_error"))
            body = {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                 "owned_by": "fake"}]}
            return await _send_json(send, 200, body)
        if method == "GET" and path == "/healthz":
            ok = self.behavior.mode != "error_500"
            return await _send_json(send, 200 if ok else 500, {"status": "ok" if ok else "failing"})
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            body = await _read_body(receive)
            try:
                request = json.loads(body)
            except ValueError:
                return await _send_json(send, 400, _error_body("body is not JSON", "invalid_request_error"))
            self.num_requests += 1
            self.last_headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.last_bodies.append(request)
            del self.last_bodies[: -self.keep_bodies]
            self.num_in_flight += 1
            try:
                await self._generate(send, receive, request, is_chat=path.endswith("chat/completions"))
            finally:
                self.num_in_flight -= 1
            return
        if method == "POST" and path == "/v1/embeddings":
            request = json.loads(await _read_body(receive))
            self.last_bodies.append(request)
            del self.last_bodies[: -self.keep_bodies]
            inputs = request["input"] if isinstance(request["input"], list) else [request["input"]]
            dims = int(request.get("dimensions") or 4)
            data = [{"object": "embedding", "index": i, "embedding": [float(len(str(x))), *[0.5] * (dims - 1)]}
                    for i, x in enumerate(inputs)]
            return await _send_json(send, 200, {"object": "list", "data": data, "model": self.model,
                                                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})
        await _send_json(send, 404, _error_body(f"no route {method} {path}", "not_found"))

    async def _generate(self, send, receive, request: dict[str, Any], *, is_chat: bool) -> None:
        b = self.behavior
        if b.mode == "hang":
            await _wait_disconnect(receive)
            return
        if b.first_token_delay_s:
            await asyncio.sleep(b.first_token_delay_s)
        if b.mode == "error_500":
            return await _send_json(send, 500, _error_body("fake upstream is failing", "server_error"))
        if b.mode == "error_400":
            return await _send_json(send, 400, _error_body("fake upstream rejects this request",
                                                           "invalid_request_error", code="bad_fake"))
        num_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or b.num_tokens)
        num_tokens = min(num_tokens, b.num_tokens)
        n = int(request.get("n") or 1)
        answer = _Answer(self, request, is_chat=is_chat, num_tokens=num_tokens, n=n)
        if request.get("stream"):
            await answer.stream(send, receive)
        else:
            if b.mode == "die_mid_stream":
                raise _Dropped("fake upstream drops the connection")
            await _send_json(send, 200, answer.whole())


class _Answer:
    """One generated answer in both wire shapes."""

    def __init__(self, up: FakeUpstream, request: dict[str, Any], *, is_chat: bool, num_tokens: int, n: int):
        self.up, self.request, self.is_chat, self.num_tokens, self.n = up, request, is_chat, num_tokens, n
        self.id = f"{'chatcmpl' if is_chat else 'cmpl'}-{up.name}-{up.num_requests}"
        self.created = int(time.time())
        lp = request.get("logprobs")
        self.want_logprobs = bool(lp) if is_chat else lp is not None
        self.num_top = int(request.get("top_logprobs") or 0) if is_chat else int(lp or 0)
        self.tools = request.get("tools") if is_chat and request.get("tool_choice") != "none" else None

    def token(self, i: int) -> str:
        return f"{self.up.behavior.token_text}{i} "

    def finish_reason(self) -> str:
        if self.tools:
            return "tool_calls"
        return "length" if self.num_tokens >= int(self.request.get("max_tokens") or 1 << 30) else "stop"

    def usage(self) -> dict[str, Any]:
        p, c = self.up.behavior.prompt_tokens, self.num_tokens * self.n
        out: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if self.up.behavior.reasoning_text:  # OpenAI's breakdown: one reasoning token per word here
            out["completion_tokens_details"] = {"reasoning_tokens": len(self.up.behavior.reasoning_text.split())}
        return out

    def tool_calls(self) -> list[dict[str, Any]]:
        """The whole calls of one choice (OpenAI's ``message.tool_calls``)."""
        b, choice = self.up.behavior, self.request.get("tool_choice")
        num = 1 if self.request.get("parallel_tool_calls") is False else b.num_tool_calls
        calls = []
        for i in range(num):
            name = (choice["function"]["name"] if isinstance(choice, dict) else
                    self.tools[i % len(self.tools)].get("function", {}).get("name", "tool"))
            calls.append({"id": f"call_{self.up.num_requests}_{i}", "type": "function",
                          "function": {"name": name, "arguments": b.tool_arguments}})
        return calls

    def tool_call_pieces(self) -> list[dict[str, Any]]:
        """The stream deltas' ``tool_calls`` items, one per chunk: id, type and name with empty arguments
        first, then the arguments in pieces of ``argument_piece_chars``."""
        step = max(1, self.up.behavior.argument_piece_chars)
        pieces = []
        for i, call in enumerate(self.tool_calls()):
            fn, args = call["function"], call["function"]["arguments"]
            pieces.append({"index": i, "id": call["id"], "type": "function",
                           "function": {"name": fn["name"], "arguments": ""}})
            pieces += [{"index": i, "function": {"arguments": args[k:k + step]}} for k in range(0, len(args), step)]
        return pieces

    def _chat_logprobs(self, tokens: list[str]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {"content": [{"token": t, "logprob": -0.5, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": t if k == 0 else f"alt{k}", "logprob": -0.5 - k,
                                               "bytes": None} for k in range(self.num_top)]}
                            for t in tokens]}

    def _completion_logprobs(self, tokens: list[str], offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
                "top_logprobs": [{t: -0.5, **{f"alt{k}": -0.5 - k for k in range(1, self.num_top)}}
                                 for t in tokens] if self.num_top else None,
                "text_offset": offsets}

    def whole(self) -> dict[str, Any]:
        tokens = [self.token(i) for i in range(self.num_tokens)]
        choices = []
        for idx in range(self.n):
            if self.is_chat:
                message: dict[str, Any] = {"role": "assistant", "content": None if self.tools else "".join(tokens)}
                if self.tools:
                    message["tool_calls"] = self.tool_calls()
                if self.up.behavior.reasoning_text:
                    message["reasoning_content"] = self.up.behavior.reasoning_text
                choices.append({"index": idx, "message": message, "logprobs": self._chat_logprobs(tokens),
                                "finish_reason": self.finish_reason()})
            else:
                choices.append({"index": idx, "text": "".join(tokens),
                                "logprobs": self._completion_logprobs(tokens, 0),
                                "finish_reason": self.finish_reason()})
        obj = "chat.completion" if self.is_chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.up.model,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, choices: list[dict[str, Any]], usage: dict | None = None) -> bytes:
        obj = "chat.completion.chunk" if self.is_chat else "text_completion"
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.up.model,
                                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    async def stream(self, send, receive) -> None:
        b = self.up.behavior
        watcher = None
        if b.token_delay_s:  # slow streams notice a client that went away (uvicorn's send() would not say)
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await self._stream(send, watcher)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _stream(self, send, watcher) -> None:
        b = self.up.behavior
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        if self.is_chat:
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(self.n)]
            await send({"type": "http.response.body", "body": self._chunk(first), "more_body": True})
            for piece in re.findall(r"\S+\s*", b.reasoning_text):
                chunk = [{"index": i, "delta": {"reasoning_content": piece}, "logprobs": None, "finish_reason": None}
                         for i in range(self.n)]
                await send({"type": "http.response.body", "body": self._chunk(chunk), "more_body": True})
        if self.tools:
            for i in range(self.n):
                for piece in self.tool_call_pieces():
                    c = {"index": i, "delta": {"tool_calls": [piece]}, "logprobs": None, "finish_reason": None}
                    await send({"type": "http.response.body", "body": self._chunk([c]), "more_body": True})
        else:
            offset = 0
            for t in range(self.num_tokens):
                if b.mode == "die_mid_stream" and t >= b.die_after_tokens:
                    raise _Dropped("fake upstream drops the connection mid-stream")
                if b.token_delay_s and t:
                    await asyncio.sleep(b.token_delay_s)
                if watcher is not None and watcher.done():
                    return
                tok = self.token(t)
                chunks = []
                for i in range(self.n):
                    if self.is_chat:
                        chunks.append({"index": i, "delta": {"content": tok},
                                       "logprobs": self._chat_logprobs([tok]), "finish_reason": None})
                    else:
                        chunks.append({"index": i, "text": tok, "logprobs": self._completion_logprobs([tok], offset),
                                       "finish_reason": None})
                offset += len(tok)
                await send({"type": "http.response.body", "body": self._chunk(chunks), "more_body": True})
        finish = self.finish_reason()
        last = [({"index": i, "delta": {}, "logprobs": None, "finish_reason": finish} if self.is_chat else
                 {"index": i, "text": "", "logprobs": None, "finish_reason": finish}) for i in range(self.n)]
        tail = self._chunk(last)
        if (self.request.get("stream_options") or {}).get("include_usage"):
            tail += self._chunk([], usage=self.usage())
        tail += b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def _error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fake_upstream", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake-model")
    p.add_argument("--num-tokens", type=int, default=16)
    p.add_argument("--token-delay-ms", type=float, default=0.0)
    p.add_argument("--first-token-delay-ms", type=float, default=0.0)
    p.add_argument("--mode", default="ok", choices=MODES)
    args = p.parse_args(argv)
    import uvicorn

    behavior = FakeBehavior(mode=args.mode, num_tokens=args.num_tokens, token_delay_s=args.token_delay_ms / 1e3,
                            first_token_delay_s=args.first_token_delay_ms / 1e3)
    app = FakeUpstream(name=f"fake{args.port}", model=args.model, behavior=behavior)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", backlog=4096, timeout_keep_alive=60)


if __name__ == "__main__":
    main()
