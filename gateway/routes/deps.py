"""Dependencies: state built in the lifespan, reached from routes (never module globals)."""

from __future__ import annotations

from fastapi import Request

from gateway.errors import ServiceUnavailable
from gateway.lifecycle import Lifecycle
from gateway.pipeline import Pipeline


async def get_pipeline(request: Request) -> Pipeline:
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise ServiceUnavailable("The gateway is starting up.", code="starting")
    return pipeline


async def get_lifecycle(request: Request) -> Lifecycle:
    lifecycle = getattr(request.app.state, "lifecycle", None)
    if lifecycle is None:
        raise ServiceUnavailable("The gateway is starting up.", code="starting")
    return lifecycle
