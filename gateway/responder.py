"""The responder: a parsed request → a Job → the pipeline → the endpoint's HTTP response.

What every generation route runs (the FastAPI routes and ``FastLane`` alike): the wire request becomes a
``Job`` (its one ``SamplingParams``), ``respond`` runs ``Pipeline.run`` and shapes the Deltas with the
endpoint's shaper (chat/completion chunks, Responses events, Anthropic events) into one body or an SSE
stream, counts the request once, and aborts the backend when the client leaves (one disconnect watcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from backends.base import BackendError, Delta, SamplingParams, Usage, json_bytes
from gateway.admission import presented_key
from gateway.edge import STATUS_CLIENT_GONE
from gateway.errors import ClientGone, InvalidRequest, from_backend_error
from gateway.pipeline import Execution, Job, Pipeline
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, FieldError
from gateway.streaming import ResponseShaper

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in ((400, "invalid request, or refused by the guard (code out_of_domain / unsafe_content)"),
                         (401, "missing or wrong API key"), (403, "model not allowed for this key"),
                         (404, "unknown model (code model_not_found)"), (413, "request body too large"),
                         (429, "rate limit"), (502, "backend failed"), (503, "no healthy replica"),
                         (504, "request deadline passed"))
}
# Declaring 4XX also keeps FastAPI from documenting a 422 that the gateway never sends (validation → 400).
ERROR_RESPONSES["4XX"] = {"model": ErrorResponse, "description": "other client errors, OpenAI envelope"}


def stream_response_doc(schema_ref: str, ending: str = "`data: [DONE]`") -> dict[str, Any]:
    return {"description": "JSON body, or with `stream: true` a `text/event-stream` of `data: <chunk>` events "
                           f"({schema_ref}) ending with {ending}",
            "content": {"text/event-stream": {"schema": {
                "type": "object", "description": "one server-sent event", "required": ["data"],
                "properties": {"data": {"type": "string", "description": f"JSON of a {schema_ref}, or [DONE]"},
                               "event": {"type": "string"}, "id": {"type": "string"},
                               "retry": {"type": "integer"}}}}}}


def invalid_request(errors: list[dict[str, Any]]) -> InvalidRequest:
    """A pydantic error list → the 400: its message lists the first five problems ('where: what'), its
    ``param`` is the first one's field in OpenAI's form (``messages[0].content``), or the ``param`` (and
    ``code``) of a ``FieldError`` that a model validator raised."""
    parts, param, code = [], None, None
    for e in errors[:5]:
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            param, code = param or cause.param, code or cause.code
            parts.append(str(cause))
            continue
        where = _param_path(p for p in e.get("loc", ()) if p != "body")
        param = param or (where or None)
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return InvalidRequest("Invalid request: " + "; ".join(parts or ["malformed body"]), param=param, code=code)


def _param_path(loc: Any) -> str:
    """A pydantic location as OpenAI writes a ``param``: ``("tools", 0, "function")`` → ``tools[0].function``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _headers(request: Request) -> dict[str, str]:
    """The request's headers by (lowercase) name, the first of a repeated one as starlette's ``Headers.get``
    gives it: one pass for every lookup of a request (``Headers.get`` scans the list and raises inside for
    each header that is absent)."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(request.scope["headers"])}


def _hint(body: ChatCompletionRequest | CompletionRequest, headers: dict[str, str]) -> Any:
    """The routing hint (``routers.policy.parse_hint``): body ``switchyard`` field or x-switchyard-* headers."""
    from routers.policy import HINT_HEADER, SHARE_HEADER, parse_hint

    body_value = body.switchyard.model_dump(exclude_none=True, exclude={"session_id"}) if body.switchyard else None
    if body_value is None and HINT_HEADER not in headers and SHARE_HEADER not in headers:
        return None  # no hint (parse_hint would scan the headers to say so)
    try:
        return parse_hint(body_value, headers)
    except ValueError as e:
        raise InvalidRequest(str(e), param="switchyard") from None


def _sampling_params(body: ChatCompletionRequest | CompletionRequest, default_max_tokens: int) -> SamplingParams:
    """``body.to_sampling_params``; an invalid value is a 400 naming the field, whatever pool answers."""
    try:
        return body.to_sampling_params(default_max_tokens)
    except ValueError as e:
        raise InvalidRequest(f"Invalid request: {e}", param=getattr(e, "param", None)) from None


def _session(body: ChatCompletionRequest | CompletionRequest, headers: dict[str, str]) -> tuple[str | None, str | None]:
    """(session id, program id): ``gateway.sessions.session_of``'s precedence."""
    from gateway.sessions import session_of

    named = body.switchyard.session_id if body.switchyard else None
    return session_of(headers, named, body.prompt_cache_key, body.user)


def chat_job(body: ChatCompletionRequest, request: Request, default_max_tokens: int) -> Job:
    state = request.scope.get("state") or {}
    headers = _headers(request)
    session_id, program_id = _session(body, headers)
    return Job(kind="chat", model=body.model, messages=[m.to_backend() for m in body.messages], prompt=None,
               sampling=_sampling_params(body, default_max_tokens), stream=bool(body.stream),
               tools=body.tools_for_backend(), tool_choice=body.tool_choice_for_backend(),
               parallel_tool_calls=body.parallel_tool_calls, response_format=body.response_format_for_backend(),
               chat_template_kwargs=body.chat_template_kwargs,
               user=body.user, hint=_hint(body, headers), priority=body.priority or 0,
               t_start=state.get("t_start") or time.perf_counter(), correlation_id=state.get("request_id"),
               traceparent=state.get("traceparent"), state=state, session_id=session_id, program_id=program_id)


def completion_job(body: CompletionRequest, request: Request, default_max_tokens: int) -> Job:
    state = request.scope.get("state") or {}
    headers = _headers(request)
    session_id, program_id = _session(body, headers)
    return Job(kind="completion", model=body.model, messages=None, prompt=body.prompt_value(),
               sampling=_sampling_params(body, default_max_tokens), stream=bool(body.stream), user=body.user,
               hint=_hint(body, headers), priority=body.priority or 0,
               t_start=state.get("t_start") or time.perf_counter(), correlation_id=state.get("request_id"),
               traceparent=state.get("traceparent"), state=state, session_id=session_id, program_id=program_id)


async def complete(pipeline: Pipeline, body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
    """A parsed chat or completion body → its response: what the FastAPI routes and ``FastLane`` both run."""
    if body.max_tokens is not None or getattr(body, "max_completion_tokens", None) is not None:
        _check_token_fields(body, pipeline.settings.limits.max_completion_tokens)
    if isinstance(body, ChatCompletionRequest):
        job = chat_job(body, request, pipeline.default_max_tokens)
    else:
        job = completion_job(body, request, pipeline.default_max_tokens)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(pipeline, job, request, include_usage)


def _check_token_fields(body: ChatCompletionRequest | CompletionRequest, limit: int) -> None:
    """Each token-count field a request sets is within ``limits.max_completion_tokens`` (the served OpenAPI
    schema says so too), not only the one that takes effect."""
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, field, None)
        if value is not None and value > limit and field in body.model_fields_set:
            raise InvalidRequest(f"{field} = {value} is above the limit {limit}", param=field)


class Shaper(Protocol):
    """How one endpoint writes Deltas: chat/completion chunks, Responses events or Anthropic events."""

    def add(self, delta: Delta) -> None: ...

    def body(self, usage: Usage, info: dict[str, Any]) -> dict[str, Any]: ...

    def frames(self, delta: Delta) -> bytes: ...

    def closing(self, usage: Usage | None, info: dict[str, Any]) -> bytes: ...

    def error_frame(self, status: int, message: str, code: str | None, error_type: str) -> bytes: ...


ShaperFactory = Callable[[Job, Execution], Shaper]
Finished = Callable[[Shaper, Usage], Awaitable[None]]


async def respond(pipeline: Pipeline, job: Job, request: Request, include_usage: bool = False, *,
                  shaper: ShaperFactory | None = None, finished: Finished | None = None) -> Response:
    """Run the pipeline and shape its answer: one JSON body, or an SSE stream. ``finished`` runs once the
    whole answer is known and before its last byte is sent (e.g. to store a Responses conversation)."""
    key = None if pipeline.admitter.is_open else presented_key(request.headers)
    async with abort_on_disconnect(request):  # one watcher for the whole non-stream request
        execution = await pipeline.run(job, key)  # up to the first Delta (the whole answer when buffered)
        if shaper is None:
            prompt_chars = len(job.prompt) if isinstance(job.prompt, str) else 0
            shape: Shaper = ResponseShaper(
                kind=job.kind, request_id=("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.request_id,
                created=int(time.time()), model=execution.model_name, logprobs=job.sampling.logprobs is not None,
                top_logprobs=job.sampling.logprobs or 0, include_usage=include_usage, prompt_chars=prompt_chars)
        else:
            shape = shaper(job, execution)
        decision = execution.decision
        if job.stream:  # AbortingStream watches the client itself while it streams
            return AbortingStream(_sse(pipeline, execution, shape, finished, request.scope),
                                  media_type="text/event-stream",
                                  headers={**execution.headers(with_cost=False), "cache-control": "no-cache"})
        try:
            async for delta in execution.deltas():
                shape.add(delta)
        except BackendError as e:
            raise from_backend_error(e, decision.pool) from None
        finally:
            await execution.aclose()
        usage = execution.usage or _zero_usage()
        body = shape.body(usage, execution.info())
        if finished is not None:
            await finished(shape, usage)
    pipeline.record(route=decision.route, model=decision.pool, status=200, t_start=job.t_start,
                    overhead_s=execution.overhead_s, execution=execution, scope=request.scope)
    return Response(json_bytes(body), media_type="application/json", headers=execution.headers(with_cost=True))


def _zero_usage():
    from backends.base import Usage

    return Usage(0, 0)


async def _sse(pipeline: Pipeline, execution: Execution, shaper: Shaper,
               finished: Finished | None, scope: dict[str, Any]) -> AsyncIterator[bytes]:
    """The SSE frames of one stream. Counted once when it ends: 200 when the closing frame was handed
    to the server, the error's status when an error event was, 499 when the client left before."""
    decision, status = execution.decision, STATUS_CLIENT_GONE
    try:
        async for delta in execution.deltas():
            frame = shaper.frames(delta)
            if frame:
                yield frame
        closing = shaper.closing(execution.usage, execution.info())
        if finished is not None:
            await finished(shaper, execution.usage or _zero_usage())
        status = 200
        yield closing
    except BackendError as e:
        err = from_backend_error(e, decision.pool)
        status = err.status_code
        yield shaper.error_frame(status, err.message, err.code, err.error_type)
    except Exception as e:  # noqa: BLE001 - headers are gone: the error can only travel as an event
        status = 500
        logging.getLogger("switchyard").exception("stream failed")
        yield shaper.error_frame(500, f"internal error: {type(e).__name__}", "internal_error", "server_error")
    finally:
        if status == STATUS_CLIENT_GONE:
            logging.getLogger("switchyard").info("client left during its stream (%s)", decision.pool)
        await execution.aclose()
        pipeline.record(route=decision.route, model=decision.pool, status=status, t_start=execution.job.t_start,
                        overhead_s=execution.overhead_s, execution=execution, scope=scope)


class _DisconnectWatch:
    """The one disconnect watcher: a task that waits for ``http.disconnect``, then sets ``gone`` and cancels
    the task that made the watch (its current work, and with it the backend request)."""

    __slots__ = ("gone", "task", "watcher")

    def __init__(self, receive: Any) -> None:
        self.task = asyncio.current_task()
        self.gone = False
        self.watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self.task.cancel()
                return


class abort_on_disconnect:  # noqa: N801 - used as a context manager, named for what it does
    """``async with abort_on_disconnect(request):`` cancels the enclosed work when the client disconnects
    (the backend request is aborted with it); the disconnect leaves as ``ClientGone``."""

    __slots__ = ("_receive", "_watch")

    def __init__(self, request: Request) -> None:
        self._receive = request.receive

    async def __aenter__(self) -> None:
        self._watch = _DisconnectWatch(self._receive)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        watch = self._watch
        watch.watcher.cancel()
        if exc_type is asyncio.CancelledError and watch.gone:
            watch.task.uncancel()
            raise ClientGone() from None


class AbortingStream(StreamingResponse):
    """A StreamingResponse that stops (and closes its iterator → aborts the backend) on client disconnect,
    also while waiting for the next token, and always closes the iterator when it ends."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watch = _DisconnectWatch(receive)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            watch.task.uncancel()
        except OSError:
            pass
        finally:
            watch.watcher.cancel()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
