"""/ui: the read-only dashboard page, and /ui/data: what it draws (``gateway/dashboard.py``).

The page (``gateway/ui/index.html``, package data) is static and holds no data, so anyone may load it; its
script takes the key from the URL fragment (``/ui#key=...``: never sent to a server, so never in any log)
or ``?key=``, or asks for it, keeps it in memory only and sends it as ``Authorization: Bearer`` to
``/ui/data``. With ``api_keys`` configured ``/ui/data`` needs an ``admin: true`` key: 401 without a key or
with a wrong one, 403 for another key (OpenAI's error envelope).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from gateway.admission import presented_key
from gateway.pipeline import Pipeline
from gateway.protocol import ErrorResponse
from gateway.routes.deps import get_pipeline

router = APIRouter()


@cache
def _page() -> tuple[bytes, dict[str, str]]:
    """The page and its headers: a Content-Security-Policy that runs only the page's own script and style
    (by hash), fetches only from this origin, and sends no referrer (a ``?key=`` stays here)."""
    html = resources.files("gateway.ui").joinpath("index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = {"content-security-policy": csp, "referrer-policy": "no-referrer", "cache-control": "no-store",
               "x-content-type-options": "nosniff"}
    return html.encode(), headers


@router.get("/ui", tags=["ops"], response_class=Response, summary="The dashboard page (its data: /ui/data)",
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "HTML"}})
async def page() -> Response:
    body, headers = _page()
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)


@router.get("/ui/data", tags=["ops"], summary="The dashboard's numbers (an admin key when api_keys are set)",
            responses={401: {"model": ErrorResponse, "description": "missing or wrong API key"},
                       403: {"model": ErrorResponse, "description": "not an admin key (code admin_required)"}})
async def data(request: Request, pipeline: Pipeline = Depends(get_pipeline)) -> JSONResponse:
    pipeline.admitter.require_admin(presented_key(request.headers))
    return JSONResponse(request.app.state.dashboard.data(), headers={"cache-control": "no-store"})
