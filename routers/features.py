"""Text → features, the same code at training and at serving time.

``HashedTfidf``: hashed word and character n-gram TF-IDF, shared by the guard and the router. Stable
across processes and machines (a fixed FNV-1a/splitmix64 hash over Unicode code points and a CRC-32 over
words — never Python's ``hash()``), language-agnostic, fast for one short query (a few hundred
microseconds). MiniLM sentence embeddings are ``routers.embeddings``; the chat → text rule is
``routers.text``.

Nothing is loaded at import time.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FEATURES_VERSION = 1

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_SPACE_RE = re.compile(r"\s+")
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_WORD_SEED = np.uint64(0x5157A5D1)
_CHAR_SEED = np.uint64(0xC4A2B00F)


class _CountsMemo:
    """``HashedTfidf._counts``' memo: the last ``capacity`` texts' counts, shared by every thread.

    The guard and the router featurize the same request text with the same hashing settings; with the
    gateway's batchers they do so in two worker threads, a batch of texts each, one after the other. A
    small first-in-first-out memo keyed on (text, settings) lets the second featurizer reuse the first's
    work for every text of a batch (a one-entry memo per thread would miss them all). A text's counts are
    a pure function of the key, so a hit can never give one request another's features."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[tuple, _Counts] = {}  # insertion order = age
        self._lock = threading.Lock()

    def get(self, key: tuple) -> _Counts | None:
        return self._entries.get(key)

    def put(self, key: tuple, counts: _Counts) -> None:
        with self._lock:
            self._entries[key] = counts
            while len(self._entries) > self.capacity:
                del self._entries[next(iter(self._entries))]


_counts_memo = _CountsMemo(capacity=64)  # two batches of 32 texts; at most ~15 MB (2,000-character texts)


@dataclass(frozen=True)
class _Counts:
    """The IDF-free part of one text's TF-IDF row: per non-empty part (word, char) its sorted unique
    bucket ids and term weights (``1 + log tf`` or ``tf``); the row's columns (their union) and, when
    there are two parts, where each part's ids land in it."""

    parts: list[tuple[np.ndarray, np.ndarray]]
    cols: np.ndarray
    inv: np.ndarray | None


def _seed(base: np.uint64, n: int) -> np.uint64:
    return np.uint64((int(base) + n * int(_GOLDEN)) & 0xFFFFFFFFFFFFFFFF)


_MAX_N = 16  # n-gram orders with a precomputed seed; longer ones compute theirs
_CHAR_SEEDS = tuple(_seed(_CHAR_SEED, n) for n in range(_MAX_N))
_WORD_SEEDS = tuple(_seed(_WORD_SEED, n) for n in range(_MAX_N))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the low bits we keep."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def normalize_text(text: str) -> str:
    """Lower-case and collapse whitespace; the one normalisation every featurizer applies."""
    return _SPACE_RE.sub(" ", text.lower()).strip()


def char_ngram_hashes(text: str, ngram_range: tuple[int, int]) -> np.ndarray:
    """uint64 hashes of every character n-gram (n in ``ngram_range``) of ``" " + text + " "``."""
    lo, hi = ngram_range
    cps = np.frombuffer((" " + text + " ").encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    out: list[np.ndarray] = []
    h = (_FNV_OFFSET ^ cps) * _FNV_PRIME  # n = 1 at every position
    for n in range(1, hi + 1):
        if n > 1:
            if len(cps) < n:
                break
            h = (h[:-1] ^ cps[n - 1:]) * _FNV_PRIME
        if n >= lo:
            out.append(h ^ (_CHAR_SEEDS[n] if n < _MAX_N else _seed(_CHAR_SEED, n)))
    return _mix(np.concatenate(out)) if out else np.zeros(0, dtype=np.uint64)  # one elementwise pass


def word_ngram_hashes(text: str, ngram_range: tuple[int, int]) -> np.ndarray:
    """uint64 hashes of every word n-gram (``\\w+`` tokens) of a normalised text."""
    lo, hi = ngram_range
    words = _WORD_RE.findall(text)
    if not words:
        return np.zeros(0, dtype=np.uint64)
    base = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))  # UTF-8
    out: list[np.ndarray] = []
    h = (_FNV_OFFSET ^ base) * _FNV_PRIME
    mixed = _mix(base) if hi > 1 else base
    for n in range(1, hi + 1):
        if n > 1:
            if len(base) < n:
                break
            h = (h[:-1] ^ mixed[n - 1:]) * _FNV_PRIME
        if n >= lo:
            out.append(h ^ (_WORD_SEEDS[n] if n < _MAX_N else _seed(_WORD_SEED, n)))
    return _mix(np.concatenate(out)) if out else np.zeros(0, dtype=np.uint64)  # one elementwise pass


class HashedTfidf:
    """Hashed word + character n-gram TF-IDF.

    Contract:
    - ``transform`` returns a ``scipy.sparse.csr_matrix`` [n, n_features] float32. The word part and the
      character part are each L2-normalised and scaled by 1/sqrt(2), so every non-empty row has L2 norm 1
      (like a FeatureUnion of two normalised TF-IDF vectors; the row is renormalised after word and char
      n-grams that share a bucket are summed); an empty text gives an all-zero row.
    - Term frequency is ``1 + log(tf)`` when ``sublinear_tf``; IDF is sklearn's smoothed
      ``log((1 + n) / (1 + df)) + 1``, learned by ``fit`` (before ``fit`` the IDF is all ones).
    - Bucket ids depend only on the text and ``n_features``: the same in every process.
    - ``state()`` → ``(meta, arrays)`` with JSON-able meta and one array ``"idf"``; callers that store
      several featurizers in one artifact prefix the array names themselves.
    - Thread-safe for ``transform``/``transform_one`` after ``fit``.
    """

    def __init__(
        self,
        n_features: int = 2**18,
        word_ngrams: tuple[int, int] = (1, 2),
        char_ngrams: tuple[int, int] = (2, 5),
        sublinear_tf: bool = True,
    ) -> None:
        if n_features <= 0 or n_features & (n_features - 1):
            raise ValueError(f"n_features must be a power of two, got {n_features}")
        for name, (lo, hi) in (("word_ngrams", word_ngrams), ("char_ngrams", char_ngrams)):
            if not (0 <= lo <= hi) or (lo == 0 and hi != 0):
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, or (0, 0) to disable")
        self.n_features = int(n_features)
        self.word_ngrams = (int(word_ngrams[0]), int(word_ngrams[1]))
        self.char_ngrams = (int(char_ngrams[0]), int(char_ngrams[1]))
        self.sublinear_tf = bool(sublinear_tf)
        self.idf = np.ones(self.n_features, dtype=np.float32)
        self.num_docs = 0
        self._mask = np.uint64(self.n_features - 1)

    # -- bucket ids ---------------------------------------------------------------------------
    def _parts(self, text: str) -> list[np.ndarray]:
        """Bucket ids of the word part and the char part (each possibly empty)."""
        norm = normalize_text(text)
        parts = []
        if self.word_ngrams[0] > 0:
            parts.append((word_ngram_hashes(norm, self.word_ngrams) & self._mask).view(np.int64))  # < 2**63
        if self.char_ngrams[0] > 0 and norm:
            parts.append((char_ngram_hashes(norm, self.char_ngrams) & self._mask).view(np.int64))
        return parts

    def _counts(self, text: str) -> _Counts:
        """Everything about one text's row but the IDF (see ``_Counts``).

        The guard and the router featurize the same text with the same hashing settings, so recent
        results are kept (``_CountsMemo``) and reused when a call asks for the same text and settings.
        Its arrays are read-only.
        """
        key = (text, self.n_features, self.word_ngrams, self.char_ngrams, self.sublinear_tf)
        hit = _counts_memo.get(key)
        if hit is not None:
            return hit
        parts = []
        for ids in self._parts(text):
            if len(ids):
                u, tf = np.unique(ids, return_counts=True)
                parts.append((u, (1.0 + np.log(tf)) if self.sublinear_tf else tf.astype(np.float64)))
        if len(parts) > 1:  # word and char buckets may collide: the row's columns are their union
            cols, inv = np.unique(np.concatenate([u for u, _ in parts]), return_inverse=True)
        else:
            cols, inv = (parts[0][0] if parts else np.zeros(0, dtype=np.int64)), None
        counts = _Counts(parts, cols, inv)
        for arr in (cols, inv, *(x for part in parts for x in part)):
            if arr is not None:
                arr.flags.writeable = False
        _counts_memo.put(key, counts)
        return counts

    def _row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique column ids, float32 values) of one text."""
        counts = self._counts(text)
        if not counts.parts:
            return counts.cols, np.zeros(0, dtype=np.float32)
        scale = 1.0 / np.sqrt(len(counts.parts))
        vals = []
        for u, tfw in counts.parts:
            w = tfw * self.idf[u]
            w *= scale / np.sqrt(np.dot(w, w))
            vals.append(w)
        if counts.inv is None:
            return counts.cols, vals[0].astype(np.float32)
        w = np.bincount(counts.inv, weights=np.concatenate(vals), minlength=len(counts.cols))
        return counts.cols, (w / np.sqrt(np.dot(w, w))).astype(np.float32)  # word/char bucket collisions

    # -- API ------------------------------------------------------------------------------------
    def fit(self, texts: Iterable[str]) -> HashedTfidf:
        """Learn the IDF from ``texts``; returns self."""
        df = np.zeros(self.n_features, dtype=np.int64)
        n = 0
        for text in texts:
            parts = self._parts(text)
            if parts:
                df[np.unique(np.concatenate(parts))] += 1
            n += 1
        if n == 0:
            raise ValueError("HashedTfidf.fit needs at least one text")
        self.num_docs = n
        self.idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        return self

    def transform(self, texts: Sequence[str]):
        """[n, n_features] csr_matrix float32, rows as described in the class contract."""
        from scipy.sparse import csr_matrix

        indptr = [0]
        cols, vals = [], []
        for text in texts:
            c, v = self._row(text)
            cols.append(c)
            vals.append(v)
            indptr.append(indptr[-1] + len(c))
        indices = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        data = np.concatenate(vals) if vals else np.zeros(0, dtype=np.float32)
        return csr_matrix(
            (data, indices.astype(np.int32), np.asarray(indptr, dtype=np.int64)),
            shape=(len(indptr) - 1, self.n_features),
        )

    def transform_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The fast path for one query: (sorted column ids int64, values float32), no scipy."""
        return self._row(text)

    def fit_transform(self, texts: Sequence[str]):
        return self.fit(texts).transform(texts)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {
            "type": "hashed_tfidf",
            "version": FEATURES_VERSION,
            "n_features": self.n_features,
            "word_ngrams": list(self.word_ngrams),
            "char_ngrams": list(self.char_ngrams),
            "sublinear_tf": self.sublinear_tf,
            "num_docs": self.num_docs,
        }
        return meta, {"idf": self.idf.copy()}

    to_arrays = state

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> HashedTfidf:
        if meta.get("type") != "hashed_tfidf" or meta.get("version") != FEATURES_VERSION:
            raise ValueError(
                f"featurizer state is {meta.get('type')!r} v{meta.get('version')}, "
                f"expected 'hashed_tfidf' v{FEATURES_VERSION}; retrain the artifact"
            )
        obj = cls(
            n_features=int(meta["n_features"]),
            word_ngrams=tuple(meta["word_ngrams"]),
            char_ngrams=tuple(meta["char_ngrams"]),
            sublinear_tf=bool(meta["sublinear_tf"]),
        )
        idf = np.asarray(arrays["idf"], dtype=np.float32)
        if idf.shape != (obj.n_features,):
            raise ValueError(f"idf has shape {idf.shape}, expected ({obj.n_features},)")
        obj.idf = idf
        obj.num_docs = int(meta.get("num_docs", 0))
        return obj

    from_arrays = from_state
