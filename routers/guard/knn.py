"""kNN evidence: mean cosine similarity of unit query rows to their ``k`` nearest unit reference rows,
in one exact scan or in two stages (``CoarseRanking``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def normalize_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def topk_mean(sims: np.ndarray, k: int) -> np.ndarray:
    """Per row, the mean of its ``k`` largest values (all of them when a row is shorter)."""
    k_eff = min(k, sims.shape[1])
    return np.partition(sims, sims.shape[1] - k_eff, axis=1)[:, -k_eff:].mean(axis=1)


def exact_knn(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine similarity of each (unit) query row to its ``k`` nearest (unit) reference rows."""
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), 512):
        out[start:start + 512] = topk_mean(queries[start:start + 512] @ reference.T, k)
    return out


@dataclass
class CoarseRanking:
    """The first stage of a two-stage kNN search over unit reference rows: rank them in a small space (the
    vector minus ``mean``, projected on the reference set's top principal directions), then compute the
    exact cosine for the ``candidates`` best only. The coarse scan reads a fraction of the reference
    matrix, the guard's largest per-query memory traffic.

    It can only miss true neighbours, never invent them, so the evidence is exact or lower: in-domain
    texts' neighbours live in the principal space and are found; a foreign text's evidence can only drop,
    the safe side for an OOD rule. (Projecting both stages, as a first attempt did, loses exactly the
    directions in which near-domain OOD text differs: -2 on the selection protocol.) Fitted at training
    time (``training.guard_fit.fit_coarse_ranking``).
    """

    mean: np.ndarray  # float32 [d_full]
    proj: np.ndarray  # float32 [d_full, d]
    reference_low: np.ndarray  # float32 [n_ref, d]: the reference rows in the coarse space
    candidates: int

    @classmethod
    def of(cls, reference: np.ndarray, mean: np.ndarray, proj: np.ndarray, candidates: int) -> CoarseRanking:
        return cls(mean, proj, np.ascontiguousarray((reference - mean) @ proj, dtype=np.float32), candidates)

    def knn(self, queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
        """As ``exact_knn(queries, reference, k)``, over the best ``candidates`` rows per query."""
        out = np.empty(len(queries), dtype=np.float32)
        c = self.candidates
        for start in range(0, len(queries), 256):
            q = queries[start:start + 256]
            coarse = ((q - self.mean) @ self.proj) @ self.reference_low.T  # [n, n_ref]
            cand = np.argpartition(coarse, coarse.shape[1] - c, axis=1)[:, -c:]  # [n, c]
            out[start:start + 256] = topk_mean(np.einsum("ncd,nd->nc", reference[cand], q), k)
        return out

    def state(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return ({"knn_dims": int(self.proj.shape[1]), "knn_candidates": self.candidates},
                {f"{prefix}knn_mean": self.mean, f"{prefix}knn_proj": self.proj})

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str,
                   reference: np.ndarray) -> CoarseRanking | None:
        if not meta.get("knn_dims"):
            return None
        return cls.of(reference, arrays[f"{prefix}knn_mean"].astype(np.float32),
                      arrays[f"{prefix}knn_proj"].astype(np.float32), int(meta["knn_candidates"]))


def knn(queries: np.ndarray, reference: np.ndarray, k: int, coarse: CoarseRanking | None) -> np.ndarray:
    """kNN evidence of unit ``queries``: one exact scan, or two stages when ``coarse`` is set."""
    if coarse is None:
        return exact_knn(queries, reference, k)
    return coarse.knn(queries, reference, k)


def centroid_similarity(queries: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``centroid`` evidence: the largest cosine similarity of each (unit) query row to the (unit) domain
    centroids. Unlike ``knn`` it does not ask for a close training neighbour, only for the region of the
    space a domain's texts occupy: in-domain text of a style the training rows lack (customer-service
    banking questions for a finance guard trained on forum posts) stays close to its domain's centroid."""
    return (queries @ centroids.T).max(axis=1).astype(np.float32)


def domain_centroids(rows: np.ndarray, labels: np.ndarray, per_domain: int, seed: int = 0,
                     iters: int = 20) -> np.ndarray:
    """Unit centroids [sum over domains, d] of ``rows`` (unit vectors): ``per_domain`` spherical k-means
    clusters of each label's rows (fewer for a label with fewer rows; one = the label's mean direction)."""
    rng = np.random.RandomState(seed)
    out = []
    for lab in np.unique(labels):
        x = rows[labels == lab].astype(np.float32)
        k = max(1, min(per_domain, len(x)))
        cent = normalize_rows(x[rng.choice(len(x), k, replace=False)]) if k > 1 else normalize_rows(x.mean(0, keepdims=True))
        for _ in range(iters if k > 1 else 0):
            assign = (x @ cent.T).argmax(axis=1)
            for c in range(k):
                members = x[assign == c]
                if len(members):
                    cent[c] = members.sum(axis=0)
            cent = normalize_rows(cent)
        out.append(cent)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
