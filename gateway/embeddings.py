"""POST /v1/embeddings: the pools whose ``task`` is ``embed``.

A local embed pool is the bundled MiniLM (all-MiniLM-L6-v2, 384-d unit vectors, mean pooling as the
sentence-transformers model card defines), run in a worker thread so the event loop keeps serving; a
remote embed pool is an OpenAI-compatible ``/embeddings`` endpoint, its answer passed through (the first
URL that answers; a failure is a 502 naming the pool). Inputs: a string or a list of strings; token-id
inputs are passed to remote pools and a 400 for the local MiniLM.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.errors import InvalidRequest, UpstreamFailed

log = logging.getLogger("switchyard.embeddings")


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]] | None  # None: ``data`` holds the remote answer's items as they came
    num_tokens: int
    data: list[dict[str, Any]] | None = None


class Embeddings:
    """The embed pools of a deployment: ``embed(alias, inputs)``. The local model loads on first use."""

    def __init__(self, settings: Any) -> None:
        self.pools = {p.name: p for p in settings.pools if p.task == "embed"}
        self._local: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._client: Any = None

    async def embed(self, alias: str, inputs: str | list[str] | list[int] | list[list[int]],
                    extra: dict[str, Any]) -> EmbeddingResult:
        cfg = self.pools[alias]
        if cfg.kind == "remote":
            return await self._remote(cfg, inputs, extra)
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest(f"Pool {alias!r} embeds text: give a string or a list of strings, not token ids.",
                                 param="input")
        embedder = await self._embedder(alias)
        vectors = await asyncio.to_thread(embedder.encode, texts)
        num_tokens = embedder.num_tokens(texts)
        return EmbeddingResult(vectors=np.asarray(vectors, dtype=np.float32).tolist(), num_tokens=num_tokens)

    async def _embedder(self, alias: str) -> Any:
        async with self._lock:
            if alias not in self._local:
                from routers.embeddings import MiniLMEmbedder

                self._local[alias] = await asyncio.to_thread(lambda: MiniLMEmbedder().load())
            return self._local[alias]

    async def _remote(self, cfg: Any, inputs: Any, extra: dict[str, Any]) -> EmbeddingResult:
        import os

        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s))
        headers = {}
        if cfg.api_key_env and os.environ.get(cfg.api_key_env):
            headers["authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
        body = {"model": cfg.model, "input": inputs, **extra, "encoding_format": "float"}
        for url in cfg.urls:
            try:
                r = await self._client.post(url.rstrip("/") + "/embeddings", json=body, headers=headers)
            except httpx.HTTPError as e:
                log.warning("embed pool %s: %s: %s", cfg.name, type(e).__name__, e)
                continue
            if r.status_code >= 500:
                log.warning("embed pool %s answered HTTP %s", cfg.name, r.status_code)
                continue
            if r.status_code >= 400:
                message = r.json().get("error", {}).get("message", "") if r.headers.get(
                    "content-type", "").startswith("application/json") else ""
                raise InvalidRequest(f"Pool {cfg.name!r} refused the request: {message}".rstrip(": "))
            answer = r.json()
            return EmbeddingResult(vectors=None, data=answer.get("data") or [],
                                   num_tokens=int((answer.get("usage") or {}).get("prompt_tokens") or 0))
        raise UpstreamFailed(f"Pool {cfg.name!r} could not answer: its backend failed (upstream_error).",
                             code="upstream_error")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """``float``: the list; ``base64``: little-endian float32 bytes, base64 (what the openai SDK asks for)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector
