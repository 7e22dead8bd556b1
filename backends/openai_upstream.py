"""A Backend for any OpenAI-compatible server (vLLM, SGLang, llama.cpp, a cloud API).

One ``OpenAIUpstream`` is one replica: one base URL ending in ``/v1``, with its connections opened by
``load()`` and released by ``close()``. Transport (``client``):
  * ``"httpx"``: one ``httpx.AsyncClient`` (connection pool, HTTP/1.1 keep-alive, TLS, proxies) — always
    used for ``https://`` URLs and for ``health()``;
  * ``"lean"``: ``Http1Pool`` below, a minimal keep-alive HTTP/1.1 pool over asyncio streams for plain
    ``http://`` upstreams on a trusted network (vLLM / SGLang / llama.cpp beside the gateway). It exists
    for speed: on the 2-core dev box a loopback request costs ~0.03 ms CPU with it vs ~0.9 ms with httpx;
  * ``"auto"`` (default): lean for ``http://``, httpx for ``https://``.

Contract (see ``backends/base.py``):
  * ``generate`` streams ``/chat/completions`` (``messages``) or ``/completions`` (``prompt``) with
    ``stream_options.include_usage`` and maps every SSE chunk to ``Delta``s; the finish Deltas are held
    back until the stream ends so the last one can carry ``is_final=True`` and the usage;
  * ``generate(request, stream=False)`` asks the upstream for one JSON answer instead (cheaper when the
    caller buffers anyway); the Deltas it yields are the same, one per choice;
  * errors become ``BackendError``: connect error, 5xx, 429, timeout, a broken stream → ``retryable=True``
    before the first Delta; other 4xx → ``retryable=False`` with the upstream's status, message and code;
    anything after the first Delta → ``after_first_token=True`` (not retryable);
  * ``request.deadline`` bounds every read; a passed deadline is ``BackendError(504, "deadline_exceeded")``;
  * closing the generator (client disconnect) closes the upstream response, which aborts the request there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from backends.base import BackendError, Delta, GenerationRequest, TokenLogprob, Usage, json_bytes

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


def display_url(url: str) -> str:
    """``url`` without user:password@ and without a ?query (where API keys hide): safe for names, logs and
    admin views. Anything that is not an absolute URL comes back unchanged."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class OpenAIUpstream:
    """One remote OpenAI-compatible server. ``model`` is the upstream model id sent in every request."""

    supports_buffered = True  # generate(..., stream=False) is understood (backends/pool.py uses it)

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 2.0,
        supports_tools: bool = False,
        supports_json_mode: bool = False,
        supports_vision: bool = False,
        max_connections: int = 1024,
        health_timeout_s: float | None = None,
        client: Literal["auto", "httpx", "lean"] = "auto",
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeout_s and connect_timeout_s must be > 0")
        if client not in ("auto", "httpx", "lean"):
            raise ValueError(f"client must be 'auto', 'httpx' or 'lean', got {client!r}")
        if client == "lean" and not base_url.startswith("http://"):
            raise ValueError("client 'lean' speaks plain http:// only; use 'httpx' for https://")
        self.client_kind = "lean" if client == "lean" or (client == "auto" and base_url.startswith("http://")) \
            else "httpx"
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.supports_tools = supports_tools
        self.supports_json_mode = supports_json_mode
        self.supports_vision = supports_vision
        self.max_connections = max_connections
        self.health_timeout_s = health_timeout_s or max(connect_timeout_s, 1.0)
        self._client: httpx.AsyncClient | None = None
        self._lean: Http1Pool | None = None
        # the lean client bounds every request by request.deadline itself (backends/pool.py reads this)
        self.enforces_deadline = self.client_kind == "lean"

    def __repr__(self) -> str:
        return f"OpenAIUpstream({self.name!r}, {self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        if self._client is not None:
            return
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            limits=httpx.Limits(max_connections=self.max_connections,
                                max_keepalive_connections=self.max_connections, keepalive_expiry=60.0),
            http1=True,
            http2=False,
            trust_env=self.base_url.startswith("https://"),  # HTTPS_PROXY etc. for cloud APIs only
        )
        if self.client_kind == "lean":
            headers_bytes = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
            self._lean = Http1Pool(self.base_url, self.max_connections, extra_headers=headers_bytes)

    async def close(self) -> None:
        client, self._client = self._client, None
        lean, self._lean = self._lean, None
        if lean is not None:
            lean.close()
        if client is not None:
            await client.aclose()

    async def health(self) -> bool:
        """True when ``GET /models`` (or ``GET /healthz`` beside ``/v1``) answers 200 in time."""
        client = await self._ensure_client()
        timeout = httpx.Timeout(self.health_timeout_s)
        try:
            r = await client.get("/models", timeout=timeout)
            if r.status_code == 404:
                root = self.base_url.removesuffix("/v1")
                r = await client.get(f"{root}/healthz", timeout=timeout)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def num_prompt_tokens(self, request: GenerationRequest) -> int | None:
        return None

    async def _ensure_client(self) -> httpx.AsyncClient:
        if self._client is None:
            await self.load()
        assert self._client is not None, "load() must create the client"
        return self._client

    # ------------------------------------------------------------------------------- request

    def build_payload(self, request: GenerationRequest, *, stream: bool) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) for this request: ``request.sampling`` (validated already) serialised in
        OpenAI's fields, vLLM's extra fields only when set. Raises BackendError(400) for features this
        upstream lacks."""
        s = request.sampling
        is_chat = request.messages is not None
        if request.tools and not self.supports_tools:
            raise BackendError(f"model pool replica {self.name} does not support tools", retryable=False,
                               status_code=400, code="tools_not_supported")
        if not self.supports_vision and request.has_images:
            raise BackendError(f"model pool replica {self.name} does not accept image input", retryable=False,
                               status_code=400, code="image_input_not_supported", param="messages")
        rf_type = (request.response_format or {}).get("type", "text")
        if rf_type != "text" and not self.supports_json_mode:
            raise BackendError(f"model pool replica {self.name} does not support response_format {rf_type!r}",
                               retryable=False, status_code=400, code="response_format_not_supported")
        body: dict[str, Any] = {"model": self.model, "stream": stream, "max_tokens": s.max_tokens,
                                "temperature": s.temperature, "top_p": s.top_p}
        if is_chat:
            body["messages"] = request.messages
        else:
            body["prompt"] = request.prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.n != 1:
            body["n"] = request.n
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.logprobs is not None:
            if is_chat:
                body["logprobs"] = True
                if s.logprobs:
                    body["top_logprobs"] = s.logprobs
            else:
                body["logprobs"] = s.logprobs
        # Non-OpenAI sampling knobs (vLLM / SGLang / llama.cpp accept them): sent only when set.
        if s.top_k != -1:
            body["top_k"] = s.top_k
        if s.min_p:
            body["min_p"] = s.min_p
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)
        if request.session_id is not None:
            body["prompt_cache_key"] = request.session_id
        if request.tools:
            body["tools"] = request.tools
            if request.tool_choice is not None:
                body["tool_choice"] = request.tool_choice
            if request.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = request.parallel_tool_calls
        if request.response_format is not None and rf_type != "text":
            body["response_format"] = request.response_format
        if request.user is not None:
            body["user"] = request.user
        if s.logit_bias:
            body["logit_bias"] = {str(token_id): bias for token_id, bias in s.logit_bias}
        if request.chat_template_kwargs and is_chat:
            body["chat_template_kwargs"] = request.chat_template_kwargs
        return ("/chat/completions" if is_chat else "/completions"), body

    def _timeout(self, request: GenerationRequest) -> tuple[float, float]:
        """(connect, read) seconds for this request."""
        read = self.timeout_s
        if request.deadline is not None:
            remaining = request.deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(f"deadline passed before calling {self.name}", retryable=False,
                                   status_code=504, code="deadline_exceeded")
            read = min(read, remaining)
        return min(self.connect_timeout_s, read), read

    @contextlib.asynccontextmanager
    async def _post(self, path: str, body: dict[str, Any], timeout: tuple[float, float],
                    request_deadline: float | None = None, headers: dict[str, str] | None = None):
        """A response with ``status_code``, ``aread()``, ``aiter_bytes()``; closed (or pooled) on exit."""
        await self._ensure_client()
        if self._lean is not None:
            data = json_bytes(body)
            deadline = None
            if request_deadline is not None:  # time.monotonic() → loop time
                deadline = asyncio.get_running_loop().time() + (request_deadline - time.monotonic())
            async with self._lean.post(path, data, connect_timeout_s=timeout[0], read_timeout_s=timeout[1],
                                       deadline=deadline, headers=headers) as r:
                yield r
            return
        assert self._client is not None, "load() must create the client"
        t = httpx.Timeout(timeout[1], connect=timeout[0])
        async with self._client.stream("POST", path, json=body, timeout=t, headers=headers) as response:
            yield response

    async def generate(self, request: GenerationRequest, stream: bool = True) -> AsyncIterator[Delta]:
        """Stream the answer as Deltas (see the module docstring for errors and cancellation)."""
        path, body = self.build_payload(request, stream=stream)
        timeout = self._timeout(request)
        is_chat = request.messages is not None
        num_yielded = 0
        try:
            headers = request.trace_headers
            if request.session_id is not None:  # downstream routers (vLLM, SGLang) keep affinity too
                headers = {**headers, "x-session-id": request.session_id}
            async with self._post(path, body, timeout, request.deadline, headers) as response:
                if response.status_code != 200:
                    raise self._status_error(response.status_code, await response.aread())
                if not stream:
                    content = await response.aread()
                    for delta in self._whole_to_deltas(_json(content, self.name), is_chat):
                        yield delta
                    return
                parser = _StreamParser(is_chat=is_chat, n=request.n, name=self.name)
                pending = b""
                async for data in response.aiter_bytes():  # read to the end: the connection stays reusable
                    lines = (pending + data).split(b"\n")
                    pending = lines.pop()
                    events = [line[5:].strip() for line in lines if line.startswith(b"data:")]
                    for delta in _coalesce(parser.feed_many(events)):
                        num_yielded += 1
                        yield delta
                    if request.deadline is not None and time.monotonic() > request.deadline:
                        raise BackendError(f"deadline passed while streaming from {self.name}",
                                           retryable=False, status_code=504, code="deadline_exceeded",
                                           after_first_token=num_yielded > 0)
                if pending.startswith(b"data:"):
                    for delta in parser.feed_many([pending[5:].strip()]):
                        num_yielded += 1
                        yield delta
                for delta in parser.finish():
                    num_yielded += 1
                    yield delta
        except BackendError as e:
            if num_yielded and not e.after_first_token:
                raise BackendError(e.message, retryable=False, status_code=e.status_code, code=e.code,
                                   after_first_token=True) from e
            raise
        except (httpx.ConnectError, UpstreamConnectError) as e:
            raise self._transport_error(e, "connection failed", 502, "upstream_connect_error", num_yielded) from None
        except (httpx.TimeoutException, TimeoutError) as e:
            if request.deadline is not None and time.monotonic() >= request.deadline:
                raise BackendError(f"request deadline passed while waiting for {self.name}", retryable=False,
                                   status_code=504, code="deadline_exceeded",
                                   after_first_token=num_yielded > 0) from None
            raise self._transport_error(e, "timed out", 504, "upstream_timeout", num_yielded) from None
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            raise self._transport_error(e, "broke the connection", 502, "upstream_error", num_yielded) from None

    def _transport_error(self, e: Exception, what: str, status: int, code: str, num_yielded: int) -> BackendError:
        after = num_yielded > 0
        return BackendError(f"upstream {self.name} {what}: {type(e).__name__}: {e}".rstrip(": "),
                            retryable=not after, status_code=status, code=code, after_first_token=after)

    def _status_error(self, status: int, content: bytes) -> BackendError:
        # No replica address in the message: a 4xx message reaches the caller as it is.
        message, code = f"upstream answered HTTP {status}", None
        try:
            err = json.loads(content).get("error")
            if isinstance(err, dict):
                message = f"{message}: {err.get('message') or ''}".rstrip(": ")
                code = err.get("code") if isinstance(err.get("code"), str) else None
            elif isinstance(err, str):
                message = f"{message}: {err}"
        except (ValueError, AttributeError):
            pass
        if status >= 500 or status in _RETRYABLE_STATUS:
            return BackendError(message, retryable=True, status_code=502 if status >= 500 else status,
                                code=code or "upstream_error")
        return BackendError(message, retryable=False, status_code=status, code=code)

    def _whole_to_deltas(self, obj: dict[str, Any], is_chat: bool) -> list[Delta]:
        choices = sorted(obj.get("choices") or [], key=lambda c: c.get("index", 0))
        if not choices:
            raise BackendError(f"upstream {self.name} answered without choices", retryable=True, code="upstream_error")
        deltas = []
        num_completion = 0
        usage = _usage(obj.get("usage"))
        last = len(choices) - 1
        for i, c in enumerate(choices):
            if is_chat:
                msg = c.get("message") or {}
                text = msg.get("content") or ""
                reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
                tool_calls = msg.get("tool_calls")
                if tool_calls:
                    tool_calls = [{"index": i, **tc} if "index" not in tc else tc for i, tc in enumerate(tool_calls)]
                logprobs = _chat_logprobs(c.get("logprobs"))
            else:
                text, tool_calls, reasoning = c.get("text") or "", None, ""
                logprobs = _completion_logprobs(c.get("logprobs"))
            num_completion += len(logprobs) or (1 if text else 0)
            final = i == last  # the last Delta carries the usage (counted from the choices if none was sent)
            deltas.append(Delta(index=c.get("index", 0), text=text, logprobs=logprobs, reasoning=reasoning,
                                finish_reason=_finish(c.get("finish_reason")), tool_calls=tool_calls or None,
                                is_final=final, usage=(usage or Usage(0, num_completion)) if final else None))
        return deltas


class _StreamParser:
    """Turns OpenAI stream chunks into Deltas; holds finish Deltas back until ``finish()``."""

    def __init__(self, *, is_chat: bool, n: int, name: str) -> None:
        self.is_chat, self.n, self.name = is_chat, n, name
        self.finished: list[Delta] = []
        self.usage: Usage | None = None
        self.num_content_chunks = 0
        self.is_done = False

    def feed_many(self, events: list[bytes]) -> list[Delta]:
        """Deltas of the SSE ``data:`` payloads received together; ``[DONE]`` and anything after it is ignored."""
        out: list[Delta] = []
        for event in events:
            if self.is_done or event == b"[DONE]":
                self.is_done = True
                continue
            out.extend(self.feed(_json(event, self.name)))
        return out

    def feed(self, chunk: dict[str, Any]) -> list[Delta]:
        if "error" in chunk and not chunk.get("choices"):
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise BackendError(f"upstream {self.name} sent an error event: {message}", retryable=True,
                               code="upstream_error")
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        out = []
        for c in chunk.get("choices") or ():
            index = c.get("index", 0)
            if self.is_chat:
                d = c.get("delta") or {}
                text, tool_calls = d.get("content") or "", d.get("tool_calls")
                reasoning = d.get("reasoning_content") or d.get("reasoning") or ""
                logprobs = _chat_logprobs(c.get("logprobs"))
            else:
                text, tool_calls, reasoning = c.get("text") or "", None, ""
                logprobs = _completion_logprobs(c.get("logprobs"))
            finish = _finish(c.get("finish_reason"))
            if text or logprobs or tool_calls or reasoning:
                self.num_content_chunks += 1
                out.append(Delta(index=index, text=text, logprobs=logprobs, tool_calls=tool_calls or None,
                                 reasoning=reasoning))
            if finish is not None:
                self.finished.append(Delta(index=index, finish_reason=finish))
        return out

    def finish(self) -> list[Delta]:
        seen = {d.index for d in self.finished}
        if len(seen) < self.n:
            raise BackendError(f"upstream {self.name} ended the stream before every choice finished",
                               retryable=True, code="upstream_incomplete_stream")
        usage = self.usage or Usage(0, self.num_content_chunks)
        last = self.finished[-1]  # a finish Delta: index and finish_reason only (feed)
        return [*self.finished[:-1], Delta(index=last.index, finish_reason=last.finish_reason, is_final=True,
                                           usage=usage)]


class UpstreamConnectError(OSError):
    """The lean client could not open a connection (refused, unreachable, or connect timeout)."""


class _IdleTimer:
    """Aborts a connection when no byte arrived for ``timeout_s`` or ``deadline`` (loop time) passed.

    One TimerHandle per request, re-armed lazily (``touch()`` only records the time), instead of a
    timeout context around every read of a stream. After it fired, reads see EOF and ``fired`` is True.
    """

    def __init__(self, writer: asyncio.StreamWriter, timeout_s: float, deadline: float | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.writer, self.timeout_s, self.deadline = writer, timeout_s, deadline
        self.last = self.loop.time()
        self.fired = False
        self.handle = self.loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        due = self.last + self.timeout_s
        return due if self.deadline is None else min(due, self.deadline)

    def touch(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        due = self._due()
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self._check)
            return
        self.fired = True
        self.writer.transport.abort()

    def cancel(self) -> None:
        self.handle.cancel()


class Http1Response:
    """One response on a pooled connection. Read the body with ``aread()`` or ``aiter_bytes()``."""

    def __init__(self, reader: asyncio.StreamReader, status_code: int, headers: dict[bytes, bytes],
                 timer: _IdleTimer) -> None:
        self.reader, self.status_code, self.headers, self.timer = reader, status_code, headers, timer
        self.is_complete = False
        self.is_reusable = headers.get(b"connection", b"").lower() != b"close"

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        r, touch = self.reader, self.timer.touch
        try:
            if b"content-length" in self.headers:
                remaining = int(self.headers[b"content-length"])
                while remaining > 0:
                    data = await r.read(min(remaining, 65536))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", remaining)
                    touch()
                    remaining -= len(data)
                    yield data
            elif self.headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size = int((await r.readuntil(b"\n")).split(b";")[0].strip() or b"x", 16)
                    if size == 0:
                        while (await r.readline()) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    data = await r.readexactly(size + 2)
                    touch()
                    yield data[:-2]
            else:  # body until the server closes
                self.is_reusable = False
                while data := await r.read(65536):
                    touch()
                    yield data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            if self.timer.fired:
                raise TimeoutError("no data from the upstream in time") from None
            if isinstance(e, asyncio.LimitOverrunError):
                raise ValueError("a chunk-size line of the upstream's response is over 64 KiB") from None
            raise
        if self.timer.fired:
            raise TimeoutError("no data from the upstream in time")
        self.is_complete = True

    async def aread(self) -> bytes:
        if b"content-length" not in self.headers:
            return b"".join([chunk async for chunk in self.aiter_bytes()])
        try:  # the whole body in one read (no generator on the common path)
            data = await self.reader.readexactly(int(self.headers[b"content-length"]))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            if self.timer.fired:
                raise TimeoutError("no data from the upstream in time") from None
            raise
        if self.timer.fired:
            raise TimeoutError("no data from the upstream in time")
        self.is_complete = True
        return data


class Http1Pool:
    """Minimal keep-alive HTTP/1.1 client for one plain-http origin: POST only, no TLS, no redirects.

    At most ``max_connections`` are open at once (extra requests wait). A connection returns to the pool
    only after its response was read to the end; anything else (error, early close) closes it. A request
    on a reused connection that the server had closed while idle is retried once on a fresh connection.
    ``read_timeout_s`` is an idle timeout (no byte for that long); ``deadline`` (loop time) bounds it all.
    """

    def __init__(self, base_url: str, max_connections: int = 1024, extra_headers: bytes = b"") -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"Http1Pool needs an http:// URL with a host, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.extra_headers = extra_headers
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(max_connections) if max_connections > 0 else None
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode()

    async def _connect(self, timeout_s: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as e:
            raise UpstreamConnectError(f"{self.host}:{self.port}: {type(e).__name__}: {e}") from None

    @contextlib.asynccontextmanager
    async def post(self, path: str, body: bytes, *, connect_timeout_s: float, read_timeout_s: float,
                   deadline: float | None = None, headers: dict[str, str] | None = None):
        extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) if headers else b""
        head = (b"POST " + (self.prefix + path).encode() + b" HTTP/1.1\r\n" + self._host_header
                + b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
                + self.extra_headers + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        if self.slots is not None:
            await self.slots.acquire()
        conn = None
        timer = None
        try:
            for attempt in (0, 1):
                reused = attempt == 0 and bool(self.idle)  # the retry always gets a fresh connection
                conn = self.idle.pop() if reused else await self._connect(connect_timeout_s)
                reader, writer = conn
                timer = _IdleTimer(writer, read_timeout_s, deadline)
                try:
                    writer.write(head + body)
                    await writer.drain()
                    try:  # the status line and the headers in one read
                        head_lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
                    except asyncio.IncompleteReadError as e:
                        if not e.partial:
                            raise ConnectionResetError("server closed the connection") from None
                        raise ValueError("the upstream closed the connection inside a response head") from None
                    except asyncio.LimitOverrunError:
                        raise ValueError("the upstream's response head is over 64 KiB") from None
                    headers: dict[bytes, bytes] = {}
                    for line in head_lines[1:-2]:
                        key, _, value = line.partition(b":")
                        headers[key.strip().lower()] = value.strip()
                    status = int(head_lines[0].split(None, 2)[1])
                    break
                except (ConnectionError, IndexError, ValueError):
                    writer.close()
                    conn = None
                    timer.cancel()
                    if timer.fired:
                        raise TimeoutError("no response from the upstream in time") from None
                    if not reused or attempt:
                        raise
            response = Http1Response(reader, status, headers, timer)
            try:
                yield response
            finally:
                if response.is_complete and response.is_reusable:
                    self.idle.append(conn)
                else:
                    conn[1].close()
                conn = None
        except BaseException:
            if conn is not None:
                conn[1].close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if self.slots is not None:
                self.slots.release()

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def _coalesce(deltas: list[Delta]) -> list[Delta]:
    """Merge consecutive text Deltas of one choice that arrived in the same read (fewer, larger chunks
    downstream when the upstream is faster than the client; text and logprobs are kept in order)."""
    if len(deltas) < 2:
        return deltas
    out = [deltas[0]]
    for d in deltas[1:]:
        last = out[-1]
        if d.index == last.index and not d.tool_calls and not last.tool_calls:
            out[-1] = replace(last, text=last.text + d.text, logprobs=last.logprobs + d.logprobs)
        else:
            out.append(d)
    return out


def _json(data: str | bytes, name: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:  # the stdlib also reads NaN / Infinity, which some servers emit in logprobs
            obj = json.loads(data)
        except ValueError:
            raise BackendError(f"upstream {name} sent invalid JSON: {data[:80]!r}", retryable=True,
                               code="upstream_bad_response") from None
    if not isinstance(obj, dict):
        raise BackendError(f"upstream {name} sent a non-object JSON", retryable=True, code="upstream_bad_response")
    return obj


def _finish(reason: Any) -> Any:
    if reason is None:
        return None
    return reason if reason in ("stop", "length", "tool_calls", "content_filter", "abort") else "stop"


def _usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    def detail(field: str, key: str) -> int:  # an upstream's optional breakdown; anything malformed counts 0
        value = u.get(field)
        count = value.get(key) if isinstance(value, dict) else None
        return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0

    return Usage(prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0),
                 cached_tokens=detail("prompt_tokens_details", "cached_tokens"),
                 reasoning_tokens=detail("completion_tokens_details", "reasoning_tokens"))


def _chat_logprobs(lp: Any) -> tuple[TokenLogprob, ...]:
    if not isinstance(lp, dict) or not lp.get("content"):
        return ()
    return tuple(TokenLogprob(token=t.get("token", ""), logprob=float(t.get("logprob", 0.0)),
                              top_logprobs=tuple((x.get("token", ""), float(x.get("logprob", 0.0)))
                                                 for x in t.get("top_logprobs") or ()))
                 for t in lp["content"])


def _completion_logprobs(lp: Any) -> tuple[TokenLogprob, ...]:
    if not isinstance(lp, dict) or not lp.get("tokens"):
        return ()
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    out = []
    for tok, logprob, top in zip(lp["tokens"], lp.get("token_logprobs") or [], tops, strict=False):
        ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])
        out.append(TokenLogprob(token=tok, logprob=float(logprob if logprob is not None else 0.0),
                                top_logprobs=tuple((t, float(v)) for t, v in ranked)))
    return tuple(out)
