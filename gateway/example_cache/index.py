"""The in-process vector index of one example-cache namespace: exact top-k cosine search (numpy).

``VectorIndex`` is what every gateway replica searches on a lookup (the Redis store keeps one per namespace
in sync with Redis; the in-memory store owns one per namespace). ``unit_vector`` is the one normalisation
used for queries and stored rows alike.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np


def unit_vector(v: np.ndarray) -> np.ndarray:
    """``v`` as a flat float32 vector of L2 norm 1 (a zero vector stays zero)."""
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


_blas_controller: Any = None


def single_threaded_blas() -> Any:
    """A context that holds BLAS to one thread: a matrix-vector product gains nothing from threads, and
    on a busy CPU OpenBLAS's threads turn a 0.1 ms scan into tens of ms (measured; see BENCHMARKS.md)."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas_controller = ThreadpoolController().select(user_api="blas")
        except Exception:  # noqa: BLE001 - optional speed-up only
            _blas_controller = False
    return _blas_controller.limit(limits=1) if _blas_controller else contextlib.nullcontext()


class VectorIndex:
    """Exact top-k cosine search over the unit vectors of one namespace (numpy, in process).

    Rows live in preallocated float32 matrices; removal swaps the last row into the hole. Not thread
    safe: one store owns it and touches it from its event loop only.

    Large namespaces (>= ``rotate_at`` rows) search in two exact stages: rows are kept in a PCA basis
    fitted once on the rows present then (an orthonormal rotation, so dot products are unchanged), split
    into the first ``head_dim`` coordinates and the rest. Stage one scans only the head matrix (small
    enough to stay in the CPU cache) and bounds each row's score by Cauchy-Schwarz:
    ``q.x <= q_head.x_head + |q_tail| |x_tail|``. Stage two scores exactly only the rows whose bound
    reaches the cutoff (the larger of ``min_similarity`` and the k-th best exact score among the head's
    top k); when too many rows pass, it scores all of them. Results equal a full scan.
    """

    def __init__(self, dim: int, capacity: int = 1024, *, head_dim: int = 64, rotate_at: int = 16384) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.head_dim = min(head_dim, dim)
        self.rotate_at = rotate_at
        self.rotation: np.ndarray | None = None  # dim x dim, columns = basis; None = identity
        cap = max(capacity, 16)
        self._head = np.zeros((cap, self.head_dim), dtype=np.float32)
        self._tail = np.zeros((cap, dim - self.head_dim), dtype=np.float32)
        self._tail_norm = np.zeros(cap, dtype=np.float32)
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self.num_exact_rows_last = 0  # rows scored exactly by the last search (for benchmarks)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: str) -> bool:
        return id_ in self._row

    def ids(self) -> list[str]:
        return list(self._ids)

    def add(self, id_: str, vec: np.ndarray) -> None:
        vec = np.asarray(vec, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise ValueError(f"vector has dim {vec.shape[0]}, index has {self.dim}")
        row = self._row.get(id_)
        if row is None:
            row = len(self._ids)
            if row == self._head.shape[0]:
                self._grow(row * 2)
            self._ids.append(id_)
            self._row[id_] = row
        self._set_row(row, vec if self.rotation is None else vec @ self.rotation)
        if self.rotation is None and len(self._ids) >= self.rotate_at:
            self._fit_rotation()

    def _set_row(self, row: int, rotated: np.ndarray) -> None:
        self._head[row] = rotated[: self.head_dim]
        self._tail[row] = rotated[self.head_dim :]
        self._tail_norm[row] = np.linalg.norm(rotated[self.head_dim :])

    def _grow(self, cap: int) -> None:
        n = len(self._ids)
        for name in ("_head", "_tail", "_tail_norm"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), dtype=np.float32)
            new[:n] = old[:n]
            setattr(self, name, new)

    def _fit_rotation(self) -> None:
        """Principal axes of the rows present (uncentred second moments), largest first; rotate all rows."""
        n = len(self._ids)
        rows = np.hstack([self._head[:n], self._tail[:n]])
        sample = rows[:: max(1, n // 8192)]
        _, eigvecs = np.linalg.eigh(sample.T @ sample)
        basis = np.ascontiguousarray(eigvecs[:, ::-1], dtype=np.float32)
        rotated = rows @ basis
        self.rotation = basis
        self._head[:n] = rotated[:, : self.head_dim]
        self._tail[:n] = rotated[:, self.head_dim :]
        self._tail_norm[:n] = np.linalg.norm(rotated[:, self.head_dim :], axis=1)

    def remove(self, id_: str) -> bool:
        row = self._row.pop(id_, None)
        if row is None:
            return False
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._head[row] = self._head[last]
            self._tail[row] = self._tail[last]
            self._tail_norm[row] = self._tail_norm[last]
            self._ids[row] = moved
            self._row[moved] = row
        self._ids.pop()
        return True

    def search(self, query: np.ndarray, k: int, min_similarity: float = -1.0) -> list[tuple[str, float]]:
        """Top ``k`` (id, cosine) with cosine >= ``min_similarity``, best first."""
        if len(self._ids) == 0 or k <= 0:
            return []
        with single_threaded_blas():
            return self._search(query, k, min_similarity)

    def _search(self, query: np.ndarray, k: int, min_similarity: float) -> list[tuple[str, float]]:
        n = len(self._ids)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if self.rotation is not None:
            q = q @ self.rotation
        q_head, q_tail = q[: self.head_dim], q[self.head_dim :]
        partial = self._head[:n] @ q_head
        rows: np.ndarray | None = None
        if self.rotation is not None:
            probe = np.argpartition(-partial, k - 1)[:k] if k < n else np.arange(n)
            probe_scores = partial[probe] + self._tail[probe] @ q_tail
            cutoff = float(min_similarity)
            if len(probe) == k:
                cutoff = max(cutoff, float(probe_scores.min()))
            bound = partial + float(np.linalg.norm(q_tail)) * self._tail_norm[:n]
            passing = np.flatnonzero(bound >= cutoff - 1e-5)
            if len(passing) <= n // 4:
                rows = passing
        if rows is None:
            scores, rows = partial + self._tail[:n] @ q_tail, np.arange(n)
        else:
            scores = partial[rows] + self._tail[rows] @ q_tail
        self.num_exact_rows_last = len(rows)
        if k < len(rows):
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(rows))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self._ids[rows[i]], float(scores[i])) for i in top if scores[i] >= min_similarity]
