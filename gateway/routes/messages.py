"""POST /v1/messages — Anthropic Messages: translate to the one chat request, run the pipeline, shape the
answer as Anthropic's message or event stream (``gateway/anthropic.py``, ``gateway.streaming.MessagesShaper``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from gateway.anthropic import ErrorResponse, MessageResponse, MessagesRequest
from gateway.errors import InvalidRequest
from gateway.pipeline import Execution, Job, Pipeline
from gateway.responder import chat_job, invalid_request, respond, stream_response_doc
from gateway.routes.deps import get_pipeline
from gateway.streaming import MessagesShaper

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "invalid request (Anthropic's envelope)"), (401, "missing or wrong API key (x-api-key or bearer)"),
    (403, "model not allowed for this key"), (404, "unknown model"), (413, "request body too large"),
    (429, "rate limit"), (502, "backend failed"), (503, "no healthy replica"), (504, "request deadline passed"))}
_ERRORS["4XX"] = {"model": ErrorResponse, "description": "other client errors, Anthropic's envelope"}


@router.post("/v1/messages", response_model=MessageResponse, tags=["anthropic"],
             responses={200: stream_response_doc("Anthropic Messages event", "`event: message_stop`"), **_ERRORS},
             summary="Create a message (Anthropic Messages API; model 'auto' routes)")
async def create_message(body: MessagesRequest, request: Request, pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    return await messages(pipeline, body, request)


async def messages(pipeline: Pipeline, body: MessagesRequest, request: Request) -> Response:
    """A parsed Messages body → its response: what the FastAPI route and ``FastLane`` both run."""
    try:
        chat = body.to_chat_request()
    except ValidationError as e:
        raise invalid_request(list(e.errors())) from None
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    job = chat_job(chat, request, pipeline.default_max_tokens)

    def shaper(job: Job, execution: Execution) -> MessagesShaper:
        return MessagesShaper(message_id="msg_" + job.request_id, model=execution.model_name)

    return await respond(pipeline, job, request, shaper=shaper)
