"""POST /v1/embeddings — admission (key, model allow list, rate limits), then the embed pool."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from backends.base import json_bytes
from gateway.admission import presented_key
from gateway.edge import t_start_of
from gateway.embeddings import encode_vector
from gateway.errors import InvalidRequest, NotFound
from gateway.pipeline import Pipeline
from gateway.protocol import Int
from gateway.responder import ERROR_RESPONSES
from gateway.routes.deps import get_pipeline

router = APIRouter()

Text = Annotated[str, Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"examples": [
        {"model": "minilm", "input": ["The court ruled on the contract.", "How do I bake bread?"]}]})

    model: str = Field(min_length=1, max_length=256)
    input: (Text | Annotated[list[Text], Field(min_length=1, max_length=2048)]
            | Annotated[list[Int(0)], Field(min_length=1)] | Annotated[list[list[Int(0)]], Field(min_length=1)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int(1, 100_000) | None = None
    user: str | None = Field(None, max_length=256)


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: dict[str, int]


@router.post("/v1/embeddings", response_model=EmbeddingList, tags=["openai"], responses=ERROR_RESPONSES,
             summary="Create embeddings (pools with task 'embed')")
async def create_embeddings(body: EmbeddingRequest, request: Request,
                            pipeline: Pipeline = Depends(get_pipeline)) -> Response:
    t_start = t_start_of(request.scope)
    service = request.app.state.embeddings
    alias = pipeline.settings.resolve_model(body.model)
    if alias is None or alias == "auto":
        raise NotFound(f"The model {body.model!r} does not exist; embedding pools: {sorted(service.pools)}",
                       code="model_not_found", param="model")
    await pipeline.admitter.admit(presented_key(request.headers), alias)
    if alias not in service.pools:
        raise NotFound(f"The model {body.model!r} is a generation pool, not an embedding model; embedding "
                       f"pools: {sorted(service.pools)}", code="wrong_endpoint", param="model")
    extra: dict[str, Any] = {} if body.dimensions is None else {"dimensions": body.dimensions}
    if body.dimensions is not None and service.pools[alias].kind == "local":
        raise InvalidRequest(f"Pool {alias!r} returns 384 dimensions; 'dimensions' cannot change it.",
                             param="dimensions")
    result = await service.embed(alias, body.input, extra)
    if result.vectors is not None:
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                for i, v in enumerate(result.vectors)]
    else:
        data = [{"object": "embedding", "index": item.get("index", i),
                 "embedding": encode_vector(item.get("embedding") or [], body.encoding_format)}
                for i, item in enumerate(result.data or [])]
    pipeline.record(route="embeddings", model=alias, status=200, t_start=t_start, overhead_s=None,
                    scope=request.scope)
    out = {"object": "list", "data": data, "model": service.pools[alias].model,
           "usage": {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens}}
    return Response(json_bytes(out), media_type="application/json")
