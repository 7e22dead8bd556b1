"""The ``widemlp`` member: hashed TF-IDF → TF-IDF-weighted embedding bag → ReLU → linear, numpy at serve
time (trained with torch by ``training.guard_fit``)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from routers.features import HashedTfidf
from routers.guard.knn import CoarseRanking, centroid_similarity, knn, normalize_rows, topk_mean
from routers.guard.sparse import sparse_row_times, sparse_rows_dot, top_terms

# ``msp`` (the largest domain probability) is computed for every member by the guard itself; "energy" and
# "maha" exist for experiments and live with them (training/guard_select.py experiment_evidence).
# "centroid" (hidden-space domain centroids, when fitted) and "vocab" (the share of a text's TF-IDF weight on
# n-grams among the training rows' most frequent ones) are computed when a rule names them.
WIDEMLP_EVIDENCE = ("knn", "tfknn", "centroid", "vocab")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class TfidfRows:
    """TF-IDF rows of some texts in CSR layout (sorted columns per row), without building a scipy matrix:
    one query's row costs what ``HashedTfidf.transform_one`` costs."""

    indices: np.ndarray  # int64 column ids, row after row
    data: np.ndarray  # float32 values
    indptr: np.ndarray  # int64 [num_rows + 1]

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    def take(self, rows: np.ndarray) -> TfidfRows:
        """The rows at positions ``rows`` (int array), in that order."""
        lengths = np.diff(self.indptr)[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        pieces = [slice(self.indptr[r], self.indptr[r + 1]) for r in rows]
        if not pieces:
            return TfidfRows(self.indices[:0], self.data[:0], indptr)
        return TfidfRows(np.concatenate([self.indices[p] for p in pieces]),
                         np.concatenate([self.data[p] for p in pieces]), indptr)

    @classmethod
    def of(cls, featurizer: HashedTfidf, texts: Sequence[str]) -> TfidfRows:
        rows = [featurizer.transform_one(t) for t in texts]
        if len(rows) == 1:
            return cls(rows[0][0], rows[0][1], np.array([0, len(rows[0][0])], dtype=np.int64))
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(c) for c, _ in rows], out=indptr[1:])
        return cls(np.concatenate([c for c, _ in rows]) if rows else np.zeros(0, np.int64),
                   np.concatenate([v for _, v in rows]) if rows else np.zeros(0, np.float32), indptr)


@dataclass
class WideMLP:
    """TF-IDF-weighted embedding bag → ReLU → linear; numpy at serve time.

    ``col_map[bucket]`` is the row of ``w_in`` for a kept hash bucket, -1 for a dropped one.
    ``reference`` holds unit hidden vectors of (a sample of) the training rows, for ``knn`` evidence;
    ``ref_tf`` their TF-IDF rows, for ``tfknn`` evidence.
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
    # class means and inverse shared covariance in hidden space, for the experiments' "maha" evidence
    # (stored with the artifact; serving never reads them)
    class_means: np.ndarray | None = None  # float32 [n_domains, hidden]
    precision: np.ndarray | None = None  # float32 [hidden, hidden]
    tfknn_terms: int = 0  # "tfknn" uses a text's this many highest-weighted n-grams (0: all of them)
    coarse: CoarseRanking | None = None  # two-stage "knn" search (None: one exact scan)
    centroids: np.ndarray | None = None  # float32 [m, hidden] unit domain centroids, for "centroid" evidence

    # -- evidence -------------------------------------------------------------------------------------
    def rows(self, texts: Sequence[str], cache: dict | None = None) -> TfidfRows:
        """The texts' TF-IDF rows; ``cache`` (one dict per call, shared by the members) keeps them per
        featurizer, so seeds fitted on the same texts transform once."""
        if cache is None:
            return TfidfRows.of(self.featurizer, texts)
        key = ("tfidf", id(self.featurizer))
        if key not in cache:
            cache[key] = TfidfRows.of(self.featurizer, texts)
        return cache[key]

    def hidden_of(self, X: TfidfRows) -> np.ndarray:
        """Hidden activations [n, hidden] of TF-IDF rows: a sparse product with ``w_in``'s kept rows. One row
        (the serving path) runs scipy's loop for that row alone (``sparse_row_times``: no sparse matrix
        built, no copy of the rows it reads), with the same sums a batch's product gives it."""
        rows = self.col_map[X.indices]
        keep = rows >= 0
        if X.num_rows == 1:
            return np.maximum(sparse_row_times(rows[keep], X.data[keep], self.w_in) + self.b_in, 0.0)[None, :]
        from scipy.sparse import csr_matrix

        kept_per_row = np.zeros(X.num_rows, dtype=np.int64)
        nz = np.diff(X.indptr) > 0
        if len(X.data):
            kept_per_row[nz] = np.add.reduceat(keep.astype(np.int64), X.indptr[:-1][nz])
        indptr = np.concatenate([[0], np.cumsum(kept_per_row)]).astype(np.int64)
        Xc = csr_matrix((X.data[keep], rows[keep], indptr), shape=(X.num_rows, self.w_in.shape[0]))
        return np.maximum(np.asarray(Xc @ self.w_in) + self.b_in, 0.0).astype(np.float32)

    def hidden(self, texts: Sequence[str]) -> np.ndarray:
        return self.hidden_of(TfidfRows.of(self.featurizer, texts))

    def tfknn(self, X: TfidfRows, cache: dict | None = None) -> np.ndarray:
        """The ``tfknn`` evidence [n] of TF-IDF rows (needs ``ref_tf``): the mean of the ``knn_k`` largest
        dot products of each row's top ``tfknn_terms`` n-grams with the reference rows. Kept in ``cache``."""
        key = ("tfknn", id(self))
        if cache is not None and key in cache:
            return cache[key]
        out = np.empty(X.num_rows, dtype=np.float32)
        for start in range(0, X.num_rows, 256):  # 256 rows of similarities at a time
            stop = min(start + 256, X.num_rows)
            sims = np.empty((stop - start, self.ref_tf.shape[1]), dtype=np.float32)
            for i in range(start, stop):
                a, b = X.indptr[i], X.indptr[i + 1]
                sims[i - start] = sparse_rows_dot(self.ref_tf, *top_terms(X.indices[a:b], X.data[a:b],
                                                                          self.tfknn_terms))
            out[start:stop] = topk_mean(sims, self.knn_k)
        if cache is not None:
            cache[key] = out
        return out

    def evidence(self, texts: Sequence[str], wanted: Collection[str] | None = None, cache: dict | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(class probabilities [n, C], {component: in-domain score [n]}) for the components in ``wanted``
        (None: every one of ``WIDEMLP_EVIDENCE`` — training asks for that)."""
        wanted = WIDEMLP_EVIDENCE if wanted is None else wanted
        X = self.rows(texts, cache)
        h = self.hidden_of(X)
        comps: dict[str, np.ndarray] = {}
        if "knn" in wanted:
            comps["knn"] = knn(normalize_rows(h), self.reference, self.knn_k, self.coarse)
        if "tfknn" in wanted and self.ref_tf is not None:
            comps["tfknn"] = self.tfknn(X, cache)
        if "centroid" in wanted and self.centroids is not None:
            comps["centroid"] = centroid_similarity(normalize_rows(h), self.centroids)
        if "vocab" in wanted:
            comps["vocab"] = self.vocab(X)
        return softmax(self.logits_of(h)), comps

    def add_references(self, texts: Sequence[str], max_df: float = 0.05) -> None:
        """Append ``texts`` (in-domain examples a deployment adds: ``Guard.add_examples``) to the ``tfknn``
        reference rows, when kept (their TF-IDF rows without the buckets the training-time reference dropped
        as too common, estimated from the featurizer's document frequencies: more than ``max_df`` of the
        rows, as ``tfidf_reference``), and to the ``knn`` reference rows (their unit hidden vectors) — the
        latter only for a text no closer to the empty text's hidden vector than 99 % of the reference rows
        are: the hidden layer maps text whose n-grams it never kept to nearly that one point, where such a
        reference would vouch for any text of unknown words, foreign ones included."""
        if not texts:
            return
        X = TfidfRows.of(self.featurizer, texts)
        hid = normalize_rows(self.hidden_of(X))
        empty = normalize_rows(np.maximum(self.b_in, 0.0)[None, :])[0]  # where text of unknown n-grams lands
        known = hid @ empty <= np.quantile(self.reference @ empty, 0.99)
        if known.any():
            self.reference = np.ascontiguousarray(np.concatenate([self.reference, hid[known]]), dtype=np.float32)
        if self.coarse is not None:
            self.coarse = CoarseRanking.of(self.reference, self.coarse.mean, self.coarse.proj, self.coarse.candidates)
        if self.ref_tf is None:
            return
        from scipy.sparse import csr_matrix, hstack

        n_ref, n_docs = self.ref_tf.shape[1], max(self.featurizer.num_docs, 1)
        df_share = ((1.0 + n_docs) / np.exp(self.featurizer.idf[X.indices].astype(np.float64) - 1.0) - 1.0) / n_docs
        keep = df_share * n_ref <= max(1, int(max_df * n_ref))
        row_of = np.repeat(np.arange(X.num_rows), np.diff(X.indptr))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of[keep], minlength=X.num_rows))])
        new = csr_matrix((X.data[keep].astype(np.float32), X.indices[keep], indptr),
                         shape=(X.num_rows, self.ref_tf.shape[0]))
        ref = hstack([self.ref_tf, new.T], format="csr", dtype=np.float32)
        ref.sort_indices()
        ref.indices, ref.indptr = ref.indices.astype(np.int64), ref.indptr.astype(np.int64)  # sparse_rows_dot's C loops
        self.ref_tf = ref

    def vocab(self, X: TfidfRows) -> np.ndarray:
        """``vocab`` evidence [n]: the share of each row's squared TF-IDF weight (rows have unit norm) on
        kept buckets, the training rows' most frequent n-grams."""
        w = np.where(self.col_map[X.indices] >= 0, X.data.astype(np.float64) ** 2, 0.0)
        row_of = np.repeat(np.arange(X.num_rows), np.diff(X.indptr))
        return np.bincount(row_of, weights=w, minlength=X.num_rows).astype(np.float32)

    def logits_of(self, h: np.ndarray) -> np.ndarray:
        return h @ self.w_out + self.b_out

    # -- artifact -------------------------------------------------------------------------------------
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
        if self.centroids is not None:
            arrays[f"{prefix}centroids"] = self.centroids.astype(np.float32)
        return {"type": "widemlp", "num_centroids": 0 if self.centroids is None else len(self.centroids), "featurizer": fmeta, **cmeta,
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
            centroids=arrays[f"{prefix}centroids"].astype(np.float32) if meta.get("num_centroids") else None,
        )


def _load_ref_tf(meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str):
    n_ref = int(meta.get("num_reference_tf", 0))
    if not n_ref:
        return None
    from scipy.sparse import csr_matrix

    ref = csr_matrix((arrays[f"{prefix}ref_tf.data"].astype(np.float32), arrays[f"{prefix}ref_tf.indices"],
                      arrays[f"{prefix}ref_tf.indptr"]), shape=(int(meta["featurizer"]["n_features"]), n_ref))
    try:  # every index in range (O(nnz), once): sparse_rows_dot's C loops do not check them
        ref.check_format(full_check=True)
    except ValueError as e:
        raise ValueError(f"bad TF-IDF kNN references ({e})") from None
    return ref
