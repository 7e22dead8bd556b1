"""/healthz (process up), /readyz (pools have a healthy replica, Redis reachable), /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from gateway.pipeline import Pipeline
from gateway.routes.deps import get_pipeline

router = APIRouter()


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    pools: dict[str, dict[str, bool]]
    redis: bool | None = None


@router.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness: the process answers")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, tags=["ops"],
            responses={503: {"model": Readiness, "description": "not ready"}},
            summary="Readiness: every pool has a healthy replica and Redis (when configured) answers")
async def readyz(pipeline: Pipeline = Depends(get_pipeline)) -> JSONResponse:
    state = await pipeline.readiness()
    return JSONResponse(state, status_code=200 if state["ready"] else 503)


@router.get("/metrics", tags=["ops"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}},
            summary="Prometheus metrics")
async def metrics(pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    return Response(pipeline.metrics.render(), media_type=CONTENT_TYPE_LATEST)
