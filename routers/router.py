"""The serving ``Router``: a trained scorer (``routers.scorers``) with its featurizers and threshold, read
from and written to a router artifact."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routers import artifact
from routers.embeddings import embedder_from_files, encoder_files
from routers.scorers import ROUTER_KIND, Featurizers, Scorer, scorer_from_state

ADD_ENCODER = "switchyard artifact add-encoder {path}"
DEFAULT_ENCODER = {"max_length": 256, "num_layers": None, "int8": False, "graph": "hf"}  # MiniLMEmbedder()'s


class Router:
    """A trained router as the gateway uses it.

    - ``score(text) -> float``: P(SLM answer good enough), in [0, 1]; higher = keep on the SLM. The
      scorer reads the text's first ``scorers.FEATURE_MAX_CHARS`` characters.
    - ``threshold``: requests scoring below it go to the LLM (calibrated: ``switchyard calibrate``).
    - ``meta``: the artifact's metadata (calibration table, cascade thresholds, training data).
    Thread-safe after ``load``; ``score`` is synchronous and CPU-only. A MiniLM kind's artifact ships its
    encoder graph: serving never exports one.
    """

    def __init__(self, scorer: Scorer, feats: Featurizers, meta: dict[str, Any]) -> None:
        self.scorer = scorer
        self.feats = feats
        self.meta = meta
        self.threshold = float(meta.get("threshold", 0.5))

    @property
    def kind(self) -> str:
        return self.scorer.kind

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """Read an artifact folder; ``artifact.ArtifactError`` (one line saying what to do) when it is not
        a loadable router."""
        art = artifact.load(path, kind=ROUTER_KIND)
        if (art.meta.get("scorer") or {}).get("kind") == "nmodel":
            raise artifact.ArtifactError(f"{str(path)!r} is an N-model router; load it with NModelScorer.from_state")
        try:
            router = cls.from_artifact(art)
        except (KeyError, ValueError) as e:
            raise artifact.ArtifactError(f"router artifact {str(path)!r} is malformed: {e}; retrain it") from None
        if router.scorer.uses_embeddings and not router.feats.has_embedder:
            raise artifact.ArtifactError(
                f"router artifact {str(path)!r} uses MiniLM but ships no encoder graph (written before artifacts "
                f"carried theirs); add it with `{ADD_ENCODER.format(path=path)}` (engine extra) or retrain it")
        if router.feats.has_embedder:
            router.feats.embedder.load()
        return router

    @classmethod
    def from_artifact(cls, art: artifact.Artifact) -> Router:
        meta = art.meta
        smeta = meta["scorer"]
        sarrays = {k[len("scorer."):]: v for k, v in art.arrays.items() if k.startswith("scorer.")}
        scorer = scorer_from_state(smeta, sarrays)
        tfidf = None
        if "featurizer" in meta and meta["featurizer"]:
            from routers.features import HashedTfidf

            tfidf = HashedTfidf.from_state(meta["featurizer"], {"idf": art.arrays["tfidf.idf"]})
        embedder = embedder_from_files(meta.get("encoder") or DEFAULT_ENCODER, art.files, "encoder.")
        return cls(scorer, Featurizers(tfidf=tfidf, embedder=embedder), meta)

    def to_artifact(self) -> artifact.Artifact:
        smeta, sarrays = self.scorer.state()
        meta = dict(self.meta)
        meta["scorer"] = smeta
        meta["threshold"] = self.threshold
        arrays = {f"scorer.{k}": v for k, v in sarrays.items()}
        if self.feats.tfidf is not None:
            fmeta, farrays = self.feats.tfidf.state()
            meta["featurizer"] = fmeta
            arrays["tfidf.idf"] = farrays["idf"]
        else:
            meta["featurizer"] = None
        files = {}
        if self.scorer.uses_embeddings:
            meta["encoder"] = self.feats.embedder.spec()
            files = encoder_files(self.feats.embedder, "encoder.")
        return artifact.Artifact(kind=ROUTER_KIND, meta=meta, arrays=arrays, files=files)

    def save(self, path: str | Path) -> Path:
        return self.to_artifact().save(path)

    def score(self, text: str) -> float:
        return self.scorer.score_one(text, self.feats)

    def score_batch(self, texts: Sequence[str]) -> np.ndarray:
        """``score`` of each text (float64 [n]), vectorised over the texts; one text is ``score`` itself
        (its single-text path is cheaper than a batch of one)."""
        if len(texts) == 1:
            return np.asarray([self.score(texts[0])], dtype=np.float64)
        return self.scorer.score_batch(list(texts), self.feats)
