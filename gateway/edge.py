"""The HTTP edge: what every request passes before a route sees it, and the one error response.

``Edge`` is the outermost ASGI middleware. For each HTTP request it, in this order:

1. stamps ``scope["state"]["t_start"]`` (perf_counter) for the overhead measurement and
   ``scope["state"]["request_id"]``: the client's ``x-request-id`` or a new one, echoed on every response
   (and ``traceparent`` when the client sent a valid one; both are forwarded to remote pools); the
   ``self_headed`` POST paths (``FastLane``'s) put the header on their responses themselves, so their
   stream chunks pass no wrapper;
   refuses headers over ``limits.max_header_bytes`` in all (431, like nginx's header buffers);
2. on ``/v1/`` paths checks the API key from the headers alone: a missing or wrong key is a 401
   before one byte of the body is read or parsed (an anonymous caller learns nothing about the schema);
3. reads the whole body once, bounded in size (``limits.max_body_bytes`` → 413, checked against
   ``content-length`` first) and in time (``limits.body_read_timeout_s`` for the whole body → 408 and the
   connection closed, like nginx's ``client_body_timeout``: a client that sends headers and stalls
   cannot hold a socket forever);
4. hands the app a ``receive`` that replays the buffered body and then waits for the disconnect, so
   routes never see a partial body and the disconnect watchers work as before.

A client that leaves while uploading is the outcome ``client_gone``: status 499 in the metrics, one
info log line, nothing sent. ``error_response`` is the one place an exception becomes a response and
a counted status: the app's exception handlers, ``FastLane`` and ``Edge`` all call it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from itertools import chain
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import Response

from gateway.errors import (
    ClientGone,
    GatewayError,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
)

log = logging.getLogger("switchyard")

STATUS_CLIENT_GONE = 499  # nginx's "client closed request"
_TRACEPARENT = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")  # W3C trace context, version 00
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def t_start_of(scope: dict[str, Any]) -> float:
    state = scope.get("state") or {}
    return state.get("t_start") or time.perf_counter()


def record_status(scope: dict[str, Any], status: int) -> None:
    """Count a request that ends without an answer from the pipeline (errors, 499). /v1/ paths only."""
    app = scope.get("app")
    pipeline = getattr(getattr(app, "state", None), "pipeline", None)
    if pipeline is None or not scope.get("path", "").startswith("/v1/"):
        return
    if status == 429:
        pipeline.metrics.rate_limited.inc()
    pipeline.record(route="error", model="-", status=status, t_start=t_start_of(scope), overhead_s=None,
                    scope=scope)


def error_response(scope: dict[str, Any], exc: BaseException) -> Response:
    """The response for an exception raised while serving ``scope``, counted once in the metrics.

    GatewayError → its status and the endpoint's error body (OpenAI's, Anthropic's on /v1/messages); ClientGone / ClientDisconnect → 499 with no body (the
    client is gone), logged at info; anything else → 500 ``internal_error`` with the traceback in the log.
    """
    if isinstance(exc, ClientGone | ClientDisconnect):
        log.info("client left before its answer: %s %s", scope.get("method"), scope.get("path"))
        record_status(scope, STATUS_CLIENT_GONE)
        return Response(status_code=STATUS_CLIENT_GONE)
    if not isinstance(exc, GatewayError):
        log.error("unexpected error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
        exc = GatewayError("Internal error in the gateway.", code="internal_error")
    record_status(scope, exc.status_code)
    body = exc.body_bytes()
    if scope.get("path", "").startswith("/v1/messages"):  # Anthropic's SDK reads Anthropic's envelope
        from backends.base import json_bytes
        from gateway.anthropic import error_body

        body = json_bytes(error_body(exc.status_code, exc.message))
    return Response(body, status_code=exc.status_code, media_type="application/json", headers=exc.headers)


class Edge:
    """ASGI middleware; see the module docstring. ``authenticate(scope)`` raises the 401 or returns."""

    def __init__(self, app: Any, *, max_body_bytes: int, body_read_timeout_s: float, max_header_bytes: int,
                 self_headed: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.self_headed = self_headed  # POST paths whose app adds x-request-id to its responses itself
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s
        self.max_header_bytes = max_header_bytes
        self._id_prefix = secrets.token_hex(8)
        self._num_requests = 0
        self._reads: dict[asyncio.Task, float] = {}  # body reads in progress → deadline (monotonic)
        self._timed_out: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["t_start"] = time.perf_counter()
        num_header_bytes, request_id, content_length, traceparent = _header_facts(scope["headers"])
        if traceparent is not None:
            state["traceparent"] = traceparent
        state["request_id"] = request_id = request_id or self._new_request_id()
        app_send = send
        send = _with_request_id(send, request_id)
        if scope["method"] != "POST" or scope["path"] not in self.self_headed:
            app_send = send
        try:
            if num_header_bytes > self.max_header_bytes:
                raise HeadersTooLarge(f"Request headers are larger than {self.max_header_bytes} bytes "
                                      "(limits.max_header_bytes).", code="headers_too_large",
                                      headers={"connection": "close"})
            if scope["path"].startswith("/v1/"):
                _authenticate(scope)
            body = None
            if scope["method"] in _BODY_METHODS:
                if content_length is not None and content_length.isdigit() and int(content_length) > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
                body = await self._read_body(receive)
        except (GatewayError, ClientGone) as e:
            response = error_response(scope, e)
            if response.status_code != STATUS_CLIENT_GONE:
                await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive) if body is not None else receive, app_send)

    def _new_request_id(self) -> str:
        """Unique across replicas and restarts: a random per-process prefix and a counter (cheaper than uuid4)."""
        self._num_requests += 1
        return f"{self._id_prefix}{self._num_requests:08x}"

    async def _read_body(self, receive: Any) -> bytes:
        """The whole body, or 413 / 408 / ClientGone. The read time is watched by one sweeper task for all
        requests (no timer per request): a read still running after ``body_read_timeout_s`` is cancelled."""
        limit = self.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        task = asyncio.current_task()
        self._reads[task] = time.monotonic() + self.body_read_timeout_s
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
            task.uncancel()
            raise RequestTimeout(f"The request body did not arrive within {self.body_read_timeout_s:g} s "
                                 "(limits.body_read_timeout_s).", code="request_timeout",
                                 headers={"connection": "close"}) from None
        finally:
            self._reads.pop(task, None)
            self._timed_out.discard(task)

    async def _sweep(self) -> None:
        """Cancel body reads past their deadline; checks 4 times per timeout (at most every second)."""
        period = min(1.0, self.body_read_timeout_s / 4)
        while self._reads:
            await asyncio.sleep(period)
            now = time.monotonic()
            for task, deadline in list(self._reads.items()):
                if now >= deadline and task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()


def _valid_request_id(value: bytes | None) -> str | None:
    if value is not None and 0 < len(value) <= 128 and all(33 <= c < 127 for c in value):
        return value.decode()
    return None


def _valid_traceparent(value: bytes | None) -> str | None:
    return value.decode() if value is not None and _TRACEPARENT.fullmatch(value) else None


def _header_facts(headers: list[tuple[bytes, bytes]]) -> tuple[int, str | None, bytes | None, str | None]:
    """(bytes of all names and values, the x-request-id, the content-length, the traceparent): of a repeated
    header the last valid one. Without repeats (the usual request) the three are dictionary lookups and the
    size a sum in C; with repeats, one pass in order."""
    by_name = dict(headers)
    if len(by_name) == len(headers):
        return (sum(map(len, chain.from_iterable(headers))), _valid_request_id(by_name.get(b"x-request-id")),
                by_name.get(b"content-length"), _valid_traceparent(by_name.get(b"traceparent")))
    num_bytes, request_id, content_length, traceparent = 0, None, None, None
    for name, value in headers:
        num_bytes += len(name) + len(value)
        if name == b"x-request-id":
            request_id = _valid_request_id(value) or request_id
        elif name == b"content-length":
            content_length = value
        elif name == b"traceparent":
            traceparent = _valid_traceparent(value) or traceparent
    return num_bytes, request_id, content_length, traceparent


def _with_request_id(send: Any, request_id: str) -> Any:
    """``send`` that puts ``x-request-id`` on the response (every response, errors included)."""
    header = (b"x-request-id", request_id.encode())

    def send_with_id(message: dict) -> Any:  # returns send's awaitable: no coroutine frame of its own
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        return send(message)

    return send_with_id


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than {limit} bytes (limits.max_body_bytes).",
                           code="request_too_large", headers={"connection": "close"})


def _authenticate(scope: dict) -> None:
    """401 unless the headers carry a configured key (or the gateway is open). Starting up: no check
    here, the route answers 503."""
    pipeline = getattr(scope["app"].state, "pipeline", None) if "app" in scope else None
    if pipeline is None or pipeline.admitter.is_open:
        return
    from starlette.datastructures import Headers

    from gateway.admission import presented_key

    pipeline.admitter.authenticate(presented_key(Headers(scope=scope)))


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that returns the buffered body once, then defers to the server (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
