"""Choosing guard variants without test data: leave-one-domain-out pseudo-OOD + synthetic foreign text.

The GQR protocol trains on in-domain rows only and meets out-of-domain text for the first time at test.
Choosing a featurizer, OOD rule or hyperparameter by test numbers leaks the test set into the model, so this
module scores candidates on in-domain data alone (``train.jsonl`` + ``dev.jsonl``; never ``test_*`` and
never ``ood_train``):

- one fold per domain ``d`` (``without-d``): train on the training rows of the other domains; every source of
  ``d`` (its train + dev rows) is a pseudo-OOD source. With MMLU rows in every domain this imitates the hard
  case of off-topic MMLU questions; with forum/search sources it imitates off-topic user questions.
- a ``full`` fold: all domains trained, measuring 3-way accuracy under the rule.
- in every fold, synthetic foreign sources built in code from dev texts (``foreign_texts``): a consistent
  letter substitution (a fake language with stable words) and characters shuffled inside each word.
- the dev rows of the trained domains are split in two halves by a fixed hash: the rule is calibrated on one
  half at the requested in-domain recall and in-domain accuracy is measured on the other (and the reverse).

The score of a fold is the GQR formula on these pseudo sets (harmonic mean of in-domain accuracy and the
mean over pseudo-OOD sources of rejection); a candidate's score is the mean over folds.

Run: ``python -m training.guard_select --train F --dev F [--variant NAME ...] [--rule NAME ...]`` prints a
table of candidates (variants = training settings, rules = evidence combinations) and, with ``--json``, one
JSON object on the last line. Fitted folds are cached under ``--cache`` (one pickle per variant and fold).
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from routers.embeddings import MiniLMEmbedder
from routers.guard import EarlyAccept, Guard, OODRule, SemanticAccept
from routers.guard.knn import centroid_similarity, domain_centroids, normalize_rows
from routers.guard.widemlp import WideMLP
from training.guard_data import GuardRow, load_guard_rows
from training.guard_fit import FitConfig, fit_uncalibrated, set_search_options

# --------------------------------------------------------------------------------------------------
# pseudo-OOD data
# --------------------------------------------------------------------------------------------------


def foreign_texts(texts: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """Two synthetic foreign sources made from ``texts``: ``synthetic_cipher`` (every letter replaced by
    a fixed other letter: stable fake words, same punctuation and lengths) and ``synthetic_shuffle``
    (the letters inside each word shuffled)."""
    rng = np.random.RandomState(seed)
    lower = "abcdefghijklmnopqrstuvwxyz"
    perm = "".join(rng.permutation(list(lower)))
    table = str.maketrans(lower + lower.upper(), perm + perm.upper())
    cipher = [t.translate(table) for t in texts]
    shuffled = []
    for t in texts:
        words = []
        for w in t.split(" "):
            chars = list(w)
            rng.shuffle(chars)
            words.append("".join(chars))
        shuffled.append(" ".join(words))
    return {"synthetic_cipher": cipher, "synthetic_shuffle": shuffled}


OOD_VAL = "ood-val"  # the fold of --ood-val: scored apart from the protocol's mean
EXPERIMENT_CENTROIDS = (1, 4, 16)  # per domain: "centroid1", "centroid4", "centroid16" evidence


@dataclass(frozen=True)
class Fold:
    """One selection fold: what is trained, which in-domain rows calibrate/evaluate, what must be rejected."""

    name: str
    train: list[GuardRow]
    dev: list[GuardRow]  # in-domain rows of the trained domains (two halves: calibrate / evaluate)
    ood: dict[str, list[str]]  # pseudo-OOD source → texts
    # leave-one-source-out folds: the held-out in-domain source's rows, which must be accepted (and given
    # their domain) although no row of their style was trained on or calibrated with
    shifted: list[GuardRow] = field(default_factory=list)


LOSO = "loso-"  # name prefix of the leave-one-source-out folds


def make_loso_folds(train: Sequence[GuardRow], dev: Sequence[GuardRow], ood_val: Sequence[GuardRow] = (),
                    num_foreign: int = 300, seed: int = 0) -> list[Fold]:
    """The leave-one-source-out shift protocol: one fold per in-domain source ``s`` (of a domain with another
    source left), named ``loso-<s>``. It trains on the training rows of every other source and calibrates
    on their dev rows; the held-out source's train + dev rows are shifted in-domain traffic (a style the
    guard never saw: a forum held out leaves exam questions and search queries), and the OOD rows to reject
    are ``ood_val``'s sources (real OOD text the test never uses), else the synthetic foreign sources."""
    sources = sorted({(r.label, r.source) for r in train})
    if ood_val:
        ood = {src: [r.text for r in ood_val if r.source == src] for src in sorted({r.source for r in ood_val})}
    else:
        pick = np.random.RandomState(seed).choice(len(dev), min(num_foreign, len(dev)), replace=False)
        ood = foreign_texts([dev[i].text for i in sorted(pick)], seed)
    folds = []
    for label, src in sources:
        if sum(lab == label for lab, _ in sources) < 2:
            continue  # holding out a domain's only source is leave-one-domain-out, not a shift
        held = [r for r in [*train, *dev] if r.source == src and r.label == label]
        folds.append(Fold(f"{LOSO}{src}", [r for r in train if (r.label, r.source) != (label, src)],
                          [r for r in dev if (r.label, r.source) != (label, src)], ood, shifted=held))
    if not folds:
        raise ValueError("leave-one-source-out needs a domain with at least two sources (the 'source' column)")
    return folds


def make_folds(train: Sequence[GuardRow], dev: Sequence[GuardRow], num_foreign: int = 300,
               full: bool = True, seed: int = 0, ood_val: Sequence[GuardRow] = ()) -> list[Fold]:
    """The leave-one-domain-out folds (+ ``full``), each with the synthetic foreign sources; with
    ``ood_val`` rows (real OOD text from sources the test never uses) also the ``ood-val`` fold: trained on
    every domain, rejecting those rows per source — the GQR protocol itself, on validation data."""
    domains = sorted({r.label for r in train})
    if len(domains) < 3:
        raise ValueError(f"leave-one-domain-out needs at least 3 domains, found {domains}")
    rng = np.random.RandomState(seed)
    pick = rng.choice(len(dev), min(num_foreign, len(dev)), replace=False)
    foreign = foreign_texts([dev[i].text for i in sorted(pick)], seed)
    folds = []
    for d in domains:
        held = [r for r in [*train, *dev] if r.label == d]
        ood = {f"{d}/{src}": [r.text for r in held if r.source == src] for src in sorted({r.source for r in held})}
        folds.append(Fold(f"without-{d}", [r for r in train if r.label != d], [r for r in dev if r.label != d],
                          {**ood, **foreign}))
    if full:
        folds.append(Fold("full", list(train), list(dev), dict(foreign)))
    if ood_val:
        by_source = {src: [r.text for r in ood_val if r.source == src] for src in sorted({r.source for r in ood_val})}
        folds.append(Fold(OOD_VAL, list(train), list(dev), by_source))
    return folds


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class FoldScores:
    """Everything a rule needs about one fitted fold: per-row class probabilities and evidence components."""

    classes: list[str]
    dev_labels: np.ndarray  # int class index per dev row
    dev_half: np.ndarray  # bool: row is in half A
    dev_probs: np.ndarray
    dev_comps: dict[str, np.ndarray]
    ood_probs: dict[str, np.ndarray]
    ood_comps: dict[str, dict[str, np.ndarray]]
    ood_half: dict[str, np.ndarray] = field(default_factory=dict)  # per source, bool: row is in half A
    shifted_labels: np.ndarray | None = None  # leave-one-source-out: the held-out rows' class indices
    shifted_probs: np.ndarray | None = None
    shifted_comps: dict[str, np.ndarray] = field(default_factory=dict)


def experiment_evidence(member: WideMLP, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The evidence kinds that exist for experiments (serving never computes them), higher = more in-domain:
    ``energy`` (logsumexp of the logits) and, when fitted (``FitConfig.mahalanobis``), ``maha`` (minus the
    smallest class-conditional Mahalanobis distance in hidden space, shared covariance)."""
    h = member.hidden(texts)
    logits = member.logits_of(h)
    m = logits.max(axis=1, keepdims=True)
    comps = {"energy": (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))).astype(np.float32)}
    if member.class_means is not None and member.precision is not None:
        d = h[:, None, :] - member.class_means[None, :, :]  # [n, C, H]
        dist = ((d @ member.precision) * d).sum(axis=2)  # d P d^T per class (einsum's path search cost more)
        comps["maha"] = (-dist.min(axis=1)).astype(np.float32)
    return comps


def experiment_centroids(guard: Guard, train: Sequence[GuardRow]) -> dict[str, dict[int, np.ndarray]]:
    """Per member, domain centroids of the training rows for each ``EXPERIMENT_CENTROIDS`` count."""
    texts = [r.text[: guard.max_chars] for r in train if r.label in guard.domains]
    y = np.array([guard.classes.index(r.label) for r in train if r.label in guard.domains])
    out = {}
    for name, m in guard.members.items():
        rows = normalize_rows(m.hidden(texts) if isinstance(m, WideMLP) else m.embedder.encode(texts))
        out[name] = {k: domain_centroids(rows, y, k) for k in EXPERIMENT_CENTROIDS}
    return out


def score_fold(guard: Guard, fold: Fold) -> FoldScores:
    cents = experiment_centroids(guard, fold.train)

    def run(texts):
        texts = [t[: guard.max_chars] for t in texts]
        outs = {}
        for n, m in guard.members.items():  # every evidence kind, the experiments' too
            probs, comps = m.evidence(texts)
            comps = {**comps, **experiment_evidence(m, texts)} if isinstance(m, WideMLP) else dict(comps)
            rows = normalize_rows(m.hidden(texts) if isinstance(m, WideMLP) else m.embedder.encode(texts))
            for k, c in cents[n].items():
                comps[f"centroid{k}"] = centroid_similarity(rows, c)
            outs[n] = (probs, comps)
        return guard.combine(outs)

    def halves(texts):
        return np.array([zlib.crc32(t.encode()) % 2 == 0 for t in texts], dtype=bool)

    dp, dc = run([r.text for r in fold.dev])
    ood_p, ood_c = {}, {}
    for src, texts in fold.ood.items():
        ood_p[src], ood_c[src] = run(texts)
    fs = FoldScores(guard.classes, np.array([guard.classes.index(r.label) for r in fold.dev]),
                    halves([r.text for r in fold.dev]), dp, dc, ood_p, ood_c,
                    ood_half={src: halves(texts) for src, texts in fold.ood.items()})
    if fold.shifted:
        fs.shifted_labels = np.array([guard.classes.index(r.label) for r in fold.shifted])
        fs.shifted_probs, fs.shifted_comps = run([r.text for r in fold.shifted])
    return fs


@dataclass(frozen=True)
class RuleSpec:
    """An OOD rule candidate: which evidence components (by suffix, e.g. ``knn``) Fisher combines."""

    name: str
    components: tuple[str, ...]
    id_recall: float = 0.9
    per_class: bool = False  # calibrate a threshold per predicted domain
    early_accept: float = 0.0  # > 0: rows whose widemlp-only percentile reaches it are accepted (EarlyAccept)
    ood_reject: float = 0.0  # > 0: threshold anchored where this share of OOD calibration rows is rejected
    semantic_accept: float = 0.0  # > 0: rows whose percentile over semantic_components reaches it are kept
    semantic_components: tuple[str, ...] = ("embedding.centroid", "widemlp.tfknn")


RULES = {
    "knn+tfknn": RuleSpec("knn+tfknn", ("knn", "tfknn")),
    "msp+knn+tfknn": RuleSpec("msp+knn+tfknn", ("msp", "knn", "tfknn")),
    "maha+tfknn": RuleSpec("maha+tfknn", ("maha", "tfknn")),
    "maha+knn+tfknn": RuleSpec("maha+knn+tfknn", ("maha", "knn", "tfknn")),
    "energy+knn+tfknn": RuleSpec("energy+knn+tfknn", ("energy", "knn", "tfknn")),
    "tfknn": RuleSpec("tfknn", ("tfknn",)),
    "knn": RuleSpec("knn", ("knn",)),
    "maha": RuleSpec("maha", ("maha",)),
    "msp": RuleSpec("msp", ("msp",)),
    "energy": RuleSpec("energy", ("energy",)),
    # ensemble only: the embedding's kNN and widemlp's TF-IDF kNN, without widemlp's hidden-space kNN
    "eknn+tfknn": RuleSpec("eknn+tfknn", ("embedding.knn", "widemlp.tfknn")),
    "msp+eknn+tfknn": RuleSpec("msp+eknn+tfknn", ("msp", "embedding.knn", "widemlp.tfknn")),
    "knn+tfknn+vocab": RuleSpec("knn+tfknn+vocab", ("knn", "tfknn", "vocab")),
    # centroid evidence (experiments name the centroid count per domain; serving calls it "centroid")
    **{f"knn+tfknn+ecent{k}": RuleSpec(f"knn+tfknn+ecent{k}", ("knn", "tfknn", f"embedding.centroid{k}"))
       for k in EXPERIMENT_CENTROIDS},
    **{f"eknn+tfknn+ecent{k}": RuleSpec(f"eknn+tfknn+ecent{k}", ("embedding.knn", "widemlp.tfknn",
                                                                  f"embedding.centroid{k}"))
       for k in EXPERIMENT_CENTROIDS},
    **{f"ecent{k}+tfknn": RuleSpec(f"ecent{k}+tfknn", (f"embedding.centroid{k}", "widemlp.tfknn"))
       for k in EXPERIMENT_CENTROIDS},
    **{f"cent{k}+tfknn": RuleSpec(f"cent{k}+tfknn", (f"centroid{k}", "widemlp.tfknn")) for k in EXPERIMENT_CENTROIDS},
    "knn+tfknn+cent4": RuleSpec("knn+tfknn+cent4", ("knn", "tfknn", "centroid4")),
}


def _pick(comps: dict[str, np.ndarray], wanted: Sequence[str], rows=slice(None)) -> dict[str, np.ndarray]:
    """Components named in full (``widemlp.tfknn``) or by their suffix (``knn``: every member's)."""
    out = {k: v[rows] for k, v in comps.items() if k in wanted or k.split(".", 1)[1] in wanted}
    found = {k for k in out} | {k.split(".", 1)[1] for k in out}
    if not set(wanted) <= found:
        missing = sorted(set(wanted) - found)
        raise ValueError(f"evidence {missing} not computed by this variant (has {sorted(comps)})")
    return out


def _kept(rule: OODRule, early: EarlyAccept | None, spec: RuleSpec, comps: dict[str, np.ndarray], pred: np.ndarray,
          rows=slice(None), semantic: SemanticAccept | None = None) -> np.ndarray:
    """Rows the rule keeps; with ``early``, also those accepted on widemlp's evidence alone (their class is
    approximated by the ensemble's prediction here, not widemlp's alone); with ``semantic``, also those its
    own percentile accepts."""
    ok = rule.percentile(_pick(comps, spec.components, rows), pred) >= rule.threshold
    if semantic is not None:
        ok |= semantic.accepts({k: v[rows] for k, v in comps.items() if k in semantic.rule.dev_scores})
    return ok if early is None else ok | early.accepts({k: v[rows] for k, v in comps.items()})


def evaluate_rule(fs: FoldScores, spec: RuleSpec) -> dict[str, Any]:
    """Pseudo-GQR of one rule on one fold, averaged over the two calibrate/evaluate halves. The rule is the
    serving one (``OODRule``), calibrated on one dev half exactly as ``fit_guard`` calibrates on dev; with
    ``spec.ood_reject`` also on one half of every OOD source (``OODRule.calibrate``'s OOD anchor), and
    rejection is then counted on the other half only. A leave-one-source-out fold scores the held-out
    source's rows (``shift_acc``: accepted with their domain) in place of the in-style dev half."""
    n_dom = sum(c not in ("ood", "unsafe") for c in fs.classes)
    id_accs, shift_accs, shift_kept, rej = [], [], [], {src: [] for src in fs.ood_comps}
    for half in (fs.dev_half, ~fs.dev_half):
        cal, ev = np.flatnonzero(half), np.flatnonzero(~half)
        dev_pred = fs.dev_probs[:, :n_dom].argmax(axis=1)
        first = half is fs.dev_half  # OOD rows: calibrate on the hash half A in the first pass, B in the second
        ood_cal = None
        if spec.ood_reject > 0:
            keys = list(_pick(fs.dev_comps, spec.components))
            ood_cal = {k: np.concatenate([c[k][fs.ood_half[src] == first] for src, c in fs.ood_comps.items()])
                       for k in keys}
        rule = OODRule.calibrate(_pick(fs.dev_comps, spec.components, cal), spec.id_recall,
                                 dev_pred[cal] if spec.per_class else None, n_dom,
                                 ood_components=ood_cal, ood_reject=spec.ood_reject)
        early = None
        if spec.early_accept > 0:  # the serving rule's widemlp components, calibrated on the same half
            wide = [k for k in _pick(fs.dev_comps, spec.components) if k.startswith("widemlp.")]
            early = EarlyAccept(OODRule.calibrate(_pick(fs.dev_comps, wide, cal), spec.id_recall), spec.early_accept)
        semantic = None
        if spec.semantic_accept > 0:
            semantic = SemanticAccept(OODRule.calibrate({c: fs.dev_comps[c][cal] for c in spec.semantic_components},
                                                        spec.id_recall), spec.semantic_accept)

        ok = _kept(rule, early, spec, fs.dev_comps, dev_pred[ev], ev, semantic)
        id_accs.append(float(np.mean(ok & (dev_pred[ev] == fs.dev_labels[ev]))))
        if fs.shifted_labels is not None:
            s_pred = fs.shifted_probs[:, :n_dom].argmax(axis=1)
            s_ok = _kept(rule, early, spec, fs.shifted_comps, s_pred, semantic=semantic)
            shift_accs.append(float(np.mean(s_ok & (s_pred == fs.shifted_labels))))
            shift_kept.append(float(np.mean(s_ok)))
        for src, comps in fs.ood_comps.items():
            rows = np.flatnonzero(fs.ood_half[src] != first) if ood_cal is not None \
                else np.arange(len(fs.ood_probs[src]))
            pred = fs.ood_probs[src][rows, :n_dom].argmax(axis=1)
            rej[src].append(float(np.mean(~_kept(rule, early, spec, comps, pred, rows, semantic))))
    id_acc = float(np.mean(id_accs))
    per_source = {src: float(np.mean(v)) for src, v in rej.items()}
    ood_acc = float(np.mean(list(per_source.values())))
    acc = float(np.mean(shift_accs)) if shift_accs else id_acc  # the ID side of this fold's GQR
    gqr = 2 * acc * ood_acc / (acc + ood_acc) if acc + ood_acc else 0.0
    out = {"gqr": gqr * 100, "id_acc": id_acc * 100, "ood_acc": ood_acc * 100,
           "per_source": {k: v * 100 for k, v in per_source.items()}}
    if shift_accs:
        out.update(shift_acc=acc * 100, shift_kept=float(np.mean(shift_kept)) * 100)
    return out


# --------------------------------------------------------------------------------------------------
# variants (training settings)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, base: FitConfig) -> FitConfig:
        return replace(base, **self.overrides)


VARIANTS = {
    "base": Variant("base", {"mahalanobis": True}),
    "hidden512": Variant("hidden512", {"hidden": 512}),
    "epochs10": Variant("epochs10", {"epochs": 10}),
    "k10": Variant("k10", {"knn_k": 10}),
    "chars2000": Variant("chars2000", {"max_chars": 2000}),
    "seeds3": Variant("seeds3", {"num_seeds": 3}),
    "maxdf10": Variant("maxdf10", {"tfidf_reference_max_df": 0.10}),
    "ref8000": Variant("ref8000", {"max_reference": 8000}),
    "ref8000_k50": Variant("ref8000_k50", {"max_reference": 8000, "knn_k": 50}),
    "ref8000_h512": Variant("ref8000_h512", {"max_reference": 8000, "hidden": 512}),
    "ref4000": Variant("ref4000", {"max_reference": 4000}),
    "distill1": Variant("distill1", {"distill_weight": 1.0}),  # MiniLM at training time
    "embedding": Variant("embedding", {"kind": "embedding"}),  # MiniLM per text: slow without --embedding-cache
    "ensemble": Variant("ensemble", {"kind": "ensemble"}),
    # widemlp alone with the cheaper kNN searches
    "wide_fast2": Variant("wide_fast2", {"hidden_knn_dims": 64, "tfknn_terms": 256}),
    "wide_terms256": Variant("wide_terms256", {"tfknn_terms": 256}),
    "wide_h64": Variant("wide_h64", {"hidden_knn_dims": 64}),
    # ensembles, every setting spelled out (the encoder defaults changed over time; BENCHMARKS "Guard"):
    # lN = MiniLM layers, mN = word pieces, 2s = two-stage kNN searches in 64 dims (hidden + embedding),
    # t256 = TF-IDF kNN over the 256 top n-grams, d32 = 32 dims and 128 candidates
    **{name: Variant(name, {"kind": "ensemble", "encoder_layers": layers, "encoder_max_length": pieces,
                            **({"hidden_knn_dims": dims, "embedding_knn_dims": dims} if dims else {}),
                            **({"knn_candidates": 128} if dims == 32 else {}),
                            **({"tfknn_terms": 256} if terms else {})})
       for name, layers, pieces, dims, terms in [
           ("ens_base", 3, 64, 0, False), ("ens_fast2", 3, 64, 64, True), ("ens_fast2_m48", 3, 48, 64, True),
           ("ens_fast2_m32", 3, 32, 64, True), ("ens_fast2_m24", 3, 24, 64, True),
           ("ens_fast2_m32_d32", 3, 32, 32, True), ("ens_fast2_l2", 2, 64, 64, True),
           ("ens_fast2_l2_m32", 2, 32, 64, True), ("ens_fast2_l2_m24", 2, 24, 64, True),
           ("ens_fast2_l1", 1, 64, 64, True), ("ens_fast2_l1_m32", 1, 32, 64, True),
           ("ens_l3_m32", 3, 32, 0, False), ("ens_l3_m32_2s", 3, 32, 64, False), ("ens_l3_m32_t256", 3, 32, 0, True),
           ("ens_l2_m32", 2, 32, 0, False), ("ens_l2_m32_2s", 2, 32, 64, False), ("ens_l2_m32_t256", 2, 32, 0, True),
           ("ens_l3_m64_2s", 3, 64, 64, False), ("ens_l3_m24_2s", 3, 24, 64, False)]},
    # cheaper long texts for the 3-layer / 32-piece ensemble: fewer TF-IDF kNN terms, a shorter guard
    # window, a smaller coarse kNN stage
    "ens_l3_m32_2s_t1024": Variant("ens_l3_m32_2s_t1024", {"kind": "ensemble", "encoder_layers": 3,
                                                           "encoder_max_length": 32, "hidden_knn_dims": 64,
                                                           "embedding_knn_dims": 64, "tfknn_terms": 1024}),
    "ens_l3_m32_2s_c500": Variant("ens_l3_m32_2s_c500", {"kind": "ensemble", "encoder_layers": 3,
                                                         "encoder_max_length": 32, "hidden_knn_dims": 64,
                                                         "embedding_knn_dims": 64, "max_chars": 500}),
    "ens_l3_m32_d32": Variant("ens_l3_m32_d32", {"kind": "ensemble", "encoder_layers": 3, "encoder_max_length": 32,
                                                 "hidden_knn_dims": 32, "embedding_knn_dims": 32,
                                                 "knn_candidates": 128}),
}


class CachedEmbedder(MiniLMEmbedder):
    """MiniLM whose ``encode`` remembers every text it has embedded, in memory and (``path``) in one
    ``.npz`` file, so that selection runs over many variants embed each text once."""

    def __init__(self, path: Path | None = None, cfg: FitConfig | None = None) -> None:
        cfg = cfg or FitConfig()  # the encoder `train guard` would use (FitConfig.encoder_*)
        super().__init__(num_threads=1, max_length=cfg.encoder_max_length, num_layers=cfg.encoder_layers,
                         int8=cfg.encoder_int8)
        self.path = path
        self.cache: dict[str, np.ndarray] = {}
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as z:
                if "spec" in z and json.loads(str(z["spec"])) == self.spec():  # vectors of another encoder: redo
                    self.cache = dict(zip(z["texts"].tolist(), z["vectors"], strict=True))

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            order = sorted(missing, key=len)  # similar lengths per batch: less padding
            if self.backend is None:
                self.prepare()  # training: export the graph when this SWITCHYARD_HOME has none
            self.cache.update(zip(order, super().encode(order, batch_size=32), strict=True))
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(self.path, texts=np.array(list(self.cache)), vectors=np.stack(list(self.cache.values())),
                         spec=np.array(json.dumps(self.spec())))
        if not texts:
            return np.zeros((0, 384), np.float32)
        return np.stack([self.cache[t] for t in texts])


SEARCH_OPTIONS = ("tfknn_terms", "hidden_knn_dims", "embedding_knn_dims", "knn_candidates")
ENCODER_OPTIONS = ("encoder_layers", "encoder_int8", "encoder_max_length")


def fit_fold(fold: Fold, cfg: FitConfig, cache: Path | None, key: str,
             embedder: MiniLMEmbedder | None = None, fitted: dict | None = None) -> FoldScores:
    """The fold's scores for ``cfg`` (from ``cache``/``key`` when there). ``fitted`` (a dict the caller
    keeps) remembers fitted guards across variants that differ only in kNN search options, which are
    applied after fitting (``set_search_options``) — those variants then cost one scoring pass each."""
    path = cache / key / f"{fold.name}.pkl" if cache else None
    if path is not None and path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    fit_on = "full" if fold.name == OOD_VAL else fold.name  # the two folds train on the same rows
    memo_key = (fit_on, replace(cfg, **{o: getattr(FitConfig(), o) for o in SEARCH_OPTIONS}))
    # an ensemble's widemlp does not depend on the encoder: variants differing only in it share one fit
    wide_key = (fit_on, replace(memo_key[1], kind="widemlp",
                                   **{o: getattr(FitConfig(), o) for o in ENCODER_OPTIONS}))
    guard = fitted.get(memo_key) if fitted is not None else None
    if guard is None and cfg.kind == "ensemble" and fitted is not None and wide_key in fitted:
        emb = fit_uncalibrated(fold.train, replace(cfg, kind="embedding"), embedder=embedder)
        guard = Guard(kind="ensemble", classes=emb.classes, rule=emb.rule, max_chars=emb.max_chars,
                      members={"widemlp": copy.copy(fitted[wide_key]), "embedding": emb.members["embedding"]})
        fitted[memo_key] = guard
    if guard is None:
        guard = fit_uncalibrated(fold.train, cfg, embedder=embedder)
        if fitted is not None:
            fitted[memo_key] = guard
            if cfg.kind == "ensemble":
                fitted[wide_key] = guard.members["widemlp"]
    for m in guard.members.values():
        set_search_options(m, cfg)
    fs = score_fold(guard, fold)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(fs, f)
    return fs


def _embedder_for(cfg: FitConfig, embedder: MiniLMEmbedder | None) -> MiniLMEmbedder | None:
    """``embedder`` when it is the encoder ``cfg`` asks for, else a ``CachedEmbedder`` of that encoder
    (its cache file beside ``embedder``'s, named by the encoder)."""
    wanted = MiniLMEmbedder(max_length=cfg.encoder_max_length, num_layers=cfg.encoder_layers, int8=cfg.encoder_int8)
    if embedder is None or embedder.spec() == wanted.spec():
        return embedder
    path = getattr(embedder, "path", None)
    if path is not None:
        path = path.with_name(f"{path.stem}.{cfg.encoder_layers}l{int(cfg.encoder_int8)}q{cfg.encoder_max_length}.npz")
    return CachedEmbedder(path, cfg)


def select(train: Sequence[GuardRow], dev: Sequence[GuardRow], variants: Sequence[Variant],
           rules: Sequence[RuleSpec], base: FitConfig | None = None, cache: Path | None = None,
           full: bool = True, log=None, embedder: MiniLMEmbedder | None = None,
           ood_val: Sequence[GuardRow] = (), only_ood_val: bool = False, loso: bool = False) -> list[dict[str, Any]]:
    """Score every (variant, rule) pair; rows sorted best first by mean pseudo-GQR over the protocol's folds,
    or, with ``ood_val`` rows, by the GQR-score of the ``ood-val`` fold (then the mean). ``loso``: the
    protocol's folds are the leave-one-source-out ones (``make_loso_folds``), scored on shifted in-domain
    rows against ``ood_val``'s sources."""
    base = base or FitConfig()
    folds = make_folds(train, dev, full=full, ood_val=ood_val)
    if loso:
        folds = make_loso_folds(train, dev, ood_val) + [f for f in folds if f.name == OOD_VAL]
    if only_ood_val:
        folds = [f for f in folds if f.name == OOD_VAL]
    fitted: dict = {}  # guards fitted for one variant, reused by variants differing in search options only
    results = []
    for v in variants:
        scores = {}
        v_embedder = _embedder_for(v.config(base), embedder)
        for fold in folds:
            if log:
                log(f"fitting {v.name} / {fold.name}")
            scores[fold.name] = fit_fold(fold, v.config(base), cache, v.name, v_embedder, fitted)
        for spec in rules:
            try:
                per_fold = {name: evaluate_rule(fs, spec) for name, fs in scores.items()}
            except ValueError as e:
                if log:
                    log(f"skip {v.name}/{spec.name}: {e}")
                continue
            protocol = [r for name, r in per_fold.items() if name != OOD_VAL] or list(per_fold.values())
            results.append({
                "variant": v.name, "rule": spec.name + (f"@{spec.early_accept:g}" if spec.early_accept else "")
                + (f"/ood{spec.ood_reject:g}" if spec.ood_reject else "")
                + (f"/sem{spec.semantic_accept:g}:{'+'.join(spec.semantic_components)}" if spec.semantic_accept else ""),
                "id_recall": spec.id_recall, "per_class": spec.per_class, "early_accept": spec.early_accept,
                "score": float(np.mean([r["gqr"] for r in protocol])),
                "id_acc": float(np.mean([r["id_acc"] for r in protocol])),
                "ood_acc": float(np.mean([r["ood_acc"] for r in protocol])),
                "ood_val": per_fold[OOD_VAL]["gqr"] if OOD_VAL in per_fold else None,
                "shift_acc": float(np.mean([r["shift_acc"] for r in protocol])) if loso else None,
                "shift_kept": float(np.mean([r["shift_kept"] for r in protocol])) if loso else None,
                "ood_reject": spec.ood_reject,
                "folds": per_fold,
            })
    return sorted(results, key=lambda r: (-(r["ood_val"] or 0.0), -r["score"]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.guard_select", description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--variant", action="append", help=f"training variants ({', '.join(VARIANTS)}); default base")
    ap.add_argument("--rule", action="append", help=f"rules ({', '.join(RULES)}); default all")
    ap.add_argument("--id-recall", type=float, action="append", help="dev recall(s) to score; default 0.9")
    ap.add_argument("--per-class", action="store_true", help="also score per-domain thresholds")
    ap.add_argument("--early-accept", type=float, action="append",
                    help="also score an ensemble early accept at this widemlp percentile (repeatable)")
    ap.add_argument("--no-full", action="store_true", help="skip the all-domains fold")
    ap.add_argument("--cache", help="folder for fitted folds (reused across runs)")
    ap.add_argument("--embedding-cache", help=".npz file remembering MiniLM embeddings across runs "
                                              "(variants embedding, ensemble, distill1)")
    ap.add_argument("--ood-val", help="OOD rows of sources the test never uses (e.g. ood_train.jsonl): the "
                                      "ood-val fold, used for selection only, never for fitting")
    ap.add_argument("--only-ood-val", action="store_true", help="score the ood-val fold alone")
    ap.add_argument("--loso", action="store_true",
                    help="leave-one-source-out shift protocol: one fold per in-domain source held out as shifted "
                         "in-domain traffic (score = mean over them; OOD = --ood-val's sources)")
    ap.add_argument("--semantic-accept", type=float, action="append",
                    help="also score a semantic accept at this percentile (repeatable)")
    ap.add_argument("--semantic-components", default="embedding.centroid,widemlp.tfknn",
                    help="comma-separated evidence of the semantic accept (default embedding.centroid,widemlp.tfknn; "
                         "experiments name centroid counts: embedding.centroid1)")
    ap.add_argument("--ood-reject", type=float, action="append",
                    help="also score thresholds anchored where this share of OOD rows is rejected (one hash half "
                         "of each --ood-val source calibrates, the other is scored; repeatable)")
    ap.add_argument("--epochs", type=int, default=None, help="widemlp epochs (default: FitConfig's)")
    ap.add_argument("--hidden", type=int, default=256, help="widemlp hidden width of the base config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        variants = [VARIANTS[n] for n in (args.variant or ["base"])]
        base_rules = [RULES[n] for n in (args.rule or list(RULES))]
    except KeyError as e:
        raise SystemExit(f"unknown name {e}; variants: {', '.join(VARIANTS)}; rules: {', '.join(RULES)}") from None
    rules = [replace(r, id_recall=rec, per_class=pc, early_accept=ea) for r in base_rules
             for rec in (args.id_recall or [0.9]) for pc in ((False, True) if args.per_class else (False,))
             for ea in [0.0, *(args.early_accept or [])]]
    rules = [replace(r, ood_reject=orj) for r in rules for orj in [0.0, *(args.ood_reject or [])]]
    sem = tuple(args.semantic_components.split(","))
    rules = [replace(r, semantic_accept=sa, semantic_components=sem) for r in rules
             for sa in [0.0, *(args.semantic_accept or [])]]
    train = load_guard_rows(args.train)
    dev = load_guard_rows(args.dev, allowed_labels={r.label for r in train})
    base = FitConfig(epochs=args.epochs, hidden=args.hidden, seed=args.seed)
    ood_val = load_guard_rows(args.ood_val, default_label="ood") if args.ood_val else []
    results = select(train, dev, variants, rules, base=base, cache=Path(args.cache) if args.cache else None,
                     full=not args.no_full, log=lambda m: print(m, file=sys.stderr),
                     embedder=CachedEmbedder(Path(args.embedding_cache) if args.embedding_cache else None, base),
                     ood_val=ood_val, only_ood_val=args.only_ood_val, loso=args.loso)
    folds = list(results[0]["folds"]) if results else []
    header = ["variant", "rule", "recall", "per-class", "score", "ID acc", "OOD acc", "shift acc", *folds]
    table = [header] + [[r["variant"], r["rule"], f"{r['id_recall']:.2f}", "yes" if r["per_class"] else "no",
                         f"{r['score']:.2f}", f"{r['id_acc']:.2f}", f"{r['ood_acc']:.2f}",
                         "-" if r["shift_acc"] is None else f"{r['shift_acc']:.2f}",
                         *(f"{r['folds'][f]['gqr']:.2f}" for f in folds)] for r in results]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if args.json:
        print(json.dumps({"results": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    from training.guard_select import main as _main  # cached fold pickles name training.guard_select types

    raise SystemExit(_main())
