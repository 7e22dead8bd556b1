"""GET /v1/models — the public aliases: every pool, and ``auto`` when there are several (Pipeline.model_ids)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from backends.base import json_bytes
from gateway.admission import bearer_token
from gateway.pipeline import Pipeline
from gateway.protocol import ModelList
from gateway.routes.common import ERROR_RESPONSES
from gateway.routes.deps import get_pipeline

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, tags=["openai"], responses={401: ERROR_RESPONSES[401]},
            summary="List the models (aliases) this gateway answers for")
async def list_models(request: Request, pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    key = bearer_token(request.headers.get("authorization"), request.headers.get("api-key"))
    allowed = await pipeline.admitter.allowed_models(key)
    now = int(time.time())
    data = [{"id": i, "object": "model", "created": now, "owned_by": "switchyard"}
            for i in pipeline.model_ids() if allowed is None or i in allowed]
    return Response(json_bytes({"object": "list", "data": data}), media_type="application/json")
