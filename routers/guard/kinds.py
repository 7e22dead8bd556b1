"""Guard kinds: which members a guard has and the training defaults chosen for it.

A kind is picked by name — ``guard_kind(meta["guard_kind"])`` when an artifact loads, ``train guard
--kind`` when one is trained — and an unknown name is a ValueError listing the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from routers.embeddings import MiniLMEmbedder
from routers.guard.embedding import EmbeddingHead
from routers.guard.widemlp import WideMLP

Member = WideMLP | EmbeddingHead


def family(member_name: str) -> str:
    """``widemlp_2`` → ``widemlp``: extra seeds of a member type share its evidence names."""
    return member_name.split("_", 1)[0]


class GuardKind:
    """A guard kind: its member families, cheapest first (``classify`` runs them in this order and may
    stop between them), and the training defaults ``training/guard_select.py`` chose for it (FitConfig
    fields; BENCHMARKS "Guard")."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    defaults: ClassVar[dict[str, Any]]

    @classmethod
    def load_member(cls, name: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], files: dict[str, Path],
                    embedder: MiniLMEmbedder | None = None) -> Member:
        """One stored member; ValueError when this kind has no member of that name."""
        if family(name) not in cls.families:
            raise ValueError(f"a {cls.name} guard has no member {name!r} (members: {', '.join(cls.families)})")
        if family(name) == "widemlp":
            return WideMLP.from_state(meta, arrays, f"{name}.")
        return EmbeddingHead.from_state(meta, arrays, f"{name}.", files, embedder)


class WideMLPGuard(GuardKind):
    """TF-IDF embedding bag (``WideMLP``), optionally several seeds: the fastest (the default)."""

    name = "widemlp"
    families = ("widemlp",)
    # one global threshold (+0.7 over per-domain ones); exact kNN searches (two-stage: -0.2)
    defaults = {"per_class_threshold": False, "id_recall": 0.9}


class EmbeddingGuard(GuardKind):
    """MiniLM embedding → linear head (``EmbeddingHead``)."""

    name = "embedding"
    families = ("embedding",)
    defaults = {"per_class_threshold": False, "id_recall": 0.9}  # follows the others, unmeasured


class EnsembleGuard(GuardKind):
    """Both members, probabilities averaged, evidence from both: the accurate one."""

    name = "ensemble"
    families = ("widemlp", "embedding")
    # one global threshold (+0.7); two-stage kNN searches in 64 principal dims (as good as exact there, a
    # fraction of the memory read per query); early accept at widemlp percentile 0.3 (~70 % of in-domain
    # dev rows stop after widemlp; the ood-val fold loses nothing, leave-one-domain-out at most 1 point)
    # semantic accept at 0.25 over MiniLM domain-centroid similarity (one centroid per domain) + TF-IDF kNN:
    # leave-one-source-out protocol +10.5 GQR, ood-val fold -0.4 (within the 0.5 allowed; 2026-12-06)
    defaults = {"per_class_threshold": False, "hidden_knn_dims": 64, "embedding_knn_dims": 64, "early_accept": 0.3,
                "id_recall": 0.9, "centroids_per_domain": 1, "semantic_accept": 0.25}


GUARD_KINDS: dict[str, type[GuardKind]] = {k.name: k for k in (WideMLPGuard, EmbeddingGuard, EnsembleGuard)}
DEFAULT_KIND = "ensemble"  # what `switchyard train guard` builds without --kind (BENCHMARKS "Guard")


def guard_kind(name: str) -> type[GuardKind]:
    if name not in GUARD_KINDS:
        raise ValueError(f"unknown guard kind {name!r}; valid kinds: {', '.join(GUARD_KINDS)}")
    return GUARD_KINDS[name]
