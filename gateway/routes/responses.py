"""POST /v1/responses — the OpenAI Responses API over the one chat request and the same pipeline.

``previous_response_id`` continues a stored conversation (``gateway/response_store.py``); the answer is
stored under its own id unless ``store`` is false. Shaped by ``gateway.streaming.ResponsesShaper``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from gateway.errors import NotFound
from gateway.pipeline import Execution, Job, Pipeline
from gateway.protocol import ResponseObject, ResponsesRequest
from gateway.responder import ERROR_RESPONSES, chat_job, invalid_request, respond, stream_response_doc
from gateway.routes.deps import get_pipeline
from gateway.streaming import ResponsesShaper

router = APIRouter()


@router.post("/v1/responses", response_model=ResponseObject, tags=["openai"],
             responses={200: stream_response_doc("Responses API event", "`response.completed` or `response.incomplete`"), **ERROR_RESPONSES},
             summary="Create a response (Responses API; model 'auto' routes)")
async def create_response(body: ResponsesRequest, request: Request,
                          pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    return await responses(pipeline, body, request)


async def responses(pipeline: Pipeline, body: ResponsesRequest, request: Request) -> Response:
    """A parsed Responses body → its response: what the FastAPI route and ``FastLane`` both run."""
    store = request.app.state.response_store
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        stored = await store.get(body.previous_response_id)
        if stored is None:
            raise NotFound(f"Previous response with id {body.previous_response_id!r} not found (unknown, expired, "
                           "or created with store: false).", code="previous_response_not_found",
                           param="previous_response_id")
        history = stored
    try:
        chat = body.to_chat_request(history)
    except ValidationError as e:
        raise invalid_request(list(e.errors())) from None
    job = chat_job(chat, request, pipeline.default_max_tokens)
    job.input_param = "input"
    response_id = "resp_" + job.request_id
    echo = {"instructions": body.instructions, "previous_response_id": body.previous_response_id,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "tool_choice": body.tool_choice if isinstance(body.tool_choice, str | None) else
            body.tool_choice.model_dump(), "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "store": body.store is not False, "metadata": body.metadata or {},
            "text": {"format": body.text.format.model_dump(by_alias=True) if body.text and body.text.format
                     else {"type": "text"}}}
    if echo["tool_choice"] is None:
        echo["tool_choice"] = "auto"

    def shaper(job: Job, execution: Execution) -> ResponsesShaper:
        return ResponsesShaper(response_id=response_id, model=execution.model_name, created_at=int(time.time()),
                               echo=echo)

    async def finished(shape: ResponsesShaper, usage: Any) -> None:
        if body.store is not False:
            await store.put(response_id, history + body.input_messages() + shape.output_messages())

    return await respond(pipeline, job, request, shaper=shaper, finished=finished)
