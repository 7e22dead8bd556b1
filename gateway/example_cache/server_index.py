"""Server-side vector search for the Redis example store, when the server has a query engine (FT.*).

Redis 8 ships the query engine built in; Redis Stack 7.x has it as the ``search`` module; Debian's Redis 7
does not. ``has_server_search`` detects it (``MODULE LIST``, then whether ``FT._LIST`` answers).

``ServerIndex`` keeps ONE index over every namespace's entry hashes (``switchyard:ex:*``, the hashes the
store writes anyway): ``emb`` as an HNSW vector field (FLOAT16, cosine; the float16 bytes the store keeps,
so FLOAT16 support is needed: Redis 8, or RediSearch >= 2.10) and ``ns`` as a TAG (a hash of the
namespace, so that no namespace needs escaping). A KNN query pre-filtered by that TAG never crosses
namespaces; the store applies the min-similarity cutoff to the returned cosine distances.

Everything here raises ``redis`` errors as they come; the store falls back to its in-process index on any
of them (see ``RedisExampleStore``). NOTE: this path has only been run against plain Redis 7 (no FT
commands) in this repository's tests; its query syntax follows the Redis docs (FT.CREATE / FT.SEARCH
``(@ns:{tag})=>[KNN n @emb $vec AS dist]``, DIALECT 2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import ResponseError

INDEX_NAME = "switchyard:ex:idx"
RETURN_FIELDS = ("text", "answer", "model", "created", "kept", "escalated", "dist")


@dataclass(frozen=True)
class ServerHit:
    """One KNN result: the entry's id in its namespace, cosine similarity, and the fields shown to the SLM."""

    id: str
    similarity: float
    text: str
    answer: str
    model: str
    created_at: float
    kept: int
    escalated: int


def namespace_tag(namespace: str) -> str:
    """The TAG value stored in each entry hash (``ns`` field): hex, so queries need no escaping."""
    return hashlib.sha1(namespace.encode()).hexdigest()[:20]


async def has_server_search(r: Any) -> bool:
    """Whether the server answers FT.* commands: a search module in ``MODULE LIST``, or else ``FT._LIST``
    answering (the query engine built into Redis 8). Raises redis errors when the server cannot be reached."""
    try:
        modules = await r.module_list()
    except ResponseError:
        modules = []
    for module in modules or []:
        name = module.get(b"name", module.get("name", b"")) if isinstance(module, dict) else b""
        if (name.decode() if isinstance(name, bytes) else str(name)).lower() in ("search", "ft", "searchlight"):
            return True
    try:
        await r.execute_command("FT._LIST")
    except ResponseError:  # unknown command (plain Redis), or not allowed for this user
        return False
    return True


class ServerIndex:
    """The FT index over entry hashes. ``key_prefix`` is the store's ``switchyard:ex:``."""

    def __init__(self, key_prefix: str, *, name: str = INDEX_NAME, m: int = 16, ef_construction: int = 200) -> None:
        self.key_prefix = key_prefix
        self.name = name
        self.m = m
        self.ef_construction = ef_construction
        self.dim: int | None = None  # set once the index is known to exist

    async def ensure(self, r: Any, dim: int) -> None:
        """Create the index for ``dim``-dimensional vectors unless it exists (FT.INFO, then FT.CREATE)."""
        if self.dim == dim:
            return
        from redis.commands.search.field import TagField, VectorField
        from redis.commands.search.index_definition import IndexDefinition, IndexType

        try:
            await r.ft(self.name).info()
        except ResponseError as e:
            if "unknown index" not in str(e).lower() and "no such index" not in str(e).lower():
                raise
            fields = [
                TagField("ns"),
                VectorField("emb", "HNSW", {"TYPE": "FLOAT16", "DIM": dim, "DISTANCE_METRIC": "COSINE",
                                            "M": self.m, "EF_CONSTRUCTION": self.ef_construction}),
            ]
            definition = IndexDefinition(prefix=[self.key_prefix], index_type=IndexType.HASH)
            await r.ft(self.name).create_index(fields, definition=definition)
        self.dim = dim

    def query(self, namespace: str, num: int) -> Any:
        """The KNN query for ``num`` neighbours within one namespace, nearest first."""
        from redis.commands.search.query import Query

        text = f"(@ns:{{{namespace_tag(namespace)}}})=>[KNN {int(num)} @emb $vec AS dist]"
        return Query(text).sort_by("dist").return_fields(*RETURN_FIELDS).paging(0, int(num)).dialect(2)

    async def search(self, r: Any, namespace: str, vector: np.ndarray, num: int,
                     min_similarity: float) -> list[ServerHit]:
        """Up to ``num`` entries of ``namespace`` with cosine >= ``min_similarity``, best first."""
        blob = np.asarray(vector, dtype=np.float16).tobytes()
        result = await r.ft(self.name).search(self.query(namespace, num), query_params={"vec": blob})
        return parse_hits(result.docs, self.key_prefix + namespace + ":e:", min_similarity)


def parse_hits(docs: list[Any], key_prefix: str, min_similarity: float) -> list[ServerHit]:
    """FT.SEARCH documents → hits above the cutoff, best first. Documents of other key shapes are skipped."""
    hits: list[ServerHit] = []
    for doc in docs:
        key = doc.id.decode() if isinstance(doc.id, bytes) else str(doc.id)
        if not key.startswith(key_prefix):
            continue
        similarity = 1.0 - float(getattr(doc, "dist", 2.0))
        if similarity < min_similarity:
            continue
        hits.append(ServerHit(
            id=key[len(key_prefix):], similarity=similarity, text=str(getattr(doc, "text", "")),
            answer=str(getattr(doc, "answer", "")), model=str(getattr(doc, "model", "")),
            created_at=float(getattr(doc, "created", 0.0) or 0.0), kept=int(getattr(doc, "kept", 0) or 0),
            escalated=int(getattr(doc, "escalated", 0) or 0)))
    hits.sort(key=lambda h: -h.similarity)
    return hits
