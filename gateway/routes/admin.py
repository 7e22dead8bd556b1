"""POST /admin/reload: read the guard and router artifacts again without a restart (``Lifecycle.reload``).

Only a caller presenting an ``admin`` key may reload (401 without a valid key, 403 with a key that is not
``admin``, 403 on an open gateway, which has no admin key: send the process SIGHUP there). In-flight
requests finish on the artifacts they started with. 200 when the new artifacts serve; 500 with the reason
when they could not be loaded (the previous ones keep serving). Either way the body says what serves.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from gateway.errors import PermissionDenied
from gateway.lifecycle import Lifecycle
from gateway.pipeline import Pipeline
from gateway.routes.deps import get_lifecycle

router = APIRouter()


class ArtifactState(BaseModel):
    path: str
    created: str | None = None
    manifest_sha256: str = Field(description="first 16 hex digits of the manifest's sha256")
    kind: str | None = None
    threshold: float | None = None


class Serving(BaseModel):
    router: ArtifactState | None = None
    guard: ArtifactState | None = None
    loaded_at: float = Field(description="unix seconds")


class ReloadResult(BaseModel):
    reloaded: bool
    serving: Serving = Field(description="the artifacts serving after this call")
    previous: Serving | None = Field(None, description="what served before (a successful reload)")
    error: str | None = Field(None, description="why the reload failed (the previous artifacts keep serving)")


class ErrorBody(BaseModel):
    error: dict[str, Any]


@router.post("/admin/reload", response_model=ReloadResult, tags=["ops"],
             summary="Reload the guard and router artifacts (admin key); in-flight requests finish on the old ones",
             responses={401: {"model": ErrorBody, "description": "missing or wrong key"},
                        403: {"model": ErrorBody, "description": "not an admin key (or an open gateway)"},
                        500: {"model": ReloadResult, "description": "the new artifacts failed to load; the "
                                                                    "previous ones keep serving"}})
async def reload(request: Request, lifecycle: Lifecycle = Depends(get_lifecycle)) -> JSONResponse:
    _require_admin(request, lifecycle.pipeline)
    result = await lifecycle.reload()
    return JSONResponse(result, status_code=200 if result["reloaded"] else 500)


def _require_admin(request: Request, pipeline: Pipeline) -> None:
    from gateway.admission import presented_key

    if pipeline.admitter.is_open:
        raise PermissionDenied("This gateway has no API keys, so no admin key: reload it with SIGHUP.",
                               code="admin_key_required")
    key = pipeline.admitter.authenticate(presented_key(request.headers))  # 401 when missing or wrong
    if key is None or not key.admin:
        raise PermissionDenied("Reloading artifacts needs an admin key (api_keys[].admin).",
                               code="admin_key_required")
