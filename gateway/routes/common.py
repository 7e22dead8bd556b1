"""What the completion routes share: request → Job, Execution → Response, client-disconnect abort."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from backends.base import BackendError, SamplingParams, json_bytes
from gateway.admission import bearer_token
from gateway.errors import ClientGone, InvalidRequest, from_backend_error
from gateway.pipeline import Execution, Job, Pipeline
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from gateway.streaming import ResponseShaper, error_event

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


def stream_response_doc(schema_ref: str) -> dict[str, Any]:
    return {"description": "JSON body, or with `stream: true` a `text/event-stream` of `data: <chunk>` events "
                           f"({schema_ref}) ending with `data: [DONE]`",
            "content": {"text/event-stream": {"schema": {
                "type": "object", "description": "one server-sent event", "required": ["data"],
                "properties": {"data": {"type": "string", "description": f"JSON of a {schema_ref}, or [DONE]"},
                               "event": {"type": "string"}, "id": {"type": "string"},
                               "retry": {"type": "integer"}}}}}}


def t_start_of(request: Request) -> float:
    state = request.scope.get("state") or {}
    return state.get("t_start") or time.perf_counter()


def _hint(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Any:
    """The routing hint (``routers.policy.parse_hint``): body ``switchyard`` field or x-switchyard-* headers."""
    from routers.policy import parse_hint

    body_value = body.switchyard.model_dump(exclude_none=True) if body.switchyard else None
    try:
        return parse_hint(body_value, request.headers)
    except ValueError as e:
        raise InvalidRequest(str(e), param="switchyard") from None


def _sampling_params(body: ChatCompletionRequest | CompletionRequest, default_max_tokens: int) -> SamplingParams:
    """``body.to_sampling_params``; an invalid value is a 400 naming the field, whatever pool answers."""
    try:
        return body.to_sampling_params(default_max_tokens)
    except ValueError as e:
        raise InvalidRequest(f"Invalid request: {e}", param=getattr(e, "param", None)) from None


def chat_job(body: ChatCompletionRequest, request: Request, default_max_tokens: int) -> Job:
    return Job(kind="chat", model=body.model, messages=[m.to_backend() for m in body.messages], prompt=None,
               sampling=_sampling_params(body, default_max_tokens), stream=bool(body.stream), tools=body.tools,
               tool_choice=body.tool_choice,
               response_format=body.response_format.model_dump() if body.response_format else None,
               user=body.user, hint=_hint(body, request), priority=body.priority or 0,
               t_start=t_start_of(request))


def completion_job(body: CompletionRequest, request: Request, default_max_tokens: int) -> Job:
    return Job(kind="completion", model=body.model, messages=None, prompt=body.prompt_value(),
               sampling=_sampling_params(body, default_max_tokens), stream=bool(body.stream), user=body.user,
               hint=_hint(body, request), priority=body.priority or 0,
               t_start=t_start_of(request))


async def complete(pipeline: Pipeline, body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
    """A parsed chat or completion body → its response: what the FastAPI routes and ``FastLane`` both run."""
    if isinstance(body, ChatCompletionRequest):
        job = chat_job(body, request, pipeline.default_max_tokens)
    else:
        job = completion_job(body, request, pipeline.default_max_tokens)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(pipeline, job, request, include_usage)


async def respond(pipeline: Pipeline, job: Job, request: Request, include_usage: bool) -> Response:
    """Run the pipeline and shape its answer: one JSON body, or an SSE stream."""
    key = bearer_token(request.headers.get("authorization"), request.headers.get("api-key"))
    async with abort_on_disconnect(request):  # one watcher for the whole non-stream request
        execution = await pipeline.run(job, key)  # up to the first Delta (the whole answer when buffered)
        prompt_chars = len(job.prompt) if isinstance(job.prompt, str) else 0
        shaper = ResponseShaper(kind=job.kind,
                                request_id=("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.request_id,
                                created=int(time.time()), model=execution.model_name,
                                logprobs=job.sampling.logprobs is not None,
                                top_logprobs=job.sampling.logprobs or 0,
                                include_usage=include_usage, prompt_chars=prompt_chars)
        trace = execution.trace
        if job.stream:  # AbortingStream watches the client itself while it streams
            return AbortingStream(_sse(pipeline, execution, shaper), media_type="text/event-stream",
                                  headers={**trace.headers(with_cost=False), "cache-control": "no-cache"})
        try:
            async for delta in execution.deltas():
                shaper.add(delta)
        except BackendError as e:
            raise from_backend_error(e) from None
        finally:
            await execution.aclose()
    pipeline.record(route=trace.route, model=trace.pool, status=200, t_start=job.t_start,
                    overhead_s=trace.overhead_s)
    body = shaper.body(execution.usage or _zero_usage(), trace.info())
    return Response(json_bytes(body), media_type="application/json", headers=trace.headers(with_cost=True))


def _zero_usage():
    from backends.base import Usage

    return Usage(0, 0)


async def _sse(pipeline: Pipeline, execution: Execution, shaper: ResponseShaper) -> AsyncIterator[bytes]:
    trace, status = execution.trace, 200
    try:
        async for delta in execution.deltas():
            frame = shaper.frames(delta)
            if frame:
                yield frame
        yield shaper.closing(execution.usage, trace.info())
    except BackendError as e:
        status = e.status_code
        err = from_backend_error(e)
        yield error_event(e.message, e.code, err.error_type)
    except Exception as e:  # noqa: BLE001 - headers are gone: the error can only travel as an event
        status = 500
        logging.getLogger("switchyard").exception("stream failed")
        yield error_event(f"internal error: {type(e).__name__}", "internal_error", "server_error")
    finally:
        await execution.aclose()
        pipeline.record(route=trace.route, model=trace.pool, status=status, t_start=execution.job.t_start,
                        overhead_s=trace.overhead_s)


@contextlib.asynccontextmanager
async def abort_on_disconnect(request: Request):
    """Cancel the enclosed work when the client disconnects (the backend request is aborted with it)."""
    task = asyncio.current_task()
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except asyncio.CancelledError:
        if disconnected:
            task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


class AbortingStream(StreamingResponse):
    """A StreamingResponse that stops (and closes its iterator → aborts the backend) on client disconnect,
    also while waiting for the next token, and always closes the iterator when it ends."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    task.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not disconnected:
                raise
            task.uncancel()
        except OSError:
            pass
        finally:
            watcher.cancel()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
