"""The ``embedding`` member: MiniLM sentence embedding → linear softmax head, kNN evidence against the
training rows' embeddings. The artifact ships the exact ONNX encoder it was trained with."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routers.embeddings import MiniLMEmbedder, embedder_from_files, encoder_files
from routers.guard.knn import CoarseRanking, centroid_similarity, knn, normalize_rows
from routers.guard.widemlp import softmax

EMBEDDING_EVIDENCE = ("knn", "centroid")  # "centroid" only when the member has centroids


class EncoderMissing(ValueError):
    """An artifact with an embedding member that ships no encoder graph (written before they shipped)."""


@dataclass
class EmbeddingHead:
    """MiniLM embedding → linear softmax head; kNN evidence against training embeddings."""

    embedder: MiniLMEmbedder
    w: np.ndarray  # float32 [384, n_classes]
    b: np.ndarray  # float32 [n_classes]
    reference: np.ndarray  # float32 [n_ref, 384], unit rows
    knn_k: int = 10
    coarse: CoarseRanking | None = None  # two-stage "knn" search (None: one exact scan)
    centroids: np.ndarray | None = None  # float32 [m, 384] unit domain centroids, for "centroid" evidence

    def evidence(self, texts: Sequence[str], wanted: Collection[str] | None = None, cache: dict | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """As ``WideMLP.evidence``: class probabilities and the ``wanted`` components (None: all)."""
        return self.evidence_from(self.embedder.encode(list(texts)), wanted)

    def evidence_from(self, emb: np.ndarray, wanted: Collection[str] | None = None
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        comps = {}
        if wanted is None or "knn" in wanted:
            comps["knn"] = knn(emb, self.reference, self.knn_k, self.coarse)
        if (wanted is None or "centroid" in wanted) and self.centroids is not None:
            comps["centroid"] = centroid_similarity(normalize_rows(emb), self.centroids)
        return softmax(emb @ self.w + self.b), comps

    def add_references(self, texts: Sequence[str]) -> None:
        """Append ``texts`` (in-domain examples: ``Guard.add_examples``) to the ``knn`` reference rows."""
        if not texts:
            return
        emb = normalize_rows(self.embedder.encode(list(texts)))
        self.reference = np.ascontiguousarray(np.concatenate([self.reference, emb]), dtype=np.float32)
        if self.coarse is not None:
            self.coarse = CoarseRanking.of(self.reference, self.coarse.mean, self.coarse.proj, self.coarse.candidates)

    def state(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"{prefix}w": self.w, f"{prefix}b": self.b, f"{prefix}reference": self.reference.astype(np.float16)}
        cmeta, carrays = self.coarse.state(prefix) if self.coarse is not None else ({}, {})
        arrays.update(carrays)
        if self.centroids is not None:
            arrays[f"{prefix}centroids"] = self.centroids.astype(np.float32)
        return {"embedder": "minilm", **self.embedder.spec(), "knn_k": self.knn_k, **cmeta,
                "num_centroids": 0 if self.centroids is None else len(self.centroids)}, arrays

    def files(self, prefix: str) -> dict[str, Path]:
        """The encoder graph and tokenizer the artifact ships (none for a torch-backed embedder)."""
        return encoder_files(self.embedder, prefix)

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str,
                   files: dict[str, Path], embedder: MiniLMEmbedder | None = None) -> EmbeddingHead:
        """``embedder`` replaces the shipped encoder (tests, comparisons); without either: EncoderMissing."""
        if embedder is None:
            meta = {**meta, "graph": meta.get("graph", "hf")}  # before "graph" was recorded: the HF one
            embedder = embedder_from_files(meta, files, prefix)
        if embedder is None:
            raise EncoderMissing("its embedding member ships no MiniLM encoder graph (written before artifacts "
                                 "carried theirs)")
        reference = arrays[f"{prefix}reference"].astype(np.float32)
        return cls(embedder=embedder, w=arrays[f"{prefix}w"].astype(np.float32),
                   b=arrays[f"{prefix}b"].astype(np.float32), reference=reference, knn_k=int(meta["knn_k"]),
                   coarse=CoarseRanking.from_state(meta, arrays, prefix, reference),
                   centroids=arrays[f"{prefix}centroids"].astype(np.float32) if meta.get("num_centroids") else None)
