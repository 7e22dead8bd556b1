"""The example cache's named types: what a lookup returns (``Example``), what a store keeps and exports
(``Entry``), the embedding function it is given (``Embed``) and the store protocol (``ExampleStore``)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gateway.example_cache.index import unit_vector

Embed = Callable[[list[str]], np.ndarray]
"""texts -> float32 array [n, dim], rows L2-normalised (MiniLM in production, anything in tests)."""


@dataclass(frozen=True)
class Example:
    """One retrieved example, ready to be shown to the SLM."""

    id: str
    request_text: str
    answer: str
    similarity: float
    model: str
    utility: float


Examples = list[Example]
"""What a lookup returns: at most ``k`` examples, best first; empty on a miss or any failure."""


@dataclass
class Entry:
    """One stored example: the unit of export and import. ``embedding`` is float32 [dim], unit norm."""

    id: str
    namespace: str
    request_text: str
    answer: str
    model: str
    created_at: float
    uses: int = 0
    kept: int = 0
    escalated: int = 0
    embedding: np.ndarray | None = field(default=None, repr=False)
    rank: float = 0.0  # eviction rank (see gateway/example_cache/policy.py); set by the store

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id, "namespace": self.namespace, "request_text": self.request_text,
            "answer": self.answer, "model": self.model, "created_at": self.created_at,
            "uses": self.uses, "kept": self.kept, "escalated": self.escalated,
        }
        if self.embedding is not None:
            row["embedding_f16"] = base64.b64encode(np.asarray(self.embedding, np.float16).tobytes()).decode()
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Entry:
        """Raises ValueError naming the missing/bad field."""
        if not isinstance(row, dict):
            raise ValueError(f"entry must be an object, got {type(row).__name__}")
        for key in ("request_text", "answer"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"entry field {key!r} must be a non-empty string")
        emb = None
        if row.get("embedding_f16"):
            emb = unit_vector(np.frombuffer(base64.b64decode(row["embedding_f16"]), np.float16).astype(np.float32))
        return cls(
            id=str(row.get("id") or ""), namespace=str(row.get("namespace") or ""),
            request_text=row["request_text"], answer=row["answer"], model=str(row.get("model") or ""),
            created_at=float(row.get("created_at") or time.time()), uses=int(row.get("uses") or 0),
            kept=int(row.get("kept") or 0), escalated=int(row.get("escalated") or 0), embedding=emb,
        )


@runtime_checkable
class ExampleStore(Protocol):
    """See ``gateway/example_cache/__init__.py`` for the contract. ``embedding=`` (from ``embed``) skips
    embedding ``text`` again."""

    stats: dict[str, int]

    async def start(self) -> None: ...

    async def embed(self, text: str) -> np.ndarray | None: ...

    async def lookup(self, namespace: str, text: str, k: int | None = None, *,
                     embedding: np.ndarray | None = None) -> Examples: ...

    async def admit(self, namespace: str, text: str, answer: str, model: str, finish_reason: str | None,
                    guard_ok: bool = True, *, embedding: np.ndarray | None = None) -> bool: ...

    async def feedback(self, namespace: str, example_ids: Sequence[str], escalated: bool) -> None: ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...
