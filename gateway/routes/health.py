"""/healthz (process up), /readyz (every pool has a replica; Redis down = degraded, ready), /metrics.

/readyz names pools and their replica counts to anyone (it is the readiness probe, so it needs no key);
replica addresses only to a caller with an ``admin`` key, and with credentials and query strings removed.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from backends.openai_upstream import display_url
from gateway.lifecycle import Lifecycle
from gateway.pipeline import Pipeline
from gateway.routes.deps import get_lifecycle, get_pipeline

router = APIRouter()


class Health(BaseModel):
    status: str


class PoolReadiness(BaseModel):
    healthy_replicas: int
    replicas: int


class Readiness(BaseModel):
    ready: bool
    status: str = Field(description="ok | degraded (Redis unreachable: limiter and cache fail open, still "
                                    "ready) | unavailable (a pool has no available replica)")
    pools: dict[str, PoolReadiness]
    redis: bool | None = None
    replicas: dict[str, dict[str, bool]] | None = Field(
        None, description="per pool, replica → healthy; only for an admin key (addresses without credentials)")


@router.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness: the process answers")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, tags=["ops"],
            responses={503: {"model": Readiness, "description": "not ready"}},
            summary="Readiness: every pool has a healthy replica (Redis down is 'degraded', still ready)")
async def readyz(request: Request, lifecycle: Lifecycle = Depends(get_lifecycle)) -> JSONResponse:
    pipeline = lifecycle.pipeline
    state = await lifecycle.readiness()
    pools = state["pools"]
    body: dict[str, Any] = {
        "ready": state["ready"], "status": state["status"], "redis": state["redis"],
        "pools": {alias: {"healthy_replicas": sum(map(bool, r.values())), "replicas": len(r)}
                  for alias, r in pools.items()},
    }
    if _is_admin(request, pipeline):
        body["replicas"] = {alias: {display_url(n): ok for n, ok in r.items()} for alias, r in pools.items()}
    return JSONResponse(body, status_code=200 if state["ready"] else 503)


def _is_admin(request: Request, pipeline: Pipeline) -> bool:
    from gateway.admission import presented_key
    from gateway.errors import GatewayError

    presented = presented_key(request.headers)
    if presented is None or pipeline.admitter.is_open:
        return False
    try:
        key = pipeline.admitter.authenticate(presented)
    except GatewayError:
        return False
    return bool(key is not None and key.admin)


@router.get("/metrics", tags=["ops"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}},
            summary="Prometheus metrics")
async def metrics(pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    return Response(pipeline.metrics.render(), media_type=CONTENT_TYPE_LATEST)
