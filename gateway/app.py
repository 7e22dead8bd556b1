"""create_app(settings): the FastAPI app. (Foundation stage: /healthz and /v1/models only.)"""

from __future__ import annotations

import time

from fastapi import FastAPI

from gateway import __version__
from gateway.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="switchyard", version=__version__)
    app.state.settings = settings

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        now = int(time.time())
        ids = ["auto"] + [p.name for p in settings.pools]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "switchyard"}
                                           for i in ids]}

    return app
