"""Fitting guard members with torch on CPU; the result is a ``routers.guard.Guard`` (numpy at serve time).

Determinism: every fit takes a ``seed`` (torch, numpy) and runs single-process; the same data and seed
give the same artifact on the same machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from routers.embeddings import MiniLMEmbedder
from routers.features import HashedTfidf
from routers.guard import OOD, UNSAFE, EarlyAccept, Guard, OODRule, SemanticAccept, guard_kind
from routers.guard.embedding import EmbeddingHead
from routers.guard.guard import share_featurizers
from routers.guard.knn import CoarseRanking, domain_centroids, normalize_rows
from routers.guard.widemlp import WideMLP
from training.guard_data import GuardRow

Progress = Callable[[str, int], Callable[[int], None]]  # (description, total) -> step(n)


def _no_progress(desc: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass(frozen=True)
class FitConfig:
    kind: str = "widemlp"
    id_recall: float = 0.95
    seed: int = 0
    epochs: int | None = None  # None: 5 (widemlp) / 60 (embedding head)
    hidden: int = 256
    max_features: int = 2**16  # hash buckets kept for the wide layer (most frequent in training)
    max_reference: int = 8000  # training rows kept for kNN evidence (4000 → 8000: +0.5 in guard_select)
    knn_k: int = 30  # chosen over {3, 10, 30, 100} by OOD rejection on ood_train (disjoint from test OOD)
    max_chars: int = 1000  # the guard judges the first 1000 characters (latency; accuracy unchanged)
    lr: float = 2e-3  # widemlp Adam step size
    batch_size: int = 64
    # evidence the OOD rule combines; None: ("knn", "tfknn"), plus "msp" when an ood class is trained.
    # Without an ood class, adding msp lowered OOD rejection on ood_train (validation sources disjoint
    # from every test source) at dev recall 0.93-0.95; with one, the domain probability is informative.
    ood_components: tuple[str, ...] | None = None
    tfidf_reference: bool = True  # widemlp: keep TF-IDF rows of the reference set for "tfknn"
    tfidf_reference_max_df: float = 0.05  # drop buckets in more rows than this share (cheap, low-idf)
    per_class_threshold: bool = False  # OOD percentile among the dev rows of the predicted domain
    num_seeds: int = 1  # widemlp members trained with seeds seed, seed+1, ...; tfknn kept by the first only
    mahalanobis: bool = False  # widemlp: class means + shared covariance in hidden space ("maha" evidence)
    maha_shrinkage: float = 0.1
    distill_weight: float = 0.0  # > 0: widemlp's hidden layer also fits MiniLM embeddings (training only)
    # The MiniLM of the embedding/ensemble kinds. Default: the first 3 of 6 layers, int8 weights, 32 word
    # pieces (guard_select --ood-val: 2 layers lose ~1.3 points, 1 layer ~5; 64 pieces gain 0.5 for twice
    # the encoder time; BENCHMARKS "Guard"). (6, False, 256) is the full model.
    encoder_layers: int = 3
    encoder_int8: bool = True
    encoder_max_length: int = 32
    # ensemble: stop after widemlp for texts whose widemlp-only OOD percentile is at least this (0: never;
    # routers.guard.EarlyAccept); the default of the ensemble kind is in routers.guard.kinds
    early_accept: float = 0.0
    # Serving cost of the kNN evidence (BENCHMARKS "Guard"): "tfknn" reads a text's this many
    # highest-weighted n-grams (0: all); the widemlp / embedding member ranks its references in this many
    # principal dimensions first (0: one exact scan) and computes exact cosines for the best
    # ``knn_candidates`` only (routers.guard.knn.CoarseRanking).
    tfknn_terms: int = 0
    hidden_knn_dims: int = 0
    embedding_knn_dims: int = 0
    knn_candidates: int = 256
    # "centroid" evidence: this many spherical k-means centroids per domain of the training rows, in the
    # embedding member's space (widemlp's hidden space without one); 0: none (routers.guard.knn.domain_centroids)
    centroids_per_domain: int = 0
    # OOD anchor (routers.guard.OODRule.calibrate): with OOD calibration rows, the threshold drops to just
    # above the row at this share of them (rejecting it), never above the dev threshold of id_recall; 0: off
    ood_reject: float = 0.0
    # a second way in (routers.guard.SemanticAccept): text the OOD rule rejects is accepted when its Fisher
    # percentile over ``semantic_components`` alone is at least this (0: off); the ensemble's default is in
    # routers.guard.kinds
    semantic_accept: float = 0.0
    semantic_components: tuple[str, ...] = ("embedding.centroid", "widemlp.tfknn")

    @classmethod
    def for_kind(cls, kind: str, **overrides) -> FitConfig:
        """The defaults ``training/guard_select.py`` chose for ``kind`` (``routers.guard.kinds``), then
        ``overrides`` (None values are ignored: "use the kind's default"); ValueError for an unknown kind."""
        defaults = guard_kind(kind).defaults
        return cls(kind=kind, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def make_embedder(self) -> MiniLMEmbedder:
        """This config's MiniLM, its ONNX graph exported (once per SWITCHYARD_HOME) and loaded."""
        return MiniLMEmbedder(max_length=self.encoder_max_length, num_layers=self.encoder_layers,
                              int8=self.encoder_int8).prepare()


def _set_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def _bags(X, col_map: np.ndarray):
    """csr rows → (indices, offsets, weights) for torch EmbeddingBag, dropping unkept buckets."""
    import torch

    rows = col_map[X.indices]
    keep = rows >= 0
    lens = np.diff(X.indptr)
    kept_per_row = np.zeros(X.shape[0], dtype=np.int64)
    if X.nnz:
        nz = lens > 0
        kept_per_row[nz] = np.add.reduceat(keep.astype(np.int64), X.indptr[:-1][nz])
    offsets = np.concatenate([[0], np.cumsum(kept_per_row)[:-1]])
    return (torch.from_numpy(rows[keep].astype(np.int64)), torch.from_numpy(offsets.astype(np.int64)),
            torch.from_numpy(X.data[keep].astype(np.float32)))


def fit_widemlp(texts: Sequence[str], y: np.ndarray, num_classes: int, ref_mask: np.ndarray,
                cfg: FitConfig, progress: Progress = _no_progress, targets: np.ndarray | None = None) -> WideMLP:
    """``targets`` (unit sentence embeddings [n, d], e.g. MiniLM's) add a training-only auxiliary head: a
    linear map of the hidden layer is pulled towards each row's embedding (cosine loss, weight
    ``cfg.distill_weight``), so the hidden space — where the ``knn`` evidence lives — also carries the
    embedding model's notion of similarity. The head is dropped afterwards: serving cost is unchanged."""
    import torch

    _set_seed(cfg.seed)
    torch.set_num_threads(1)  # small sparse batches: threads only add contention
    featurizer = HashedTfidf().fit(texts)
    X = featurizer.transform(texts)
    df = np.bincount(X.indices, minlength=featurizer.n_features)
    order = np.argsort(-df, kind="stable")
    kept = order[: min(cfg.max_features, int((df > 0).sum()))]
    col_map = np.full(featurizer.n_features, -1, dtype=np.int64)
    col_map[np.sort(kept)] = np.arange(len(kept))

    emb = torch.nn.EmbeddingBag(len(kept), cfg.hidden, mode="sum", sparse=True)
    torch.nn.init.normal_(emb.weight, 0.0, 0.01)
    b_in = torch.nn.Parameter(torch.zeros(cfg.hidden))
    out = torch.nn.Linear(cfg.hidden, num_classes)
    drop = torch.nn.Dropout(0.5)
    opt_sparse = torch.optim.SparseAdam(list(emb.parameters()), lr=cfg.lr)
    aux = torch.nn.Linear(cfg.hidden, targets.shape[1]) if targets is not None else None
    tt = torch.from_numpy(targets.astype(np.float32)) if targets is not None else None
    opt_dense = torch.optim.Adam([b_in, *out.parameters(), *(aux.parameters() if aux else [])], lr=cfg.lr)
    yt = torch.from_numpy(y.astype(np.int64))
    n = X.shape[0]
    epochs = cfg.epochs or 5
    bs = cfg.batch_size
    rng = np.random.RandomState(cfg.seed)
    step = progress("widemlp", epochs * ((n + bs - 1) // bs))
    for _ in range(epochs):
        perm = rng.permutation(n)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            i, o, w = _bags(X[idx], col_map)
            h = torch.relu(emb(i, o, per_sample_weights=w) + b_in)
            loss = torch.nn.functional.cross_entropy(out(drop(h)), yt[idx])
            if aux is not None:
                cos = torch.nn.functional.cosine_similarity(aux(h), tt[idx], dim=1)
                loss = loss + cfg.distill_weight * (1.0 - cos).mean()
            opt_sparse.zero_grad()
            opt_dense.zero_grad()
            loss.backward()
            opt_sparse.step()
            opt_dense.step()
            step(1)
    model = WideMLP(
        featurizer=featurizer, col_map=col_map, w_in=emb.weight.detach().numpy().copy(),
        b_in=b_in.detach().numpy().copy(), w_out=out.weight.detach().numpy().T.copy(),
        b_out=out.bias.detach().numpy().copy(), reference=np.zeros((1, cfg.hidden), np.float32),
        knn_k=cfg.knn_k, tfknn_terms=cfg.tfknn_terms,
    )
    ref_idx = _reference_rows(ref_mask, cfg)
    ref_texts = [texts[i] for i in ref_idx]
    ref_hidden = model.hidden(ref_texts)
    model.reference = normalize_rows(ref_hidden)
    if cfg.mahalanobis:
        model.class_means, model.precision = class_gaussian(ref_hidden, y[ref_idx], cfg.maha_shrinkage)
    if cfg.tfidf_reference:
        model.ref_tf = tfidf_reference(featurizer, ref_texts, cfg.tfidf_reference_max_df)
    set_search_options(model, cfg)
    return model


def class_gaussian(h: np.ndarray, y: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the inverse of the shared (pooled, within-class) covariance of hidden vectors,
    shrunk towards its mean diagonal by ``shrinkage`` so that it stays invertible."""
    classes = np.unique(y)
    means = np.stack([h[y == c].mean(axis=0) for c in classes]).astype(np.float64)
    centred = h - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / max(len(h) - len(classes), 1)
    cov = (1.0 - shrinkage) * cov + shrinkage * np.eye(len(cov)) * max(float(np.trace(cov)) / len(cov), 1e-6)
    return means.astype(np.float32), np.linalg.inv(cov).astype(np.float32)


def tfidf_reference(featurizer: HashedTfidf, texts: Sequence[str], max_df: float):
    """TF-IDF rows of ``texts``, transposed (buckets × rows), without buckets in more than ``max_df`` of
    them: common n-grams add little to a cosine but most of the single-query cost."""
    R = featurizer.transform(texts).T.tocsr()
    df = np.diff(R.indptr)
    R.data[np.repeat(df > max(1, int(max_df * len(texts))), df)] = 0
    R.eliminate_zeros()
    return R


def _reference_rows(ref_mask: np.ndarray, cfg: FitConfig) -> np.ndarray:
    idx = np.flatnonzero(ref_mask)
    if len(idx) > cfg.max_reference:
        idx = np.sort(np.random.RandomState(cfg.seed).choice(idx, cfg.max_reference, replace=False))
    return idx


def fit_embedding(emb: np.ndarray, y: np.ndarray, num_classes: int, ref_mask: np.ndarray, cfg: FitConfig,
                  embedder: MiniLMEmbedder, progress: Progress = _no_progress) -> EmbeddingHead:
    """Linear softmax head on frozen MiniLM embeddings (full-batch Adam, light L2)."""
    import torch

    _set_seed(cfg.seed)
    Xt = torch.from_numpy(emb.astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    lin = torch.nn.Linear(emb.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-5)
    epochs = cfg.epochs or 60
    step = progress("embedding head", epochs)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(lin(Xt * 10.0), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step(1)
    ref = normalize_rows(emb[_reference_rows(ref_mask, cfg)])
    head = EmbeddingHead(embedder=embedder, w=(lin.weight.detach().numpy().T * 10.0).copy(),
                         b=lin.bias.detach().numpy().copy(), reference=np.ascontiguousarray(ref, dtype=np.float32),
                         knn_k=cfg.knn_k)
    set_search_options(head, cfg)
    return head


def set_search_options(member: WideMLP | EmbeddingHead, cfg: FitConfig) -> None:
    """Apply ``cfg``'s kNN search options (``tfknn_terms``, ``*_knn_dims``, ``knn_candidates``) to a fitted
    member: they change how its evidence is computed from the stored reference rows, not what was trained."""
    if isinstance(member, WideMLP):
        member.tfknn_terms = cfg.tfknn_terms
        member.coarse = fit_coarse_ranking(member.reference, cfg.hidden_knn_dims, cfg.knn_candidates)
    else:
        member.coarse = fit_coarse_ranking(member.reference, cfg.embedding_knn_dims, cfg.knn_candidates)


def fit_coarse_ranking(reference: np.ndarray, dims: int, candidates: int) -> CoarseRanking | None:
    """A two-stage kNN search over ``reference``'s top ``dims`` principal directions; None when a coarse
    stage would not be smaller."""
    if not 0 < dims < min(reference.shape) or candidates >= len(reference):
        return None
    mean = reference.mean(axis=0)
    _, _, vt = np.linalg.svd((reference - mean).astype(np.float64), full_matrices=False)
    return CoarseRanking.of(reference, mean.astype(np.float32), np.ascontiguousarray(vt[:dims].T, dtype=np.float32),
                            candidates)


def _embed_all(embedder: MiniLMEmbedder, texts: Sequence[str], progress: Progress) -> np.ndarray:
    step = progress("minilm embeddings", len(texts))
    embs = []
    for start in range(0, len(texts), 256):
        embs.append(embedder.encode(list(texts[start:start + 256])))
        step(len(embs[-1]))
    return np.concatenate(embs)


def class_list(train: Sequence[GuardRow], ood: Sequence[GuardRow] = (), unsafe: Sequence[GuardRow] = ()) -> list[str]:
    domains = sorted({r.label for r in train})
    bad = [d for d in domains if d in (OOD, UNSAFE)]
    if bad:
        raise ValueError(f"the in-domain training file has rows labelled {bad[0]!r}; pass them with "
                         f"--{'ood' if bad[0] == OOD else 'unsafe'}-train instead")
    if len(domains) < 2:
        raise ValueError(f"the training file needs at least two domain labels, found {domains}")
    return domains + ([UNSAFE] if unsafe else []) + ([OOD] if ood else [])


def fit_guard(train: Sequence[GuardRow], dev: Sequence[GuardRow], cfg: FitConfig,
              ood: Sequence[GuardRow] = (), unsafe: Sequence[GuardRow] = (),
              progress: Progress = _no_progress, embedder: MiniLMEmbedder | None = None,
              ood_calibration: Sequence[GuardRow] = ()) -> Guard:
    """Train the members named by ``cfg.kind`` on ``train`` (+ optional extra classes), calibrate the OOD
    rule on ``dev`` (in-domain rows only) at ``cfg.id_recall``; with ``ood_calibration`` rows (never
    trained on) and ``cfg.ood_reject``, anchor the threshold on them as well."""
    guard = fit_uncalibrated(train, cfg, ood, unsafe, progress, embedder)
    dev_bad = [r for r in dev if r.label not in guard.domains]
    if dev_bad:
        raise ValueError(f"dev has label {dev_bad[0].label!r}, not a training domain ({', '.join(guard.classes)})")
    dev_texts = [r.text[: cfg.max_chars] for r in dev]
    probs, comps = guard.combine({name: m.evidence(dev_texts) for name, m in guard.members.items()})
    dev_pred = guard.predicted_domain(probs) if cfg.per_class_threshold else None
    chosen = select_components(comps, cfg, bool(ood))
    ood_chosen = None
    if ood_calibration and cfg.ood_reject > 0:
        cal_texts = [r.text[: cfg.max_chars] for r in ood_calibration]
        _, cal_comps = guard.combine({name: m.evidence(cal_texts) for name, m in guard.members.items()})
        ood_chosen = {k: cal_comps[k] for k in chosen}
    guard.rule = OODRule.calibrate(chosen, cfg.id_recall, dev_pred, len(guard.domains),
                                   ood_components=ood_chosen, ood_reject=cfg.ood_reject)
    if cfg.semantic_accept > 0:
        missing = [c for c in cfg.semantic_components if c not in comps]
        if missing:
            raise ValueError(f"the semantic accept needs evidence {missing} (has {sorted(comps)}; "
                             f"'embedding.centroid' needs an embedding member and centroids)")
        guard.semantic_accept = SemanticAccept(
            OODRule.calibrate({c: comps[c] for c in cfg.semantic_components}, cfg.id_recall), cfg.semantic_accept)
    if cfg.early_accept > 0 and cfg.kind == "ensemble" and guard.can_exit_early:
        wide = {k: v for k, v in chosen.items() if k.startswith("widemlp.")}
        guard.early_accept = EarlyAccept(OODRule.calibrate(wide, cfg.id_recall), cfg.early_accept)
    return guard


def default_components(kind: str) -> tuple[str, ...]:
    """The OOD evidence ``training/guard_select.py`` chose per kind: a bare component (``knn``) means
    every member's, a dotted one (``widemlp.tfknn``) one member's."""
    return ("knn", "tfknn")


def select_components(comps: dict[str, np.ndarray], cfg: FitConfig, has_ood_class: bool) -> dict[str, np.ndarray]:
    """The evidence the OOD rule combines: the ``member.component`` entries named by ``cfg.ood_components``
    (or ``default_components``), either in full or by their component name alone."""
    wanted = cfg.ood_components or (default_components(cfg.kind) + (("msp",) if has_ood_class else ()))
    chosen = {k: v for k, v in comps.items() if k in wanted or k.split(".", 1)[1] in wanted}
    if not chosen:
        raise ValueError(f"no OOD evidence among {sorted(comps)} matches {wanted}")
    return chosen


def fit_uncalibrated(train: Sequence[GuardRow], cfg: FitConfig, ood: Sequence[GuardRow] = (),
                     unsafe: Sequence[GuardRow] = (), progress: Progress = _no_progress,
                     embedder: MiniLMEmbedder | None = None) -> Guard:
    """The members trained, with a placeholder OOD rule (callers calibrate ``guard.rule`` on dev rows)."""
    families = guard_kind(cfg.kind).families
    classes = class_list(train, ood, unsafe)
    rows = [*train, *unsafe, *ood]
    texts = [r.text[: cfg.max_chars] for r in rows]
    y = np.array([classes.index(r.label) for r in rows])
    ref_mask = np.array([r.label not in (OOD, UNSAFE) for r in rows])
    members = {}
    targets = None
    if cfg.distill_weight > 0 and "widemlp" in families:
        targets = _embed_all(embedder := embedder or cfg.make_embedder(), texts, progress)
    if "widemlp" in families:
        members["widemlp"] = fit_widemlp(texts, y, len(classes), ref_mask, cfg, progress, targets)
        for i in range(1, cfg.num_seeds):  # extra seeds: averaged probabilities and hidden-space evidence
            seed_cfg = replace(cfg, seed=cfg.seed + i, tfidf_reference=False)
            members[f"widemlp_{i}"] = fit_widemlp(texts, y, len(classes), ref_mask, seed_cfg, progress, targets)
        share_featurizers(members)
    if "embedding" in families:
        embedder = embedder or cfg.make_embedder()
        embs = targets if targets is not None else _embed_all(embedder, texts, progress)
        members["embedding"] = fit_embedding(embs, y, len(classes), ref_mask, cfg, embedder, progress)
        if cfg.centroids_per_domain > 0:
            members["embedding"].centroids = domain_centroids(normalize_rows(embs[ref_mask]), y[ref_mask],
                                                              cfg.centroids_per_domain, cfg.seed)
    if cfg.centroids_per_domain > 0 and "embedding" not in members:  # an ensemble's are MiniLM's only
        wide = members["widemlp"]
        hid = wide.hidden([t for t, keep in zip(texts, ref_mask, strict=True) if keep])
        wide.centroids = domain_centroids(normalize_rows(hid), y[ref_mask], cfg.centroids_per_domain, cfg.seed)
    return Guard(kind=cfg.kind, classes=classes, members=members,
                 rule=OODRule({}, np.zeros(1), cfg.id_recall), max_chars=cfg.max_chars)
