"""Baselines trained in the same evaluation run as the guard, on the same rows, with the same OOD protocol
(max class probability, threshold at the same in-domain dev recall):

- ``tfidf_lr``: scikit-learn word 1-2-gram TF-IDF + logistic regression.
- ``fasttext``: a fastText-style linear model — mean of hashed word uni/bigram embeddings → softmax
  (Joulin et al. 2017), trained with torch.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class MaxProbBaseline:
    """Any text classifier + a max-probability OOD threshold set on in-domain dev rows."""

    name: str
    classes: list[str]
    model: object
    threshold: float = 0.0

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.predict_proba(list(texts))

    def calibrate(self, dev_texts: Sequence[str], id_recall: float) -> None:
        msp = np.sort(self.probs(dev_texts).max(axis=1))
        idx = int(np.floor((1.0 - id_recall) * len(msp) + 1e-9))
        self.threshold = float(msp[min(idx, len(msp) - 1)]) if idx > 0 else 0.0

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """(labels with 'ood' for rejections, max-prob in-domain score)."""
        p = self.probs(texts)
        msp = p.max(axis=1)
        labels = [self.classes[int(i)] if s >= self.threshold else "ood" for i, s in zip(p.argmax(1), msp, strict=True)]
        return labels, msp


class TfidfLR:
    def __init__(self, seed: int = 0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        self.lr = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)

    def fit(self, texts: Sequence[str], y: np.ndarray) -> TfidfLR:
        self.lr.fit(self.vec.fit_transform(texts), y)
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.lr.predict_proba(self.vec.transform(texts))


class FastTextLike:
    """Hashed word uni+bigrams → mean embedding (dim 64) → linear softmax."""

    def __init__(self, buckets: int = 2**20, dim: int = 64, epochs: int = 5, lr: float = 0.5, seed: int = 0):
        self.buckets, self.dim, self.epochs, self.lr, self.seed = buckets, dim, epochs, lr, seed

    def _ids(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())
        ids = [zlib.crc32(w.encode()) % self.buckets for w in words]
        ids += [zlib.crc32(f"{a} {b}".encode()) % self.buckets for a, b in zip(words, words[1:], strict=False)]
        return ids or [0]

    def _bags(self, texts: Sequence[str]):
        import torch

        ids = [self._ids(t) for t in texts]
        offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])[:-1]])
        return torch.tensor([x for i in ids for x in i], dtype=torch.long), torch.from_numpy(offsets.astype(np.int64))

    def fit(self, texts: Sequence[str], y: np.ndarray) -> FastTextLike:
        import torch

        torch.manual_seed(self.seed)
        n_classes = int(y.max()) + 1
        self.emb = torch.nn.EmbeddingBag(self.buckets, self.dim, mode="mean", sparse=True)
        torch.nn.init.uniform_(self.emb.weight, -1.0 / self.dim, 1.0 / self.dim)
        self.out = torch.nn.Linear(self.dim, n_classes)
        opt = torch.optim.SGD([*self.emb.parameters(), *self.out.parameters()], lr=self.lr)
        yt = torch.from_numpy(y.astype(np.int64))
        rng = np.random.RandomState(self.seed)
        for _ in range(self.epochs):
            perm = rng.permutation(len(texts))
            for start in range(0, len(texts), 16):
                idx = perm[start:start + 16]
                i, o = self._bags([texts[j] for j in idx])
                loss = torch.nn.functional.cross_entropy(self.out(self.emb(i, o)), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = []
            for start in range(0, len(texts), 512):
                i, o = self._bags(texts[start:start + 512])
                out.append(torch.softmax(self.out(self.emb(i, o)), dim=-1).numpy())
        return np.concatenate(out)


def fit_baselines(train_texts: Sequence[str], train_labels: Sequence[str], dev_texts: Sequence[str],
                  id_recall: float, seed: int = 0) -> list[MaxProbBaseline]:
    classes = sorted(set(train_labels))
    y = np.array([classes.index(lab) for lab in train_labels])
    out = []
    for name, model in (("tfidf_lr", TfidfLR(seed)), ("fasttext", FastTextLike(seed=seed))):
        b = MaxProbBaseline(name, classes, model.fit(list(train_texts), y))
        b.calibrate(dev_texts, id_recall)
        out.append(b)
    return out
