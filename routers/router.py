"""The serving ``Router``: a trained scorer (``routers.scorers``) with its featurizers and threshold — or,
for an ``nmodel`` artifact, the per-model score heads and the quality tolerance — read from and written
to a router artifact."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routers import artifact
from routers.embeddings import embedder_from_files, encoder_files
from routers.scorers import ROUTER_KIND, Featurizers, NModelScorer, Scorer, scorer_from_state

ADD_ENCODER = "switchyard artifact add-encoder {path}"
DEFAULT_ENCODER = {"max_length": 256, "num_layers": None, "int8": False, "graph": "hf"}  # MiniLMEmbedder()'s
DEFAULT_TOLERANCE = 0.02  # an nmodel artifact's tolerance before `switchyard calibrate --max-cost`


class Router:
    """A trained router as the gateway uses it. Two kinds of artifact, one class:

    Two pools (SLM/LLM; every scorer kind but ``nmodel``):
    - ``score(text) -> float``: P(SLM answer good enough), in [0, 1]; higher = keep on the SLM. The
      scorer reads the text's first ``scorers.FEATURE_MAX_CHARS`` characters.
    - ``threshold``: requests scoring below it go to the LLM (calibrated: ``switchyard calibrate``).

    N pools (``is_nmodel``; kind ``nmodel``):
    - ``models``: the model names the artifact was trained on (the gateway maps them to pools);
    - ``predict(text) -> {model: predicted score}`` (higher = better answer, the training rows' scale);
    - ``tolerance``: ``auto`` picks the cheapest model predicted within it of the best (calibrated to a
      cost budget: ``switchyard calibrate --max-cost``).
    ``score`` on an N-model router and ``predict`` on a two-pool one raise ValueError.

    ``meta``: the artifact's metadata (calibration, cascade thresholds, prices, training data).
    Thread-safe after ``load``; scoring is synchronous and CPU-only. A MiniLM kind's artifact ships its
    encoder graph: serving never exports one.
    """

    def __init__(self, scorer: Scorer | NModelScorer, feats: Featurizers, meta: dict[str, Any]) -> None:
        self.scorer = scorer
        self.feats = feats
        self.meta = meta
        self.threshold = float(meta.get("threshold", 0.5))
        self.tolerance = float(meta.get("tolerance", DEFAULT_TOLERANCE))

    @property
    def kind(self) -> str:
        return "nmodel" if self.is_nmodel else self.scorer.kind

    @property
    def is_nmodel(self) -> bool:
        return isinstance(self.scorer, NModelScorer)

    @property
    def models(self) -> list[str]:
        """The N-model router's model names (sorted, as trained); empty for a two-pool router."""
        return list(self.scorer.models) if isinstance(self.scorer, NModelScorer) else []

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """Read an artifact folder; ``artifact.ArtifactError`` (one line saying what to do) when it is not
        a loadable router."""
        art = artifact.load(path, kind=ROUTER_KIND)
        try:
            router = cls.from_artifact(art)
        except (KeyError, ValueError) as e:
            raise artifact.ArtifactError(f"router artifact {str(path)!r} is malformed: {e}; retrain it") from None
        if router.is_nmodel:
            return router
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
        if smeta.get("kind") == "nmodel":  # its heads and TF-IDF are stored unprefixed (the first N-model layout)
            nm = NModelScorer.from_state(smeta, art.arrays)
            if nm.w.shape[1] != len(nm.models) or len(nm.b) != len(nm.models):
                raise ValueError(f"nmodel arrays do not match its {len(nm.models)} models")
            return cls(nm, nm.feats, meta)
        sarrays = {k[len("scorer."):]: v for k, v in art.arrays.items() if k.startswith("scorer.")}
        scorer = scorer_from_state(smeta, sarrays)
        tfidf = None
        if "featurizer" in meta and meta["featurizer"]:
            from routers.features import HashedTfidf

            tfidf = HashedTfidf.from_state(meta["featurizer"], {"idf": art.arrays["tfidf.idf"]})
        embedder = embedder_from_files(meta.get("encoder") or DEFAULT_ENCODER, art.files, "encoder.")
        return cls(scorer, Featurizers(tfidf=tfidf, embedder=embedder), meta)

    def to_artifact(self) -> artifact.Artifact:
        if isinstance(self.scorer, NModelScorer):
            smeta, arrays = self.scorer.state()
            meta = {**self.meta, "scorer": smeta, "tolerance": self.tolerance}
            return artifact.Artifact(kind=ROUTER_KIND, meta=meta, arrays=arrays)
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
        return self._pairwise("score").score_one(text, self.feats)

    def score_batch(self, texts: Sequence[str]) -> np.ndarray:
        """``score`` of each text (float64 [n]), vectorised over the texts; one text is ``score`` itself
        (its single-text path is cheaper than a batch of one)."""
        if len(texts) == 1:
            return np.asarray([self.score(texts[0])], dtype=np.float64)
        return self._pairwise("score_batch").score_batch(list(texts), self.feats)

    def predict(self, text: str) -> dict[str, float]:
        """N-model: ``{model: predicted score}`` for one text."""
        return self._nmodel("predict").predict(text)

    def predict_batch(self, texts: Sequence[str]) -> np.ndarray:
        """N-model: predicted scores ``[len(texts), len(models)]``, columns in ``models`` order."""
        return self._nmodel("predict_batch").predict_batch(list(texts))

    def _pairwise(self, what: str) -> Scorer:
        if isinstance(self.scorer, NModelScorer):
            raise ValueError(f"Router.{what}: an nmodel router predicts a score per model; use predict")
        return self.scorer

    def _nmodel(self, what: str) -> NModelScorer:
        if not isinstance(self.scorer, NModelScorer):
            raise ValueError(f"Router.{what}: a {self.kind} router scores two pools; use score")
        return self.scorer
