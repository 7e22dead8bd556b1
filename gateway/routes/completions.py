"""POST /v1/completions — parse, run the pipeline, shape the answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.pipeline import Pipeline
from gateway.protocol import Completion, CompletionRequest
from gateway.responder import ERROR_RESPONSES, complete, stream_response_doc
from gateway.routes.deps import get_pipeline

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, tags=["openai"],
             responses={200: stream_response_doc("Completion"), **ERROR_RESPONSES},
             summary="Create a text completion")
async def create_completion(body: CompletionRequest, request: Request,
                            pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    return await complete(pipeline, body, request)
