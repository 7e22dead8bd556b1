"""POST /v1/chat/completions — parse, run the pipeline, shape the answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.pipeline import Pipeline
from gateway.protocol import ChatCompletion, ChatCompletionRequest
from gateway.responder import ERROR_RESPONSES, complete, stream_response_doc
from gateway.routes.deps import get_pipeline

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, tags=["openai"],
             responses={200: stream_response_doc("ChatCompletionChunk"), **ERROR_RESPONSES},
             summary="Create a chat completion (model 'auto' routes; a pool alias goes straight there)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    return await complete(pipeline, body, request)
