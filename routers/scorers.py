"""Scorers: P(the weak model's answer is good enough | prompt); the serving ``Router`` is ``routers.router``.

Every scorer maps texts to a number where **higher = keep on the weak model (SLM)**; the learned ones
are Platt-calibrated so the number is a probability that the weak answer scores at least as well as the
strong one. Learned scorers regress the *gain* ``strong_score - weak_score`` (ranking by expected gain is
what the PGR curve rewards) and map it through a 1-D logistic fitted on the training rows.

Kinds (``SCORERS``; ``make_scorer(kind)`` raises ValueError listing them):

- ``random``        deterministic pseudo-random score from a hash of the text (the APGR ≈ 0.5 baseline)
- ``always_strong`` 0.0 for everything: every request goes to the strong model
- ``length``        longer prompts are less likely to be handled by the weak model
- ``tfidf_lr``      hashed word+char TF-IDF → logistic regression on the binary label (the plain baseline)
- ``tfidf_ridge``   hashed TF-IDF → ridge regression on the gain
- ``tfidf_source_ridge`` per-source ridge heads, the head picked by a TF-IDF source classifier
- ``minilm_mlp``    MiniLM embedding → small MLP on the gain
- ``knn``           MiniLM embedding → similarity-weighted mean gain of the k nearest training prompts
- ``ensemble``      mean of standardised member predictions (tfidf_ridge + minilm_mlp + knn by default)

Serving code needs numpy only (plus ONNX Runtime when a MiniLM kind is used: the artifact ships the graph);
training uses scikit-learn / torch and is imported lazily inside ``fit``. Nothing here imports ``training``.

``NModelScorer`` is the N-model variant: one ridge head per model predicting that model's score, and
``choose(text, prices, tolerance)`` picks the cheapest model whose predicted score is within
``tolerance`` of the best predicted score.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ROUTER_KIND = "router"
FEATURE_MAX_CHARS = 2000


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))


@dataclass
class Platt:
    """P(weak good enough) = sigmoid(a * raw + b); raw is the scorer's 'weak is fine' signal."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return _sigmoid(self.a * np.asarray(raw, dtype=np.float64) + self.b)

    @classmethod
    def fit(cls, raw: np.ndarray, label: np.ndarray) -> Platt:
        from sklearn.linear_model import LogisticRegression

        raw = np.asarray(raw, dtype=np.float64).reshape(-1, 1)
        label = np.asarray(label).astype(int)
        if len(set(label.tolist())) < 2 or float(raw.std()) == 0.0:
            return cls(0.0, float(np.log((label.mean() + 1e-3) / (1 - label.mean() + 1e-3))))
        lr = LogisticRegression(C=100.0, max_iter=1000).fit(raw, label)
        return cls(float(lr.coef_[0, 0]), float(lr.intercept_[0]))


# --------------------------------------------------------------------------------------------------
# featurizers shared by the learned scorers (built lazily, stored in the artifact)
# --------------------------------------------------------------------------------------------------


class Featurizers:
    """Holds the featurizers a scorer tree needs: the TF-IDF and, for the MiniLM kinds, the embedder (a
    trained router's ships inside its artifact; training prepares one with ``MiniLMEmbedder.prepare``).
    Each cuts a text to its first ``FEATURE_MAX_CHARS`` characters."""

    def __init__(self, tfidf=None, embedder=None) -> None:
        self.tfidf = tfidf
        self._embedder = embedder

    @property
    def embedder(self):
        if self._embedder is None:
            from routers.embeddings import MiniLMEmbedder

            self._embedder = MiniLMEmbedder(num_threads=1)  # the prepared default graph, if any
        return self._embedder

    @property
    def has_embedder(self) -> bool:
        return self._embedder is not None

    def tfidf_rows(self, texts: Sequence[str]):
        return self.tfidf.transform([t[:FEATURE_MAX_CHARS] for t in texts])

    def tfidf_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self.tfidf.transform_one(text[:FEATURE_MAX_CHARS])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.encode([t[:FEATURE_MAX_CHARS] for t in texts])


# --------------------------------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------------------------------


class Scorer:
    """Base: ``raw_batch`` gives the 'weak is fine' signal; ``score_batch`` the calibrated probability."""

    kind = "base"
    uses_tfidf = False
    uses_embeddings = False
    uses_sources = False  # fit(..., sources=[row source, ...]) when True

    def __init__(self) -> None:
        self.platt = Platt()

    def fit(self, texts: Sequence[str], gain: np.ndarray, feats: Featurizers, seed: int = 0) -> Scorer:
        return self

    def raw_batch(self, texts: Sequence[str], feats: Featurizers) -> np.ndarray:
        raise NotImplementedError

    def raw_one(self, text: str, feats: Featurizers) -> float:
        return float(self.raw_batch([text], feats)[0])

    def score_batch(self, texts: Sequence[str], feats: Featurizers) -> np.ndarray:
        return self.platt(self.raw_batch(texts, feats))

    def score_one(self, text: str, feats: Featurizers) -> float:
        """``score_batch`` of one text (kinds with a faster single-text path override it)."""
        return float(self.score_batch([text], feats)[0])

    def calibrate(self, texts: Sequence[str], gain: np.ndarray, feats: Featurizers) -> None:
        self.platt = Platt.fit(self.raw_batch(texts, feats), np.asarray(gain) <= 0)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"kind": self.kind, "platt": [self.platt.a, self.platt.b]}, {}

    def _load(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        a, b = meta.get("platt", [1.0, 0.0])
        self.platt = Platt(float(a), float(b))


class RandomScorer(Scorer):
    kind = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def raw_batch(self, texts, feats):
        out = []
        for t in texts:
            h = hashlib.sha1(f"{self.seed}:{t}".encode()).digest()
            out.append(int.from_bytes(h[:8], "big") / 2.0**64)
        return np.asarray(out)

    def score_batch(self, texts, feats):
        return self.raw_batch(texts, feats)

    def state(self):
        meta, arrays = super().state()
        meta["seed"] = self.seed
        return meta, arrays

    def _load(self, meta, arrays):
        super()._load(meta, arrays)
        self.seed = int(meta.get("seed", 0))


class AlwaysStrongScorer(Scorer):
    kind = "always_strong"

    def raw_batch(self, texts, feats):
        return np.zeros(len(texts))

    def score_batch(self, texts, feats):
        return np.zeros(len(texts))


class LengthScorer(Scorer):
    """raw = -log(1 + characters): long prompts go to the strong model first."""

    kind = "length"

    def raw_batch(self, texts, feats):
        return -np.log1p(np.asarray([len(t) for t in texts], dtype=np.float64))

    def fit(self, texts, gain, feats, seed=0):
        self.calibrate(texts, gain, feats)
        return self


class _Linear(Scorer):
    """Linear head on hashed TF-IDF; weights are a dense vector over the hashed buckets."""

    uses_tfidf = True

    def __init__(self, alpha: float = 3.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.w = np.zeros(0, dtype=np.float32)
        self.b = 0.0

    def raw_batch(self, texts, feats):
        x = feats.tfidf_rows(texts)
        return np.asarray(x @ self.w, dtype=np.float64).ravel() + self.b

    def raw_one(self, text, feats):
        cols, vals = feats.tfidf_one(text)
        return float(np.dot(self.w[cols], vals)) + self.b

    def score_one(self, text, feats):
        return float(self.platt(np.asarray([self.raw_one(text, feats)]))[0])

    def state(self):
        meta, arrays = super().state()
        meta["alpha"] = self.alpha
        meta["b"] = self.b
        arrays["w"] = self.w.astype(np.float32)
        return meta, arrays

    def _load(self, meta, arrays):
        super()._load(meta, arrays)
        self.alpha = float(meta.get("alpha", 1.0))
        self.b = float(meta["b"])
        self.w = np.asarray(arrays["w"], dtype=np.float32)


class TfidfRidgeScorer(_Linear):
    """Ridge regression of the gain on TF-IDF; raw = -predicted gain."""

    kind = "tfidf_ridge"

    def fit(self, texts, gain, feats, seed=0):
        from sklearn.linear_model import Ridge

        x = feats.tfidf_rows(texts)
        model = Ridge(alpha=self.alpha, solver="auto").fit(x, np.asarray(gain, dtype=np.float64))
        self.w = (-model.coef_).astype(np.float32)
        self.b = float(-model.intercept_)
        self.calibrate(texts, gain, feats)
        return self


class TfidfLRScorer(_Linear):
    """Logistic regression of 'weak >= strong' on TF-IDF (RouteLLM-style plain baseline)."""

    kind = "tfidf_lr"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha=alpha)

    def fit(self, texts, gain, feats, seed=0):
        from sklearn.linear_model import LogisticRegression

        x = feats.tfidf_rows(texts)
        y = (np.asarray(gain) <= 0).astype(int)
        model = LogisticRegression(C=1.0 / self.alpha, max_iter=3000).fit(x, y)
        self.w = model.coef_[0].astype(np.float32)
        self.b = float(model.intercept_[0])
        self.platt = Platt(1.0, 0.0)
        return self


class SourceRidgeScorer(Scorer):
    """Per-source ridge heads chosen by a source classifier, all on hashed TF-IDF.

    Training rows carry ``source``. Every source with at least ``min_source_rows`` fit rows is a class;
    the remaining rows form ``__other__``. A multinomial logistic regression on the same features
    predicts the class of a prompt, and the prompt is scored by that class's head (hard assignment:
    heads are on different scales). A class's head is either a ridge fitted on that source alone
    (alpha ``alpha * sqrt(n_all / n_source)``: smaller sources shrink more) or the ridge fitted on all
    rows (what ``tfidf_ridge`` is): the own head is kept only when, in ``select_folds``-fold
    cross-validation on the fit rows, its APGR on that source beats the all-rows ridge by at least
    ``select_margin`` (``head_of`` records the choice). ``__other__`` always uses the all-rows ridge;
    with fewer than two classes this is plain ``tfidf_ridge``. raw = -predicted gain.
    """

    kind = "tfidf_source_ridge"
    uses_tfidf = True
    uses_sources = True
    OTHER = "__other__"

    def __init__(self, alpha: float = 3.0, min_source_rows: int = 200, classifier_c: float = 10.0,
                 select_margin: float = 0.01, select_folds: int = 3, balanced: bool = False) -> None:
        super().__init__()
        self.balanced = balanced
        self.alpha, self.min_source_rows, self.classifier_c = alpha, min_source_rows, classifier_c
        self.select_margin, self.select_folds = select_margin, select_folds
        self.classes: list[str] = []
        self.head_of: dict[str, str] = {}  # class -> "source" (own head) | "all" (all-rows ridge)
        self.w = np.zeros((0, 0), dtype=np.float32)  # [n_features, n_heads]; column 0 = all-rows ridge
        self.b = np.zeros(0, dtype=np.float32)
        self.head_index = np.zeros(0, dtype=np.int64)  # class -> column of w
        self.wc = np.zeros((0, 0), dtype=np.float32)  # [n_features, n_classes] classifier
        self.bc = np.zeros(0, dtype=np.float32)

    def _head_alpha(self, num_rows: int, num_source_rows: int) -> float:
        return self.alpha * math.sqrt(num_rows / num_source_rows)

    def _own_head_wins(self, x, gain: np.ndarray, label: np.ndarray, seed: int,
                       head_apgr: Callable[[np.ndarray, np.ndarray], float]) -> dict[str, bool]:
        """Per class: does its own head beat the all-rows ridge on its rows, out of fold, by the margin?"""
        from sklearn.linear_model import Ridge
        from sklearn.model_selection import KFold

        classes = [c for c in self.classes if c != self.OTHER]
        total = {c: [0.0, 0.0] for c in classes}  # [own, all-rows] summed APGR
        folds = KFold(self.select_folds, shuffle=True, random_state=seed).split(np.arange(len(gain)))
        for tr, te in folds:
            glob = Ridge(alpha=self.alpha).fit(x[tr], gain[tr])
            for c in classes:
                a, b = tr[label[tr] == c], te[label[te] == c]
                own = Ridge(alpha=self._head_alpha(len(tr), len(a))).fit(x[a], gain[a])
                total[c][0] += head_apgr(-own.predict(x[b]), gain[b])
                total[c][1] += head_apgr(-glob.predict(x[b]), gain[b])
        return {c: (own - other) / self.select_folds >= self.select_margin for c, (own, other) in total.items()}

    def fit(self, texts, gain, feats, seed=0, sources: Sequence[str] | None = None,
            head_apgr: Callable[[np.ndarray, np.ndarray], float] | None = None):
        """``sources``: one per row; ``head_apgr(scores, gain)``: the APGR of scores on rows whose weak score
        is 0 and strong score ``gain`` (``training.fit`` passes ``training.evaluate``'s)."""
        from sklearn.linear_model import LogisticRegression, Ridge

        if sources is None or len(sources) != len(texts):
            raise ValueError("tfidf_source_ridge needs one source per training row")
        x = feats.tfidf_rows(texts)
        gain = np.asarray(gain, dtype=np.float64)
        src = np.asarray([str(s) for s in sources])
        names, counts = np.unique(src, return_counts=True)
        headed = [str(n) for n, c in zip(names, counts, strict=True) if c >= self.min_source_rows]
        label = np.where(np.isin(src, headed), src, self.OTHER)
        self.classes = sorted(set(label.tolist()))
        if len(self.classes) >= 2 and head_apgr is None:
            raise ValueError("tfidf_source_ridge needs head_apgr to choose between heads (training.fit passes it)")
        wins = self._own_head_wins(x, gain, label, seed, head_apgr) if len(self.classes) >= 2 else {}
        self.head_of = {c: "source" if wins.get(c) else "all" for c in self.classes}
        glob = Ridge(alpha=self.alpha).fit(x, gain)
        heads, biases, index = [-np.asarray(glob.coef_, dtype=np.float64)], [-float(glob.intercept_)], []
        for c in self.classes:  # column 0: the all-rows ridge; then one column per own head
            rows = np.nonzero(label == c)[0]
            if self.head_of[c] == "all":
                index.append(0)
                continue
            model = Ridge(alpha=self._head_alpha(len(texts), len(rows))).fit(x[rows], gain[rows])
            index.append(len(heads))
            heads.append(-np.asarray(model.coef_, dtype=np.float64))
            biases.append(-float(model.intercept_))
        self.w = np.stack(heads, axis=1).astype(np.float32)
        self.b = np.asarray(biases, dtype=np.float32)
        self.head_index = np.asarray(index, dtype=np.int64)
        if len(self.classes) >= 2:
            clf = LogisticRegression(C=self.classifier_c, max_iter=3000,
                                     class_weight="balanced" if self.balanced else None).fit(x, label)
            assert list(clf.classes_) == self.classes, (clf.classes_, self.classes)
            coef, icpt = clf.coef_, clf.intercept_
            if len(self.classes) == 2:  # sklearn keeps one row for two classes
                coef, icpt = np.vstack([-coef[0] / 2, coef[0] / 2]), np.asarray([-icpt[0] / 2, icpt[0] / 2])
            self.wc = coef.T.astype(np.float16).astype(np.float32)  # stored as float16
            self.bc = np.asarray(icpt, dtype=np.float32)
        else:
            self.wc = np.zeros((0, 0), dtype=np.float32)
            self.bc = np.zeros(0, dtype=np.float32)
        self.calibrate(texts, gain, feats)
        return self

    def raw_batch(self, texts, feats):
        x = feats.tfidf_rows(texts)
        cls = (np.asarray(x @ self.wc + self.bc).argmax(axis=1) if len(self.classes) >= 2
               else np.zeros(len(texts), dtype=int))
        heads = np.asarray(x @ self.w) + self.b
        return heads[np.arange(len(texts)), self.head_index[cls]].astype(np.float64)

    def raw_one(self, text, feats):
        cols, vals = feats.tfidf_one(text)
        k = int(np.argmax(vals @ self.wc[cols] + self.bc)) if len(self.classes) >= 2 else 0
        h = int(self.head_index[k])
        return float(np.dot(self.w[cols, h], vals)) + float(self.b[h])

    def score_one(self, text, feats):
        return float(self.platt(np.asarray([self.raw_one(text, feats)]))[0])

    def source_of(self, text: str, feats: Featurizers) -> str:
        """The source whose head scores ``text`` (``__other__`` = the all-rows head)."""
        if len(self.classes) < 2:
            return self.classes[0]
        cols, vals = feats.tfidf_one(text)
        return self.classes[int(np.argmax(vals @ self.wc[cols] + self.bc))]

    def state(self):
        meta, arrays = super().state()
        meta.update(alpha=self.alpha, min_source_rows=self.min_source_rows, classifier_c=self.classifier_c,
                    select_margin=self.select_margin, select_folds=self.select_folds, balanced=self.balanced,
                    classes=self.classes,
                    head_of=self.head_of)
        arrays.update(w=self.w, b=self.b, head_index=self.head_index, wc=self.wc.astype(np.float16), bc=self.bc)
        return meta, arrays

    def _load(self, meta, arrays):
        super()._load(meta, arrays)
        self.alpha = float(meta["alpha"])
        self.min_source_rows = int(meta["min_source_rows"])
        self.classifier_c = float(meta["classifier_c"])
        self.select_margin, self.select_folds = float(meta["select_margin"]), int(meta["select_folds"])
        self.balanced = bool(meta["balanced"])
        self.classes = [str(c) for c in meta["classes"]]
        self.head_of = {str(k): str(v) for k, v in meta["head_of"].items()}
        self.w, self.b = np.asarray(arrays["w"], dtype=np.float32), np.asarray(arrays["b"], dtype=np.float32)
        self.head_index = np.asarray(arrays["head_index"], dtype=np.int64)
        self.wc, self.bc = np.asarray(arrays["wc"], dtype=np.float32), np.asarray(arrays["bc"], dtype=np.float32)
        if (len(self.head_index) != len(self.classes) or int(self.head_index.max(initial=0)) >= self.w.shape[1]
                or (len(self.classes) >= 2 and self.wc.shape[1] != len(self.classes))):
            raise ValueError(f"tfidf_source_ridge arrays do not match its {len(self.classes)} classes")


class MiniLMMLPScorer(Scorer):
    """One-hidden-layer MLP (ReLU) on the MiniLM embedding, trained with MSE on the gain."""

    kind = "minilm_mlp"
    uses_embeddings = True

    def __init__(self, hidden: int = 256, epochs: int = 30, weight_decay: float = 1e-3) -> None:
        super().__init__()
        self.hidden, self.epochs, self.weight_decay = hidden, epochs, weight_decay
        self.params: dict[str, np.ndarray] = {}

    def fit(self, texts, gain, feats, seed=0, emb: np.ndarray | None = None):
        x = feats.embed(texts) if emb is None else emb
        self.params = _train_mlp(x, np.asarray(gain, dtype=np.float32), self.hidden, self.epochs,
                                 self.weight_decay, seed)
        self.platt = Platt.fit(self.raw_emb(x), np.asarray(gain) <= 0)
        return self

    def raw_emb(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        h = np.maximum(x @ p["w1"] + p["b1"], 0.0)
        return -(h @ p["w2"] + p["b2"]).ravel().astype(np.float64)

    def raw_batch(self, texts, feats):
        return self.raw_emb(feats.embed(texts))

    def state(self):
        meta, arrays = super().state()
        meta.update(hidden=self.hidden, epochs=self.epochs, weight_decay=self.weight_decay)
        arrays.update({k: v.astype(np.float32) for k, v in self.params.items()})
        return meta, arrays

    def _load(self, meta, arrays):
        super()._load(meta, arrays)
        self.hidden = int(meta["hidden"])
        self.params = {k: np.asarray(arrays[k], dtype=np.float32) for k in ("w1", "b1", "w2", "b2")}


def _train_mlp(x: np.ndarray, y: np.ndarray, hidden: int, epochs: int, wd: float, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y.reshape(-1, 1))
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=wd)
    n = len(xt)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    net.eval()
    return {
        "w1": net[0].weight.detach().numpy().T.copy(),
        "b1": net[0].bias.detach().numpy().copy(),
        "w2": net[3].weight.detach().numpy().T.copy(),
        "b2": net[3].bias.detach().numpy().copy(),
    }


class KNNScorer(Scorer):
    """Similarity-weighted mean gain of the k most similar training prompts (MiniLM cosine)."""

    kind = "knn"
    uses_embeddings = True

    def __init__(self, k: int = 32, temperature: float = 0.05) -> None:
        super().__init__()
        self.k, self.temperature = k, temperature
        self.emb = np.zeros((0, 384), dtype=np.float32)
        self.gain = np.zeros(0, dtype=np.float32)
        self.prior = 0.0

    def fit(self, texts, gain, feats, seed=0, emb: np.ndarray | None = None):
        self.emb = (feats.embed(texts) if emb is None else emb).astype(np.float32)
        self.gain = np.asarray(gain, dtype=np.float32)
        self.prior = float(self.gain.mean())
        # calibrate leave-one-out so a training row does not see itself
        self.platt = Platt.fit(self.raw_emb(self.emb, exclude_self=True), self.gain <= 0)
        return self

    def raw_emb(self, q: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        out = np.zeros(len(q))
        k = min(self.k, len(self.emb) - (1 if exclude_self else 0))
        if k <= 0:
            return out - self.prior
        for start in range(0, len(q), 512):
            sims = q[start:start + 512] @ self.emb.T
            if exclude_self:
                rows = np.arange(sims.shape[0])
                sims[rows, rows + start] = -np.inf
            idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(sims, idx, axis=1)
            w = np.exp((top - top.max(axis=1, keepdims=True)) / self.temperature)
            g = self.gain[idx]
            # shrink toward the global prior with one pseudo-neighbour
            out[start:start + len(top)] = -((w * g).sum(axis=1) + self.prior) / (w.sum(axis=1) + 1.0)
        return out

    def raw_batch(self, texts, feats):
        return self.raw_emb(feats.embed(texts))

    def state(self):
        meta, arrays = super().state()
        meta.update(k=self.k, temperature=self.temperature, prior=self.prior)
        arrays.update(emb=self.emb.astype(np.float16), gain=self.gain.astype(np.float32))
        return meta, arrays

    def _load(self, meta, arrays):
        super()._load(meta, arrays)
        self.k, self.temperature, self.prior = int(meta["k"]), float(meta["temperature"]), float(meta["prior"])
        self.emb = np.asarray(arrays["emb"], dtype=np.float32)
        self.gain = np.asarray(arrays["gain"], dtype=np.float32)


class EnsembleScorer(Scorer):
    """Weighted mean of members' standardised raw signals, then Platt."""

    kind = "ensemble"

    def __init__(self, members: list[Scorer] | None = None, weights: list[float] | None = None) -> None:
        super().__init__()
        self.members = members if members is not None else [TfidfRidgeScorer(), MiniLMMLPScorer(), KNNScorer()]
        self.weights = weights or [1.0] * len(self.members)
        self.mu = [0.0] * len(self.members)
        self.sd = [1.0] * len(self.members)

    @property
    def uses_tfidf(self):  # type: ignore[override]
        return any(m.uses_tfidf for m in self.members)

    @property
    def uses_embeddings(self):  # type: ignore[override]
        return any(m.uses_embeddings for m in self.members)

    def fit(self, texts, gain, feats, seed=0):
        emb = feats.embed(texts) if self.uses_embeddings else None
        raws = []
        for m in self.members:
            if m.uses_embeddings:
                m.fit(texts, gain, feats, seed=seed, emb=emb)
                raws.append(m.raw_emb(emb, exclude_self=True) if isinstance(m, KNNScorer) else m.raw_emb(emb))
            else:
                m.fit(texts, gain, feats, seed=seed)
                raws.append(m.raw_batch(texts, feats))
        self.mu = [float(r.mean()) for r in raws]
        self.sd = [float(r.std()) or 1.0 for r in raws]
        self.platt = Platt.fit(self._combine(raws), np.asarray(gain) <= 0)
        return self

    def calibrate(self, texts, gain, feats):
        """Standardise members and fit the probability mapping on held-out rows (not the fit rows)."""
        emb = feats.embed(texts) if self.uses_embeddings else None
        raws = [m.raw_emb(emb) if m.uses_embeddings else m.raw_batch(texts, feats) for m in self.members]
        self.mu = [float(r.mean()) for r in raws]
        self.sd = [float(r.std()) or 1.0 for r in raws]
        self.platt = Platt.fit(self._combine(raws), np.asarray(gain) <= 0)

    def _combine(self, raws: list[np.ndarray]) -> np.ndarray:
        total = sum(self.weights)
        return sum(w * (r - mu) / sd for w, r, mu, sd in zip(self.weights, raws, self.mu, self.sd, strict=True)) / total

    def raw_batch(self, texts, feats):
        emb = feats.embed(texts) if self.uses_embeddings else None
        raws = [m.raw_emb(emb) if m.uses_embeddings else m.raw_batch(texts, feats) for m in self.members]
        return self._combine(raws)

    def state(self):
        meta, arrays = super().state()
        meta.update(weights=self.weights, mu=self.mu, sd=self.sd, members=[])
        for i, m in enumerate(self.members):
            mm, ma = m.state()
            meta["members"].append(mm)
            arrays.update({f"m{i}.{k}": v for k, v in ma.items()})
        return meta, arrays

    def _load(self, meta, arrays):
        super()._load(meta, arrays)
        self.weights, self.mu, self.sd = list(meta["weights"]), list(meta["mu"]), list(meta["sd"])
        self.members = []
        for i, mm in enumerate(meta["members"]):
            prefix = f"m{i}."
            sub = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            self.members.append(scorer_from_state(mm, sub))


SCORERS: dict[str, type[Scorer]] = {
    c.kind: c
    for c in (RandomScorer, AlwaysStrongScorer, LengthScorer, TfidfLRScorer, TfidfRidgeScorer,
              SourceRidgeScorer, MiniLMMLPScorer, KNNScorer, EnsembleScorer)
}


def make_scorer(kind: str, **kwargs: Any) -> Scorer:
    if kind not in SCORERS:
        raise ValueError(f"unknown router kind {kind!r}; valid kinds: {', '.join(sorted(SCORERS))}")
    return SCORERS[kind](**kwargs)


def scorer_from_state(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Scorer:
    kind = meta.get("kind")
    if kind not in SCORERS:
        raise ValueError(f"unknown router kind {kind!r} in artifact; valid kinds: {', '.join(sorted(SCORERS))}")
    s = SCORERS[kind]()
    s._load(meta, arrays)
    return s


# --------------------------------------------------------------------------------------------------
# N models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    model: str
    predicted: dict[str, float]
    best_predicted: float


class NModelScorer:
    """Per-model ridge heads on hashed TF-IDF, each predicting that model's score in [0, 1]."""

    def __init__(self, models: list[str] | None = None, alpha: float = 3.0) -> None:
        self.models = list(models or [])
        self.alpha = alpha
        self.w = np.zeros((0, 0), dtype=np.float32)  # [n_features, n_models]
        self.b = np.zeros(0, dtype=np.float32)
        self.feats = Featurizers()

    def fit(self, texts: Sequence[str], scores: np.ndarray, tfidf) -> NModelScorer:
        from sklearn.linear_model import Ridge

        if scores.shape != (len(texts), len(self.models)):
            raise ValueError(f"scores must be [{len(texts)}, {len(self.models)}], got {scores.shape}")
        self.feats = Featurizers(tfidf=tfidf)
        x = self.feats.tfidf_rows(texts)
        model = Ridge(alpha=self.alpha).fit(x, scores)
        self.w = model.coef_.T.astype(np.float32).copy()
        self.b = np.asarray(model.intercept_, dtype=np.float32)
        return self

    def predict_batch(self, texts: Sequence[str]) -> np.ndarray:
        x = self.feats.tfidf_rows(texts)
        return np.asarray(x @ self.w) + self.b

    def predict(self, text: str) -> dict[str, float]:
        cols, vals = self.feats.tfidf_one(text)
        pred = vals @ self.w[cols] + self.b
        return {m: float(p) for m, p in zip(self.models, pred, strict=True)}

    def choose(self, text: str, prices: dict[str, float], tolerance: float = 0.02) -> ModelChoice:
        """Cheapest model whose predicted score >= best - tolerance (ties: the better predicted)."""
        pred = self.predict(text)
        return choose_model(pred, prices, tolerance)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fmeta, farrays = self.feats.tfidf.state()
        return ({"kind": "nmodel", "models": self.models, "alpha": self.alpha, "featurizer": fmeta},
                {"w": self.w, "b": self.b, "tfidf.idf": farrays["idf"]})

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> NModelScorer:
        from routers.features import HashedTfidf

        obj = cls(list(meta["models"]), float(meta.get("alpha", 3.0)))
        obj.w = np.asarray(arrays["w"], dtype=np.float32)
        obj.b = np.asarray(arrays["b"], dtype=np.float32)
        obj.feats = Featurizers(tfidf=HashedTfidf.from_state(meta["featurizer"], {"idf": arrays["tfidf.idf"]}))
        return obj


def choose_indices(pred: np.ndarray, prices: np.ndarray, tolerance: float) -> np.ndarray:
    """The serving rule on many rows: per row of ``pred`` ``[n, k]`` (predicted score of each of k models),
    the index of the cheapest model (``prices[k]``) whose predicted score is at least the row's best minus
    ``tolerance``; ties on price go to the better predicted model, then to the lower index. A tolerance of
    ``inf`` always picks a cheapest model."""
    pred = np.asarray(pred, dtype=np.float64)
    prices = np.asarray(prices, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != len(prices) or pred.shape[1] == 0:
        raise ValueError(f"choose_indices needs pred [n, k] and k prices; got {pred.shape} and {len(prices)}")
    ok = pred >= pred.max(axis=1, keepdims=True) - tolerance
    cost = np.where(ok, prices[None, :], np.inf)
    cheapest = ok & (cost == cost.min(axis=1, keepdims=True))
    return np.where(cheapest, pred, -np.inf).argmax(axis=1)


def choose_model(predicted: dict[str, float], prices: dict[str, float], tolerance: float) -> ModelChoice:
    """``choose_indices`` for one text's ``{model: predicted score}``; a model without a price costs inf."""
    if not predicted:
        raise ValueError("choose_model needs at least one model")
    models = sorted(predicted)
    pred = np.asarray([[predicted[m] for m in models]])
    i = int(choose_indices(pred, np.asarray([prices.get(m, math.inf) for m in models]), tolerance)[0])
    return ModelChoice(model=models[i], predicted=predicted, best_predicted=max(predicted.values()))
