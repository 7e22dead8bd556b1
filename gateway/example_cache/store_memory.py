"""``InMemoryExampleStore``: the embedded default example store (one process, no persistence, nothing to
administer: the ``switchyard cache`` commands and the admin calls are the Redis store's).

Same contract as every ``ExampleStore`` (see ``gateway/example_cache/__init__.py``); eviction keeps the
LFU-DA ranks on the entries themselves and scans them when a namespace is over its cap.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

import gateway.example_cache.policy as policy
from gateway.example_cache.index import VectorIndex
from gateway.example_cache.store import StoreBase
from gateway.example_cache.types import Embed, Entry, Example, Examples

if TYPE_CHECKING:
    from gateway.settings import ExampleCacheSettings


@dataclass
class _MemNamespace:
    index: VectorIndex | None = None
    entries: dict[str, Entry] = field(default_factory=dict)
    floor: float = 0.0


class InMemoryExampleStore(StoreBase):
    """The embedded default: one process, no persistence. Same contract as ``RedisExampleStore``."""

    def __init__(self, settings: ExampleCacheSettings, embed: Embed | None = None) -> None:
        super().__init__(settings, embed)
        self._ns: dict[str, _MemNamespace] = {}

    def _space(self, namespace: str, dim: int) -> _MemNamespace:
        space = self._ns.setdefault(namespace, _MemNamespace())
        if space.index is None:
            space.index = VectorIndex(dim)
        return space

    async def lookup(self, namespace: str, text: str, k: int | None = None, *,
                     embedding: np.ndarray | None = None) -> Examples:
        self._count("lookups")
        k = self.settings.top_k if k is None else k
        if k <= 0 or not text or namespace not in self._ns:
            return self._record_outcome([])
        q = await self._embed_one(text, embedding)
        if q is None:
            return self._record_outcome([])
        space = self._space(namespace, q.shape[0])
        now = time.time()
        found: Examples = []
        for id_, sim in space.index.search(q, policy.num_candidates(k), self.settings.min_similarity):
            e = space.entries[id_]
            if self._is_expired(e.created_at, now):
                self._drop(space, id_, "expired")
                continue
            found.append(Example(e.id, e.request_text, e.answer, sim, e.model, policy.utility(e.kept, e.escalated)))
        chosen = self._select(found, k)
        for ex in chosen:
            space.entries[ex.id].uses += 1
            space.entries[ex.id].rank += policy.USE_WEIGHT
        return self._record_outcome(chosen)

    async def admit(self, namespace: str, text: str, answer: str, model: str, finish_reason: str | None,
                    guard_ok: bool = True, *, embedding: np.ndarray | None = None) -> bool:
        q = await self._admission_vector(text, answer, finish_reason, guard_ok, embedding)
        if q is None:
            return False
        space = self._space(namespace, q.shape[0])
        self._sweep_expired(space, time.time())
        if space.index.search(q, 1, self.settings.dedup_similarity):
            self._count("rejected_duplicate")
            return False
        now = time.time()
        entry = Entry(self._ids.next(now), namespace, text, answer, model, now, embedding=q)
        self._insert(space, entry)
        self._count("admitted")
        self._evict(space)
        return entry.id in space.entries  # the newcomer itself may be the lowest rank

    async def feedback(self, namespace: str, example_ids: Sequence[str], escalated: bool) -> None:
        space = self._ns.get(namespace)
        for id_ in example_ids:
            e = space.entries.get(id_) if space else None
            if e is None:
                continue
            if escalated:
                e.escalated += 1
                e.rank += policy.ESCALATED_WEIGHT
            else:
                e.kept += 1
                e.rank += policy.KEPT_WEIGHT
        self._count("feedback_escalated" if escalated else "feedback_kept", len(example_ids))

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    def _insert(self, space: _MemNamespace, entry: Entry) -> None:
        entry.rank = policy.initial_rank(space.floor, entry)
        space.entries[entry.id] = entry
        space.index.add(entry.id, entry.embedding)

    def _drop(self, space: _MemNamespace, id_: str, stat: str) -> None:
        del space.entries[id_]
        space.index.remove(id_)
        self._count(stat)

    def _sweep_expired(self, space: _MemNamespace, now: float) -> None:
        if self.settings.ttl_s is None:
            return
        for e in [e for e in space.entries.values() if self._is_expired(e.created_at, now)]:
            self._drop(space, e.id, "expired")

    def _evict(self, space: _MemNamespace) -> None:
        over = len(space.entries) - self.settings.max_entries_per_namespace
        if over <= 0:
            return
        batch = over + self.settings.max_entries_per_namespace // 100  # amortise the O(n) scan
        order = sorted(space.entries.values(), key=lambda e: (e.rank, e.id))
        for e in order[:batch]:
            space.floor = max(space.floor, e.rank)
            self._drop(space, e.id, "evicted")
