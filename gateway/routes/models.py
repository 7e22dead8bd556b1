"""GET /v1/models — the public aliases: every pool, and ``auto`` when there are several (Pipeline.model_ids)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from backends.base import json_bytes
from gateway.admission import presented_key
from gateway.errors import NotFound
from gateway.pipeline import Pipeline
from gateway.protocol import Model, ModelList
from gateway.responder import ERROR_RESPONSES
from gateway.routes.deps import get_pipeline

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, tags=["openai"], responses={401: ERROR_RESPONSES[401]},
            summary="List the models (aliases) this gateway answers for")
async def list_models(request: Request, pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    key = presented_key(request.headers)
    allowed = await pipeline.admitter.allowed_models(key)
    now = int(time.time())
    data = [{"id": i, "object": "model", "created": now, "owned_by": "switchyard"}
            for i in pipeline.model_ids() if allowed is None or i in allowed]
    return Response(json_bytes({"object": "list", "data": data}), media_type="application/json")


@router.get("/v1/models/{model_id:path}", response_model=Model, tags=["openai"],
            responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]},
            summary="One model (alias) this gateway answers for")
async def get_model(model_id: str, request: Request, pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    allowed = await pipeline.admitter.allowed_models(presented_key(request.headers))
    if model_id not in pipeline.model_ids() or (allowed is not None and model_id not in allowed):
        raise NotFound(f"The model {model_id!r} does not exist", code="model_not_found", param="model")
    body = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "switchyard"}
    return Response(json_bytes(body), media_type="application/json")
