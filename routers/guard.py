"""The guard: is a request in one of this deployment's domains, out of domain (``ood``), or ``unsafe``?

Two classifier kinds and their ensemble, each trained on in-domain rows only, with an out-of-domain
rule calibrated on in-domain dev rows only:

- ``widemlp``: hashed word + char n-gram TF-IDF (``routers.features.HashedTfidf``) → TF-IDF-weighted
  embedding bag (the wide first layer, one row per kept hash bucket) → ReLU → linear → softmax.
  Trained with torch on CPU, served with numpy (a gather and two small matmuls; well under a millisecond).
- ``embedding``: MiniLM sentence embedding (``routers.features.MiniLMEmbedder``) → linear softmax head.
- ``ensemble``: both; class probabilities averaged, OOD evidence from both members.

The OOD rule. Each member gives in-domain evidence scores (higher = more in-domain):
``msp`` (largest domain-class probability), ``knn`` (mean cosine similarity to the ``k`` nearest
training rows in the member's hidden/embedding space) and, for ``widemlp``, ``tfknn`` (the same in TF-IDF
space: catches foreign languages and off-topic vocabulary); ``energy`` and ``maha`` (Mahalanobis in hidden
space) exist for experiments. Each score is turned into an in-domain p-value against the dev rows, the
p-values are combined with Fisher's method (sum of logs), and a text is ``ood`` when that combination ranks
below the share ``1 - id_recall`` of the dev rows — by default of the dev rows the classifier assigns to the
same domain (per-class threshold; ``training/guard_select.py`` chose it, and which evidence to combine,
without test data). Nothing about OOD data is used unless ``--ood-train`` is given, in which
case ``ood`` becomes an extra trained class (reported separately: a deviation from the GQR protocol).
With ``--unsafe-train`` an ``unsafe`` class is trained and wins before the OOD rule; without it unsafe text
has no class of its own and is rejected by the OOD rule like any other foreign text.

Serving contract: ``Guard.load(path)`` reads an artifact folder once; ``classify`` and
``classify_messages`` are pure, synchronous, CPU-only, thread-safe and do no I/O (the ``embedding`` and
``ensemble`` kinds load MiniLM at ``load`` time). ``classify`` computes the cheapest evidence first and stops
as soon as the ``ood`` verdict can no longer change (``OODRule.rejects_for_sure``): foreign text — another
language, toxic posts — is rejected after the TF-IDF kNN alone, without MiniLM. The labels equal
``score_batch``'s, which computes everything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

try:  # scipy's C loops behind sparse row indexing and products (see _sparse_rows_dot)
    from scipy.sparse import _sparsetools
except ImportError:  # a scipy without them: the public product
    _sparsetools = None

from routers.artifact import Artifact, ArtifactError
from routers.artifact import load as load_artifact
from routers.features import HashedTfidf, MiniLMEmbedder, last_user_text

KINDS = ("widemlp", "embedding", "ensemble")
# meta["guard_format"]: 1 (absent) = the first release; 2 adds per-class OOD percentiles, extra widemlp
# seeds (members widemlp_1, ...) and "energy"/"maha" evidence. Format 1 artifacts load unchanged.
# 3 adds the optional early accept (``EarlyAccept``).
GUARD_FORMAT = 3
OOD = "ood"
UNSAFE = "unsafe"
RESERVED_LABELS = (OOD, UNSAFE)


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard says about one request.

    ``label``: ``"domain"`` (then ``domain`` names which), ``"ood"`` or ``"unsafe"`` (``domain`` is None).
    ``confidence``: in [0, 1], the guard's confidence in ``label`` (class probability for domain/unsafe;
    for ood, how far below the in-domain threshold the text fell). ``scores``: class probabilities plus
    ``id_percentile`` (in-domain evidence, 0..1) — for logs and metrics, not a stable schema.
    """

    label: Literal["domain", "ood", "unsafe"]
    domain: str | None
    confidence: float
    scores: dict[str, float]


def single_thread_blas() -> None:
    """Limit numpy's BLAS to one thread for this process (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return
    threadpool_limits(1, user_api="blas")


# --------------------------------------------------------------------------------------------------
# members: numpy inference
# --------------------------------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _normalize_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def _topk_mean(sims: np.ndarray, k: int) -> np.ndarray:
    k_eff = min(k, sims.shape[1])
    return np.partition(sims, sims.shape[1] - k_eff, axis=1)[:, -k_eff:].mean(axis=1)


def _knn_similarity(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine similarity of each (unit) query row to its ``k`` nearest (unit) reference rows."""
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), 512):
        out[start:start + 512] = _topk_mean(queries[start:start + 512] @ reference.T, k)
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
    directions in which near-domain OOD text differs: -2 on the selection protocol.)
    """

    mean: np.ndarray  # float32 [d_full]
    proj: np.ndarray  # float32 [d_full, d]
    reference_low: np.ndarray  # float32 [n_ref, d]: the reference rows in the coarse space
    candidates: int

    @classmethod
    def fit(cls, reference: np.ndarray, dims: int, candidates: int) -> CoarseRanking | None:
        """Principal directions of ``reference``; None when a coarse stage would not be smaller."""
        if not 0 < dims < min(reference.shape) or candidates >= len(reference):
            return None
        mean = reference.mean(axis=0)
        _, _, vt = np.linalg.svd((reference - mean).astype(np.float64), full_matrices=False)
        return cls.of(reference, mean.astype(np.float32), np.ascontiguousarray(vt[:dims].T, dtype=np.float32),
                      candidates)

    @classmethod
    def of(cls, reference: np.ndarray, mean: np.ndarray, proj: np.ndarray, candidates: int) -> CoarseRanking:
        return cls(mean, proj, np.ascontiguousarray((reference - mean) @ proj, dtype=np.float32), candidates)

    def knn(self, queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
        """As ``_knn_similarity(queries, reference, k)``, over the best ``candidates`` rows per query."""
        out = np.empty(len(queries), dtype=np.float32)
        c = self.candidates
        for start in range(0, len(queries), 256):
            q = queries[start:start + 256]
            coarse = ((q - self.mean) @ self.proj) @ self.reference_low.T  # [n, n_ref]
            cand = np.argpartition(coarse, coarse.shape[1] - c, axis=1)[:, -c:]  # [n, c]
            out[start:start + 256] = _topk_mean(np.einsum("ncd,nd->nc", reference[cand], q), k)
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


def _knn(queries: np.ndarray, reference: np.ndarray, k: int, coarse: CoarseRanking | None) -> np.ndarray:
    """kNN evidence of unit ``queries``: one exact scan, or two stages when ``coarse`` is set."""
    if coarse is None:
        return _knn_similarity(queries, reference, k)
    return coarse.knn(queries, reference, k)


@dataclass
class WideMLP:
    """TF-IDF-weighted embedding bag → ReLU → linear; numpy at serve time.

    ``col_map[bucket]`` is the row of ``w_in`` for a kept hash bucket, -1 for a dropped one.
    ``reference`` holds unit hidden vectors of (a sample of) the training rows, for kNN evidence.
    """

    featurizer: HashedTfidf
    col_map: np.ndarray  # int32 [n_features]
    w_in: np.ndarray  # float32 [n_kept, hidden]
    b_in: np.ndarray  # float32 [hidden]
    w_out: np.ndarray  # float32 [hidden, n_classes]
    b_out: np.ndarray  # float32 [n_classes]
    reference: np.ndarray  # float32 [n_ref, hidden], unit rows
    knn_k: int = 10
    ref_tf: Any = None  # optional scipy csr [n_features, n_ref]: TF-IDF rows of the reference set, transposed
    class_means: np.ndarray | None = None  # float32 [n_domains, hidden]: for "maha" evidence
    precision: np.ndarray | None = None  # float32 [hidden, hidden]: inverse shared covariance, for "maha"
    tfknn_terms: int = 0  # "tfknn" uses a text's this many highest-weighted n-grams (0: all of them)
    coarse: CoarseRanking | None = None  # two-stage "knn" search (None: one exact scan)

    def _extra(self, h: np.ndarray, logits: np.ndarray, comps: dict[str, np.ndarray]) -> None:
        """``energy`` (logsumexp of the logits) and, when fitted, ``maha`` (minus the smallest
        class-conditional Mahalanobis distance, shared covariance) — both higher = more in-domain."""
        m = logits.max(axis=1, keepdims=True)
        comps["energy"] = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))).astype(np.float32)
        if self.class_means is not None and self.precision is not None:
            d = h[:, None, :] - self.class_means[None, :, :]  # [n, C, H]
            dist = ((d @ self.precision) * d).sum(axis=2)  # d P d^T per class (einsum's path search cost more)
            comps["maha"] = (-dist.min(axis=1)).astype(np.float32)

    def _hidden_rows(self, X) -> np.ndarray:
        from scipy.sparse import csr_matrix

        rows = self.col_map[X.indices]
        keep = rows >= 0
        kept_per_row = np.zeros(X.shape[0], dtype=np.int64)
        nz = np.diff(X.indptr) > 0
        if X.nnz:
            kept_per_row[nz] = np.add.reduceat(keep.astype(np.int64), X.indptr[:-1][nz])
        indptr = np.concatenate([[0], np.cumsum(kept_per_row)]).astype(np.int64)
        Xc = csr_matrix((X.data[keep], rows[keep], indptr), shape=(X.shape[0], self.w_in.shape[0]))
        return np.maximum(np.asarray(Xc @ self.w_in) + self.b_in, 0.0).astype(np.float32)

    def hidden(self, texts: Sequence[str]) -> np.ndarray:
        return self._hidden_rows(self.featurizer.transform(texts))

    def evidence_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(class probabilities [n, C], {component: in-domain score [n]}), every component computed."""
        X = self.featurizer.transform(texts)
        h = self._hidden_rows(X)
        comps = {"knn": _knn(_normalize_rows(h), self.reference, self.knn_k, self.coarse)}
        if self.ref_tf is not None:
            sims = np.asarray((_top_terms_rows(X, self.tfknn_terms) @ self.ref_tf).todense(), dtype=np.float32)
            comps["tfknn"] = _topk_mean(sims, self.knn_k)
        logits = h @ self.w_out + self.b_out
        self._extra(h, logits, comps)
        return _softmax(logits), comps

    def evidence_one(self, text: str, features: tuple[np.ndarray, np.ndarray] | None = None,
                     wanted: frozenset[str] | None = None, tfknn: np.ndarray | None = None
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One text; ``features`` = ``self.featurizer.transform_one(text)`` when the caller has it already
        (``tfknn`` = ``tfknn_one(*features)`` likewise). ``wanted``: the kNN components to compute (None:
        all) — the OOD rule may not use every one, and each kNN search reads a whole reference matrix."""
        cols, vals = features if features is not None else self.featurizer.transform_one(text)
        rows = self.col_map[cols]
        keep = rows >= 0
        h = np.maximum(vals[keep] @ self.w_in[rows[keep]] + self.b_in, 0.0)[None, :]
        comps = {}
        if wanted is None or "knn" in wanted:
            comps["knn"] = _knn(_normalize_rows(h), self.reference, self.knn_k, self.coarse)
        if self.ref_tf is not None and (wanted is None or "tfknn" in wanted):
            comps["tfknn"] = tfknn if tfknn is not None else self.tfknn_one(cols, vals)
        logits = h @ self.w_out + self.b_out
        self._extra(h, logits, comps)
        return _softmax(logits), comps

    def tfknn_one(self, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """The ``tfknn`` evidence [1] of one text's TF-IDF row (needs ``ref_tf``)."""
        sims = _sparse_rows_dot(self.ref_tf, *_top_terms(cols, vals, self.tfknn_terms))
        return _topk_mean(sims[None, :], self.knn_k)

    def state(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fmeta, farrays = self.featurizer.state()
        arrays = {f"{prefix}idf": farrays["idf"], f"{prefix}col_map": self.col_map.astype(np.int32),
                  f"{prefix}w_in": self.w_in.astype(np.float16), f"{prefix}b_in": self.b_in,
                  f"{prefix}w_out": self.w_out, f"{prefix}b_out": self.b_out,
                  f"{prefix}reference": self.reference.astype(np.float16)}
        if self.ref_tf is not None:
            arrays.update({f"{prefix}ref_tf.data": self.ref_tf.data.astype(np.float16),
                           f"{prefix}ref_tf.indices": self.ref_tf.indices.astype(np.int32),
                           f"{prefix}ref_tf.indptr": self.ref_tf.indptr.astype(np.int64)})
        has_maha = self.class_means is not None and self.precision is not None
        if has_maha:
            arrays.update({f"{prefix}class_means": self.class_means.astype(np.float32),
                           f"{prefix}precision": self.precision.astype(np.float32)})
        cmeta, carrays = self.coarse.state(prefix) if self.coarse is not None else ({}, {})
        arrays.update(carrays)
        return {"type": "widemlp", "featurizer": fmeta, **cmeta,
                "num_reference_tf": 0 if self.ref_tf is None else int(self.ref_tf.shape[1]),
                "hidden": int(self.w_in.shape[1]), "knn_k": self.knn_k, "tfknn_terms": self.tfknn_terms,
                "num_kept_features": int(self.w_in.shape[0]), "mahalanobis": has_maha}, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> WideMLP:
        reference = arrays[f"{prefix}reference"].astype(np.float32)
        return cls(
            featurizer=HashedTfidf.from_state(meta["featurizer"], {"idf": arrays[f"{prefix}idf"]}),
            col_map=arrays[f"{prefix}col_map"].astype(np.int64),
            w_in=arrays[f"{prefix}w_in"].astype(np.float32),
            b_in=arrays[f"{prefix}b_in"].astype(np.float32),
            w_out=arrays[f"{prefix}w_out"].astype(np.float32),
            b_out=arrays[f"{prefix}b_out"].astype(np.float32),
            reference=reference,
            knn_k=int(meta["knn_k"]),
            ref_tf=_load_ref_tf(meta, arrays, prefix),
            class_means=arrays[f"{prefix}class_means"].astype(np.float32) if meta.get("mahalanobis") else None,
            precision=arrays[f"{prefix}precision"].astype(np.float32) if meta.get("mahalanobis") else None,
            tfknn_terms=int(meta.get("tfknn_terms", 0)),
            coarse=CoarseRanking.from_state(meta, arrays, prefix, reference),
        )


def _top_terms(cols: np.ndarray, vals: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``limit`` highest-weighted (column, value) pairs of one TF-IDF row, in column order (all of
    them when ``limit`` is 0 or the row is short). A long text's cosine to the reference rows is
    carried by its rarest n-grams; gathering every reference row of its ~2,000 n-grams made "tfknn" the
    guard's p99 (1.5 ms of 5)."""
    if limit <= 0 or len(cols) <= limit:
        return cols, vals
    keep = np.sort(np.argpartition(-vals, limit - 1)[:limit])
    return cols[keep], vals[keep]


def _top_terms_rows(X: Any, limit: int) -> Any:
    """``_top_terms`` applied to every row of a CSR matrix (the batch path of the same rule)."""
    if limit <= 0 or not len(X.indptr) or np.diff(X.indptr).max(initial=0) <= limit:
        return X
    from scipy.sparse import csr_matrix

    cols, vals, indptr = [], [], [0]
    for i in range(X.shape[0]):
        a, b = X.indptr[i], X.indptr[i + 1]
        c, v = _top_terms(X.indices[a:b], X.data[a:b], limit)
        cols.append(c)
        vals.append(v)
        indptr.append(indptr[-1] + len(c))
    return csr_matrix((np.concatenate(vals), np.concatenate(cols), np.asarray(indptr)), shape=X.shape)


def _sparse_rows_dot(csr: Any, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weights @ csr[rows]`` as float32 [n_cols]: the same float32 sums, added in the same order, as
    scipy's ``q @ csr`` for the sparse row ``q`` (what ``score_batch`` computes), so ``classify`` and
    ``score_batch`` agree to the bit.

    scipy's own C loops do the work without building matrices: ``csr_row_index`` (what fancy row indexing
    runs) copies the rows' entries out, and ``csc_matvec`` sums the copy, read as a CSC matrix, into the
    columns. For a 1,000-character text (about 170 k reference entries) that is 0.5 ms, against 1.9 ms for
    numpy's gather-and-bincount and for the public ``q @ csr`` (which first counts the product's nonzeros).
    The two functions are scipy internals (pinned in pyproject); without them the public product runs.
    """
    n_cols = csr.shape[1]
    out = np.zeros(n_cols, dtype=np.float32)
    if not len(rows):
        return out
    weights = np.asarray(weights, dtype=np.float32)
    if _sparsetools is None or csr.data.dtype != np.float32 or csr.indices.dtype != csr.indptr.dtype:
        from scipy.sparse import csr_matrix

        q = csr_matrix((weights, np.asarray(rows, dtype=np.int64), [0, len(rows)]), shape=(1, csr.shape[0]))
        return np.asarray((q @ csr).todense(), dtype=np.float32)[0]
    idx = csr.indptr.dtype
    rows = np.asarray(rows, dtype=idx)
    indptr = np.zeros(len(rows) + 1, dtype=idx)
    np.cumsum(csr.indptr[rows + 1] - csr.indptr[rows], out=indptr[1:])
    nnz = int(indptr[-1])
    indices, data = np.empty(nnz, dtype=csr.indices.dtype), np.empty(nnz, dtype=np.float32)
    _sparsetools.csr_row_index(len(rows), rows, csr.indptr, csr.indices, csr.data, indices, data)
    _sparsetools.csc_matvec(n_cols, len(rows), indptr, indices, data, weights, out)
    return out


def _load_ref_tf(meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str):
    n_ref = int(meta.get("num_reference_tf", 0))
    if not n_ref:
        return None
    from scipy.sparse import csr_matrix

    ref = csr_matrix((arrays[f"{prefix}ref_tf.data"].astype(np.float32), arrays[f"{prefix}ref_tf.indices"],
                      arrays[f"{prefix}ref_tf.indptr"]), shape=(int(meta["featurizer"]["n_features"]), n_ref))
    try:  # every index in range (O(nnz), once): _sparse_rows_dot's C loops do not check them
        ref.check_format(full_check=True)
    except ValueError as e:
        raise ValueError(f"bad TF-IDF kNN references ({e})") from None
    return ref


@dataclass
class EmbeddingHead:
    """MiniLM embedding → linear softmax head; kNN evidence against training embeddings."""

    embedder: MiniLMEmbedder
    w: np.ndarray  # float32 [384, n_classes]
    b: np.ndarray  # float32 [n_classes]
    reference: np.ndarray  # float32 [n_ref, 384], unit rows
    knn_k: int = 10
    coarse: CoarseRanking | None = None  # two-stage "knn" search (None: one exact scan)

    def evidence_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.evidence_from(self.embedder.encode(list(texts)))

    def evidence_one(self, text: str, wanted: frozenset[str] | None = None
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.evidence_from(self.embedder.encode_one(text)[None, :], wanted)

    def evidence_from(self, emb: np.ndarray, wanted: frozenset[str] | None = None
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        comps = {}
        if wanted is None or "knn" in wanted:
            comps["knn"] = _knn(emb, self.reference, self.knn_k, self.coarse)
        return _softmax(emb @ self.w + self.b), comps

    def state(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"{prefix}w": self.w, f"{prefix}b": self.b, f"{prefix}reference": self.reference.astype(np.float16)}
        cmeta, carrays = self.coarse.state(prefix) if self.coarse is not None else ({}, {})
        arrays.update(carrays)
        return {"embedder": "minilm", **self.embedder.spec(), "knn_k": self.knn_k, **cmeta}, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str,
                   embedder: MiniLMEmbedder | None = None) -> EmbeddingHead:
        reference = arrays[f"{prefix}reference"].astype(np.float32)
        return cls(
            embedder=embedder or MiniLMEmbedder(max_length=int(meta.get("max_length", 256)),
                                                num_layers=meta.get("num_layers"), int8=bool(meta.get("int8")),
                                                graph=meta.get("graph", "hf")),  # before "graph": the HF one
            w=arrays[f"{prefix}w"].astype(np.float32), b=arrays[f"{prefix}b"].astype(np.float32),
            reference=reference, knn_k=int(meta["knn_k"]),
            coarse=CoarseRanking.from_state(meta, arrays, prefix, reference),
        )


Member = WideMLP | EmbeddingHead


def _mean_of(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise mean of same-shaped arrays, summed in order (as ``np.mean(arrays, axis=0)``) but
    without stacking them first; one array is returned as is (the common single-member case)."""
    if len(arrays) == 1:
        return arrays[0]
    total = arrays[0] + arrays[1]
    for a in arrays[2:]:
        total += a
    return total / len(arrays)


def _share_featurizers(members: dict[str, Member]) -> None:
    """Let widemlp seeds fitted on the same texts share one featurizer object (one transform per query)."""
    seen: list[HashedTfidf] = []
    for m in members.values():
        if not isinstance(m, WideMLP):
            continue
        same = next((f for f in seen if f.state()[0] == m.featurizer.state()[0]
                     and np.array_equal(f.idf, m.featurizer.idf)), None)
        if same is None:
            seen.append(m.featurizer)
        else:
            m.featurizer = same


def named_evidence(family: str, comps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A member's evidence under the names the OOD rule uses (``knn`` → ``widemlp.knn``)."""
    return {f"{family}.{c}": v for c, v in comps.items()}


def _family(member_name: str) -> str:
    """``widemlp_2`` → ``widemlp``: extra seeds of a member kind share its evidence names."""
    return member_name.split("_", 1)[0]


# --------------------------------------------------------------------------------------------------
# the OOD rule
# --------------------------------------------------------------------------------------------------


@dataclass
class OODRule:
    """Dev-calibrated in-domain percentile, combining components with Fisher's method.

    Each component score ``s`` becomes ``p = (rank of s among the sorted dev scores + 0.5) / (n_dev + 1)``
    (its in-domain p-value); the combination is ``sum(log p)`` over components, and ``percentile`` is the
    share of dev rows whose combination is lower — so a text with ``percentile < threshold_for(r)`` is
    rejected and exactly ``r`` of the dev rows (up to ties) are kept.

    Per-class variant (``class_combined`` set): the percentile is taken among the dev rows the classifier
    assigns to the same domain as the text, so every domain keeps (at most, up to one row) ``r`` of its
    dev rows — a domain whose rows carry weaker evidence is not rejected more often than the others.
    """

    dev_scores: dict[str, np.ndarray]  # component → sorted dev scores
    dev_combined: np.ndarray  # sorted Fisher combinations of the dev rows
    id_recall: float
    threshold: float = 0.0
    class_combined: list[np.ndarray] | None = None  # per domain index: sorted combinations of its dev rows

    @classmethod
    def calibrate(cls, dev_components: dict[str, np.ndarray], id_recall: float,
                  dev_pred: np.ndarray | None = None, num_domains: int = 0) -> OODRule:
        """``dev_pred`` (predicted domain index per dev row) + ``num_domains`` make a per-class rule."""
        if not 0.0 < id_recall <= 1.0:
            raise ValueError(f"id_recall must be in (0, 1], got {id_recall}")
        sorted_scores = {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in dev_components.items()}
        rule = cls(dev_scores=sorted_scores, dev_combined=np.zeros(0), id_recall=id_recall)
        combined = rule.fisher(dev_components)
        rule.dev_combined = np.sort(combined)
        if dev_pred is not None:
            dev_pred = np.asarray(dev_pred)
            rule.class_combined = [np.sort(combined[dev_pred == c]) for c in range(num_domains)]
        rule.threshold = rule.threshold_for(id_recall)
        return rule

    def fisher(self, components: dict[str, np.ndarray]) -> np.ndarray:
        total = None
        for name, ref in self.dev_scores.items():
            rank = np.searchsorted(ref, np.asarray(components[name], dtype=np.float64), side="left")
            logp = np.log((rank + 0.5) / (len(ref) + 1.0))
            total = logp if total is None else total + logp
        return total

    def percentile(self, components: dict[str, np.ndarray], pred: np.ndarray | None = None) -> np.ndarray:
        """In-domain percentile per row; ``pred`` (predicted domain index per row) is required by a
        per-class rule and ignored otherwise."""
        combined = self.fisher(components)
        if self.class_combined is None:
            return np.searchsorted(self.dev_combined, combined, side="left") / len(self.dev_combined)
        if pred is None:
            raise ValueError("a per-class OOD rule needs the predicted domain of every row")
        out = np.empty(len(combined), dtype=np.float64)
        for i, (c, v) in enumerate(zip(np.asarray(pred), combined, strict=True)):
            ref = self.class_combined[int(c)] if int(c) < len(self.class_combined) else self.dev_combined
            ref = ref if len(ref) else self.dev_combined
            out[i] = np.searchsorted(ref, v, side="left") / len(ref)
        return out

    def rejects_for_sure(self, partial: dict[str, np.ndarray], threshold: float | None = None) -> tuple[bool, float]:
        """Whether one text whose evidence is known only in part (``partial``: some of the rule's
        components, each [1]) is rejected whatever the others turn out to be, and the largest in-domain
        percentile it can still reach. The unknown components are set to their most in-domain p-value
        (the Fisher sum only grows with each), and the text must fall below the threshold among the dev
        rows of every domain (a per-class rule does not know the predicted domain yet). So a ``True`` is
        exact: computing the rest could not change the ``ood`` verdict."""
        bound = 0.0
        for name, ref in self.dev_scores.items():
            rank = np.searchsorted(ref, float(partial[name][0]), side="left") if name in partial else len(ref)
            bound += math.log((rank + 0.5) / (len(ref) + 1.0))
        refs = [r if len(r) else self.dev_combined for r in self.class_combined or [self.dev_combined]]
        pct = max(np.searchsorted(r, bound, side="left") / len(r) for r in refs)
        return pct < (self.threshold if threshold is None else threshold), float(pct)

    def threshold_for(self, id_recall: float) -> float:
        """Percentile threshold keeping ``id_recall`` of the dev rows; monotone non-increasing in it."""
        if not 0.0 < id_recall <= 1.0:
            raise ValueError(f"id_recall must be in (0, 1], got {id_recall}")
        if self.class_combined is not None:
            return 1.0 - id_recall - 1e-9
        n = len(self.dev_combined)
        return math.floor((1.0 - id_recall) * n + 1e-9) / n

    def with_id_recall(self, id_recall: float) -> OODRule:
        return OODRule(self.dev_scores, self.dev_combined, id_recall, self.threshold_for(id_recall),
                       self.class_combined)


@dataclass
class EarlyAccept:
    """Stop after the ``widemlp`` member for a text it alone already rates clearly in-domain: its own OOD
    rule (the full rule's ``widemlp.*`` components, calibrated on the same dev rows) puts the text at or
    above ``percentile`` of the dev rows, and the verdict is widemlp's most probable domain. Unlike the
    early rejection this can change a verdict — MiniLM's evidence might have rejected the text — so its
    price is measured (``training/guard_select.py --early-accept``; BENCHMARKS "Guard")."""

    rule: OODRule
    percentile: float

    def accepts(self, wide_components: dict[str, np.ndarray]) -> np.ndarray:
        """Per row: whether the widemlp evidence alone is in-domain enough to stop."""
        comps = {k: wide_components[k] for k in self.rule.dev_scores}
        return self.rule.percentile(comps) >= self.percentile


# --------------------------------------------------------------------------------------------------
# the guard
# --------------------------------------------------------------------------------------------------


@dataclass
class GuardBatch:
    """Batched raw outputs, for evaluation: class probabilities, in-domain percentile, verdict labels."""

    probs: np.ndarray  # [n, C] over Guard.classes
    id_percentile: np.ndarray  # [n]
    labels: list[str]  # per row: a domain name, "ood" or "unsafe"


@dataclass
class Guard:
    kind: str
    classes: list[str]  # classifier outputs: domains, then "unsafe"/"ood" when trained
    members: dict[str, Member]
    rule: OODRule
    max_chars: int = 2000
    meta: dict[str, Any] = field(default_factory=dict)
    early_accept: EarlyAccept | None = None  # used only when ``can_exit_early``

    @property
    def domains(self) -> list[str]:
        return [c for c in self.classes if c not in RESERVED_LABELS]

    # -- scoring --------------------------------------------------------------------------------------
    def _combine(self, outs: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Average class probabilities; name the evidence ``family.component`` (+ ``msp``), where members
        ``widemlp``, ``widemlp_1``, ... (seeds of one family) contribute the mean of their values."""
        n_dom = len(self.domains)
        probs = _mean_of([p for p, _ in outs.values()])
        families: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
        for name, out in outs.items():
            families.setdefault(_family(name), []).append(out)
        comps: dict[str, np.ndarray] = {}
        for fam, items in families.items():
            comps[f"{fam}.msp"] = _mean_of([p for p, _ in items])[:, :n_dom].max(axis=1)
            for comp in dict.fromkeys(c for _, mc in items for c in mc):
                comps[f"{fam}.{comp}"] = _mean_of([mc[comp] for _, mc in items if comp in mc])
        return probs, comps

    def evidence_wanted(self, member_name: str) -> frozenset[str]:
        """The components of ``member_name``'s family that the OOD rule combines (``msp``/``energy`` are
        computed regardless: they cost nothing)."""
        fam = _family(member_name)
        return frozenset(c.split(".", 1)[1] for c in self.rule.dev_scores if c.split(".", 1)[0] == fam)

    def predicted_domain(self, probs: np.ndarray) -> np.ndarray:
        """Index of the most probable domain class per row (reserved classes ignored)."""
        return probs[:, : len(self.domains)].argmax(axis=1)

    def _decide(self, probs: np.ndarray, pct: np.ndarray, threshold: float) -> list[str]:
        labels = []
        for p, q in zip(probs, pct, strict=True):
            top = self.classes[int(np.argmax(p))]
            if top in RESERVED_LABELS:
                labels.append(top)
            elif q < threshold:
                labels.append(OOD)
            else:
                labels.append(top)
        return labels

    def score_batch(self, texts: Sequence[str], id_recall: float | None = None,
                    progress: Callable[[int], None] | None = None) -> GuardBatch:
        """Batched scoring (evaluation, calibration). ``id_recall`` overrides the stored threshold."""
        texts = [t[: self.max_chars] for t in texts]
        outs = {}
        for name, m in self.members.items():
            outs[name] = m.evidence_batch(texts)
        probs, comps = self._combine(outs)
        pct = self.rule.percentile(comps, self.predicted_domain(probs))
        threshold = self.rule.threshold if id_recall is None else self.rule.threshold_for(id_recall)
        labels = self._decide(probs, pct, threshold)
        if self.early_accept is not None and self.can_exit_early:  # what classify decides after widemlp
            wide_probs, wide_comps = outs["widemlp"]
            named = named_evidence("widemlp", wide_comps)
            for i in np.flatnonzero(self.early_accept.accepts(named)):
                if not self.rule.rejects_for_sure({k: v[i:i + 1] for k, v in named.items()}, threshold)[0]:
                    labels[i] = self.domains[int(self.predicted_domain(wide_probs[i:i + 1])[0])]
        return GuardBatch(probs=probs, id_percentile=pct, labels=labels)

    def classify(self, text: str) -> GuardVerdict:
        """Verdict for one text (already the text to judge; chats go through ``classify_messages``)."""
        if not isinstance(text, str):
            raise ValueError(f"classify expects a str, got {type(text).__name__}")
        text = text[: self.max_chars]
        outs = {}
        features: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # one transform per shared featurizer
        tfknn = None
        if self.can_exit_early:  # the cheapest evidence first: TF-IDF kNN alone rejects most foreign text
            wide = self.members["widemlp"]
            features[id(wide.featurizer)] = wide.featurizer.transform_one(text)
            tfknn = wide.tfknn_one(*features[id(wide.featurizer)])
            sure, pct = self.rule.rejects_for_sure({"widemlp.tfknn": tfknn})
            if sure:
                return self._early_ood(pct)
        # widemlp members first: the early checks run between them and the costlier embedding member
        for name, m in sorted(self.members.items(), key=lambda item: not isinstance(item[1], WideMLP)):
            wanted = self.evidence_wanted(name)
            if isinstance(m, WideMLP):
                key = id(m.featurizer)
                if key not in features:
                    features[key] = m.featurizer.transform_one(text)
                outs[name] = m.evidence_one(text, features[key], wanted, tfknn if name == "widemlp" else None)
            else:
                if self.can_exit_early and "widemlp" in outs:  # before the costlier member: is widemlp's enough?
                    named = named_evidence("widemlp", outs["widemlp"][1])
                    sure, pct = self.rule.rejects_for_sure(named)
                    if sure:
                        return self._early_ood(pct)
                    if self.early_accept is not None and self.early_accept.accepts(named)[0]:
                        return self._early_domain(outs["widemlp"][0][0])
                outs[name] = m.evidence_one(text, wanted)
        probs, comps = self._combine({name: outs[name] for name in self.members})  # score_batch's order
        p = probs[0]
        pct = float(self.rule.percentile(comps, self.predicted_domain(probs))[0])
        label = self._decide(probs, np.array([pct]), self.rule.threshold)[0]
        scores = {c: float(v) for c, v in zip(self.classes, p, strict=True)}
        scores["id_percentile"] = pct
        if label == OOD:
            if self.classes[int(np.argmax(p))] == OOD:  # the trained ood class won
                conf = float(p[self.classes.index(OOD)])
            else:  # rejected by the rule: how far below the threshold
                conf = 1.0 - pct / max(self.rule.threshold, 1e-9)
            return GuardVerdict("ood", None, min(max(conf, 0.0), 1.0), scores)
        if label == UNSAFE:
            return GuardVerdict("unsafe", None, float(p[self.classes.index(UNSAFE)]), scores)
        return GuardVerdict("domain", label, float(p[self.classes.index(label)]), scores)

    @property
    def can_exit_early(self) -> bool:
        """Whether ``classify`` may stop before computing every member: the rule combines the one widemlp's
        TF-IDF kNN evidence, and no trained class (``ood``/``unsafe``) could outrank the OOD rule."""
        wide = self.members.get("widemlp")
        return (isinstance(wide, WideMLP) and wide.ref_tf is not None and "widemlp.tfknn" in self.rule.dev_scores
                and not any(_family(n) == "widemlp" and n != "widemlp" for n in self.members)
                and not any(c in RESERVED_LABELS for c in self.classes))

    def _early_ood(self, pct: float) -> GuardVerdict:
        """The ``ood`` verdict of a text rejected before every member ran (``rejects_for_sure``): the same
        label the full computation gives; ``scores`` has no class probabilities, ``id_percentile`` is an
        upper bound, and ``early_exit`` is 1."""
        conf = 1.0 - pct / max(self.rule.threshold, 1e-9)
        return GuardVerdict("ood", None, min(max(conf, 0.0), 1.0), {"id_percentile": pct, "early_exit": 1.0})

    def _early_domain(self, wide_probs: np.ndarray) -> GuardVerdict:
        """The verdict of a text accepted on widemlp's evidence alone (``EarlyAccept``): its most probable
        domain; ``scores`` are widemlp's class probabilities and ``early_exit`` is 1."""
        domain = self.domains[int(np.argmax(wide_probs[: len(self.domains)]))]
        scores = {c: float(v) for c, v in zip(self.classes, wide_probs, strict=True)}
        scores["early_exit"] = 1.0
        return GuardVerdict("domain", domain, scores[domain], scores)

    def classify_messages(self, messages: list[dict]) -> GuardVerdict:
        """Verdict for a chat: judged on ``last_user_text(messages, max_chars)`` (see routers.features)."""
        return self.classify(last_user_text(messages, self.max_chars))

    def with_id_recall(self, id_recall: float) -> Guard:
        """A copy whose OOD threshold keeps ``id_recall`` of the dev rows (members shared)."""
        return Guard(self.kind, self.classes, self.members, self.rule.with_id_recall(id_recall), self.max_chars,
                     self.meta, self.early_accept)

    # -- artifacts ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        arrays: dict[str, np.ndarray] = {"rule.dev_combined": self.rule.dev_combined}
        members_meta = {}
        for name, m in self.members.items():
            mmeta, marrays = m.state(f"{name}.")
            members_meta[name] = mmeta
            arrays.update(marrays)
        for comp, ref in self.rule.dev_scores.items():
            arrays[f"rule.dev.{comp}"] = ref
        for c, ref in enumerate(self.rule.class_combined or []):
            arrays[f"rule.class_combined.{c}"] = ref
        if self.early_accept is not None:
            arrays["early.dev_combined"] = self.early_accept.rule.dev_combined
            for comp, ref in self.early_accept.rule.dev_scores.items():
                arrays[f"early.dev.{comp}"] = ref
        meta = {
            **self.meta,
            "description": f"switchyard guard ({self.kind})",
            "guard_kind": self.kind,
            "guard_format": GUARD_FORMAT,
            "labels": self.classes,
            "domains": self.domains,
            "members": members_meta,
            "thresholds": {"id_recall": self.rule.id_recall, "id_percentile": self.rule.threshold,
                           "components": sorted(self.rule.dev_scores),
                           "per_class": self.rule.class_combined is not None,
                           "early_accept": None if self.early_accept is None else {
                               "percentile": self.early_accept.percentile,
                               "components": sorted(self.early_accept.rule.dev_scores)}},
            "max_chars": self.max_chars,
        }
        return Artifact(kind="guard", meta=meta, arrays=arrays).save(path)

    @classmethod
    def load(cls, path: str | Path, embedder: MiniLMEmbedder | None = None) -> Guard:
        """Read an artifact folder; raises ``ArtifactError`` when it is not a loadable guard.

        Side effect: limits OpenBLAS/MKL to one thread in this process (``single_thread_blas``): the
        guard's small matrix-vector products are 5-100x slower with BLAS threads, worst under load."""
        single_thread_blas()
        art = load_artifact(path, kind="guard")
        meta, arrays = art.meta, art.arrays
        fmt = meta.get("guard_format", 1)
        if not isinstance(fmt, int) or fmt > GUARD_FORMAT:
            raise ArtifactError(f"guard artifact {str(path)!r} has guard format {fmt!r}, newer than this "
                                f"switchyard (format {GUARD_FORMAT}); upgrade switchyard to load it")
        try:
            kind = meta["guard_kind"]
            members: dict[str, Member] = {}
            for name, mmeta in meta["members"].items():
                if _family(name) == "widemlp":
                    members[name] = WideMLP.from_state(mmeta, arrays, f"{name}.")
                elif name == "embedding":
                    head = EmbeddingHead.from_state(mmeta, arrays, f"{name}.", embedder)
                    head.embedder.load()
                    members[name] = head
                else:
                    raise ArtifactError(f"unknown guard member {name!r}")
            _share_featurizers(members)
            th = meta["thresholds"]
            rule = OODRule(
                dev_scores={c: arrays[f"rule.dev.{c}"] for c in th["components"]},
                dev_combined=arrays["rule.dev_combined"],
                id_recall=float(th["id_recall"]),
                threshold=float(th["id_percentile"]),
                class_combined=[arrays[f"rule.class_combined.{c}"] for c in range(len(meta["domains"]))]
                if th.get("per_class") else None,
            )
            early = None
            if th.get("early_accept"):
                ea = th["early_accept"]
                early = EarlyAccept(OODRule(dev_scores={c: arrays[f"early.dev.{c}"] for c in ea["components"]},
                                            dev_combined=arrays["early.dev_combined"], id_recall=rule.id_recall),
                                    float(ea["percentile"]))
        except KeyError as e:
            raise ArtifactError(f"guard artifact {str(path)!r} is missing {e}; retrain it") from None
        except ValueError as e:
            raise ArtifactError(f"guard artifact {str(path)!r} is malformed: {e}; retrain it") from None
        return cls(kind=kind, classes=list(meta["labels"]), members=members, rule=rule,
                   max_chars=int(meta.get("max_chars", 2000)), meta=meta, early_accept=early)
