"""`switchyard train guard` and `switchyard eval guard`.

Metrics (GQR-Bench protocol): in-domain accuracy counts a rejected in-domain row as wrong; OOD accuracy is
the share of OOD rows rejected (``ood`` or ``unsafe``), per ``source`` and averaged over sources;
GQR-score is the harmonic mean of in-domain accuracy and that mean. AUROC separates in-domain from OOD
rows by the in-domain score. Latency is per single query on one CPU thread, after a warm-up.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.guard_data import GuardRow, load_guard_rows

REJECT = ("ood", "unsafe")


def _progress_factory(enabled: bool):
    from tqdm import tqdm

    bars = []

    def make(desc: str, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)
        bars.append(bar)
        return bar.update

    return make, bars


def _one_thread() -> None:
    import torch

    from routers.guard import single_thread_blas

    torch.set_num_threads(1)
    single_thread_blas()


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def train_guard(args) -> int:
    from routers.guard import OOD, UNSAFE
    from routers.guard.kinds import DEFAULT_KIND
    from training.guard_fit import FitConfig, fit_guard

    args.kind = args.kind or DEFAULT_KIND

    if args.id_recall is not None and not 0.0 < args.id_recall <= 1.0:
        raise ValueError(f"--id-recall must be in (0, 1], got {args.id_recall}")
    t0 = time.time()
    train = load_guard_rows(args.train)
    bad = next((r for r in train if r.label in (OOD, UNSAFE)), None)
    if bad is not None:
        raise ValueError(f"{args.train}: label {bad.label!r} in the in-domain training file; "
                         f"use --{'ood' if bad.label == OOD else 'unsafe'}-train for those rows")
    domains = {r.label for r in train}
    dev = load_guard_rows(args.dev, allowed_labels=domains)
    ood = [GuardRow(r.text, OOD, r.source) for r in load_guard_rows(args.ood_train, default_label=OOD)] \
        if args.ood_train else []
    unsafe = [GuardRow(r.text, UNSAFE, r.source) for r in load_guard_rows(args.unsafe_train, default_label=UNSAFE)] \
        if args.unsafe_train else []
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.distill_weight < 0:
        raise ValueError(f"--distill-weight must be >= 0, got {args.distill_weight}")
    if args.encoder_max_length < 8:
        raise ValueError(f"--encoder-max-length must be at least 8 word pieces, got {args.encoder_max_length}")
    if args.early_accept is not None and not 0.0 <= args.early_accept < 1.0:
        raise ValueError(f"--early-accept must be in [0, 1) (0: off), got {args.early_accept}")
    if args.knn_dims is not None and args.knn_dims < 0 or args.tfknn_terms is not None and args.tfknn_terms < 0:
        raise ValueError("--knn-dims and --tfknn-terms must be >= 0 (0: exact search / every n-gram)")
    if args.semantic_accept is not None and not 0.0 <= args.semantic_accept < 1.0:
        raise ValueError(f"--semantic-accept must be in [0, 1) (0: off), got {args.semantic_accept}")
    if args.centroids is not None and args.centroids < 0:
        raise ValueError(f"--centroids must be >= 0 (0: none), got {args.centroids}")
    if args.ood_reject is not None and not 0.0 < args.ood_reject <= 1.0:
        raise ValueError(f"--ood-reject must be in (0, 1], got {args.ood_reject}")
    if args.ood_reject is not None and not args.ood_calibration:
        raise ValueError("--ood-reject needs --ood-calibration FILE (the OOD rows it is measured on)")
    ood_cal = load_guard_rows(args.ood_calibration, default_label=OOD) if args.ood_calibration else []
    cfg = FitConfig.for_kind(
        args.kind, id_recall=args.id_recall, seed=args.seed, epochs=args.epochs, hidden=args.hidden, lr=args.lr,
        per_class_threshold=None if args.threshold is None else args.threshold == "per-class",
        num_seeds=args.seeds, distill_weight=args.distill_weight, encoder_layers=args.encoder_layers,
        encoder_int8=args.encoder_int8, encoder_max_length=args.encoder_max_length,
        hidden_knn_dims=args.knn_dims, embedding_knn_dims=args.knn_dims, tfknn_terms=args.tfknn_terms,
        early_accept=args.early_accept, centroids_per_domain=args.centroids, semantic_accept=args.semantic_accept,
        ood_reject=(args.ood_reject or 0.95) if ood_cal else 0.0)
    make, bars = _progress_factory(sys.stderr.isatty() or bool(os.environ.get("SWITCHYARD_PROGRESS")))
    guard = fit_guard(train, dev, cfg, ood=ood, unsafe=unsafe, progress=make, ood_calibration=ood_cal)
    for bar in bars:
        bar.close()
    dev_batch = guard.score_batch([r.text for r in dev])
    dev_cls = guard.score_batch([r.text for r in dev], id_recall=1.0)
    dev_acc = float(np.mean([p == r.label for p, r in zip(dev_cls.labels, dev, strict=True)]))
    dev_kept = float(np.mean([p not in REJECT for p in dev_batch.labels]))
    guard.meta.update({
        "featurizer": {name: m.get("featurizer", m.get("embedder")) for name, m in
                       {n: mm.state(f"{n}.")[0] for n, mm in guard.members.items()}.items()},
        "training_data": {
            "train": {"path": str(args.train), "rows": len(train), "per_label": _counts(r.label for r in train)},
            "dev": {"path": str(args.dev), "rows": len(dev)},
            "ood_train": {"path": str(args.ood_train), "rows": len(ood)} if ood else None,
            "unsafe_train": {"path": str(args.unsafe_train), "rows": len(unsafe)} if unsafe else None,
            "ood_calibration": {"path": str(args.ood_calibration), "rows": len(ood_cal),
                                "ood_reject": cfg.ood_reject} if ood_cal else None,
            "seed": args.seed,
        },
        "metrics": {"dev_accuracy_no_rejection": dev_acc, "dev_id_kept": dev_kept},
    })
    out = guard.save(args.out)
    elapsed = time.time() - t0
    rows = [("kind", guard.kind), ("classes", ", ".join(guard.classes)),
            ("train rows", f"{len(train)} (+{len(ood)} ood, +{len(unsafe)} unsafe)"), ("dev rows", str(len(dev))),
            ("dev accuracy (no rejection)", f"{dev_acc * 100:.2f}%"),
            ("OOD threshold", f"id_percentile < {guard.rule.threshold:.4f} (id_recall {cfg.id_recall}, "
                              f"{'per-class' if cfg.per_class_threshold else 'global'}"
                              + (f", anchored: {cfg.ood_reject:g} of {len(ood_cal)} OOD rows rejected" if ood_cal
                                 else "") + ")"),
            ("kNN search", f"{cfg.hidden_knn_dims or 'exact'} dims (hidden), {cfg.embedding_knn_dims or 'exact'} "
                           f"dims (embedding), tfknn terms {cfg.tfknn_terms or 'all'}"),
            ("early accept", "off" if guard.early_accept is None else
             f"widemlp percentile >= {guard.early_accept.percentile} (dev rows stopping after widemlp: "
             f"{float(np.mean(guard.early_accept.accepts(_wide_dev(guard, dev)))) * 100:.1f}%)"),
            ("semantic accept", "off" if guard.semantic_accept is None else
             f"percentile >= {guard.semantic_accept.percentile} over {', '.join(guard.semantic_accept.rule.dev_scores)}"),
            ("dev in-domain kept", f"{dev_kept * 100:.2f}%"), ("seed", str(args.seed)),
            ("train time", f"{elapsed:.1f} s"), ("artifact", str(out))]
    _print_table(["guard", ""], rows)
    return 0


def _wide_dev(guard, dev) -> dict[str, np.ndarray]:
    """The widemlp member's named evidence on the dev texts (for the early-accept summary line)."""
    from routers.guard import named_evidence

    _, comps = guard.members["widemlp"].evidence([r.text[: guard.max_chars] for r in dev])
    return named_evidence("widemlp", comps)


def _counts(labels) -> dict[str, int]:
    out: dict[str, int] = {}
    for lab in labels:
        out[lab] = out.get(lab, 0) + 1
    return dict(sorted(out.items()))


def _print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    table = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for n, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=file)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=file)


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------


def guard_metrics(id_rows: Sequence[GuardRow], id_pred: Sequence[str], id_score: np.ndarray,
                  ood_rows: Sequence[GuardRow], ood_pred: Sequence[str], ood_score: np.ndarray,
                  domains: Sequence[str]) -> dict[str, Any]:
    from sklearn.metrics import f1_score, roc_auc_score

    id_true = [r.label for r in id_rows]
    id_acc = float(np.mean([p == t for p, t in zip(id_pred, id_true, strict=True)]))
    macro_f1 = float(f1_score(id_true, list(id_pred), labels=list(domains), average="macro", zero_division=0))
    per_source: dict[str, float] = {}
    for src in sorted({r.source for r in ood_rows}):
        hits = [p in REJECT for p, r in zip(ood_pred, ood_rows, strict=True) if r.source == src]
        per_source[src] = float(np.mean(hits))
    ood_acc = float(np.mean(list(per_source.values())))
    gqr = 2 * id_acc * ood_acc / (id_acc + ood_acc) if id_acc + ood_acc > 0 else 0.0
    y = np.r_[np.ones(len(id_score)), np.zeros(len(ood_score))]
    auroc = float(roc_auc_score(y, np.r_[id_score, ood_score]))
    cols = list(domains) + ["ood", "unsafe"]
    confusion = {t: {c: 0 for c in cols} for t in list(domains) + ["ood"]}
    for t, p in zip(id_true + ["ood"] * len(ood_rows), list(id_pred) + list(ood_pred), strict=True):
        confusion[t][p] += 1
    return {"gqr_score": gqr * 100, "id_accuracy": id_acc * 100, "id_macro_f1": macro_f1 * 100,
            "ood_accuracy": ood_acc * 100, "ood_accuracy_per_source": {k: v * 100 for k, v in per_source.items()},
            "auroc": auroc, "confusion": confusion}


def _latency(fn: Callable[[str], Any], texts: Sequence[str], n: int) -> dict[str, float]:
    """Single-query latency of ``fn`` over ``n`` of ``texts`` (0: all of them) in a fixed random order."""
    rng = np.random.RandomState(0)
    n = len(texts) if n <= 0 else min(n, len(texts))
    sample = [texts[i] for i in rng.choice(len(texts), n, replace=False)]
    for t in sample[:50]:
        fn(t)
    times, cpu = [], []
    for t in sample:
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn(t)
        cpu.append((time.thread_time() - start_cpu) * 1000)
        times.append((time.perf_counter() - start) * 1000)
    # wall-clock is what a request sees; thread CPU time is the cost without other processes' preemption
    return {"latency_ms_p50": float(np.percentile(times, 50)), "latency_ms_p99": float(np.percentile(times, 99)),
            "cpu_ms_p50": float(np.percentile(cpu, 50)), "cpu_ms_p99": float(np.percentile(cpu, 99)),
            "latency_queries": len(times)}


def _guard_id_score(batch, classes: Sequence[str]) -> np.ndarray:
    """In-domain score for AUROC: the rule's percentile, pushed down when a trained reject class wins."""
    score = np.asarray(batch.id_percentile, dtype=np.float64).copy()
    reject_idx = [i for i, c in enumerate(classes) if c in REJECT]
    if reject_idx:
        score *= 1.0 - batch.probs[:, reject_idx].sum(axis=1)
    return score


def eval_guard(args) -> int:
    from routers.guard import Guard

    if args.loso:
        return loso_guard(args)
    missing = [f"--{n.replace('_', '-')}" for n in ("model", "test_id", "test_ood") if not getattr(args, n)]
    if missing:
        raise ValueError(f"eval guard needs {', '.join(missing)} (or --loso with --train/--dev)")
    _one_thread()
    guard = Guard.load(args.model)
    domains = guard.domains
    id_rows = load_guard_rows(args.test_id, allowed_labels=set(domains))
    ood_rows = load_guard_rows(args.test_ood, allowed_labels={"ood", "unsafe"}, default_label="ood")
    id_texts, ood_texts = [r.text for r in id_rows], [r.text for r in ood_rows]
    id_b, ood_b = guard.score_batch(id_texts), guard.score_batch(ood_texts)
    id_s, ood_s = _guard_id_score(id_b, guard.classes), _guard_id_score(ood_b, guard.classes)
    results: dict[str, Any] = {"model": str(args.model), "kind": guard.kind,
                               "id_recall_target": guard.rule.id_recall}
    m = guard_metrics(id_rows, id_b.labels, id_s, ood_rows, ood_b.labels, ood_s, domains)
    m.update(_latency(guard.classify, id_texts + ood_texts, args.max_latency_queries))
    results.update(m)
    curves = {"guard": _curve(id_b, ood_b, guard, id_rows, ood_rows)}

    baselines: dict[str, Any] = {}
    if args.train or args.dev:
        if not (args.train and args.dev):
            raise ValueError("baselines need both --train and --dev")
        from training.guard_baselines import fit_baselines

        train = load_guard_rows(args.train, allowed_labels=set(domains))
        dev = load_guard_rows(args.dev, allowed_labels=set(domains))
        for b in fit_baselines([r.text for r in train], [r.label for r in train], [r.text for r in dev],
                               guard.rule.id_recall, seed=0):
            ip, isc = b.predict(id_texts)
            op, osc = b.predict(ood_texts)
            bm = guard_metrics(id_rows, ip, isc, ood_rows, op, osc, domains)
            bm.update(_latency(lambda t, b=b: b.predict([t]), id_texts + ood_texts,
                               args.max_latency_queries))
            baselines[b.name] = bm
        results["baselines"] = baselines
    _print_report(results)
    if args.plot:
        _plot(curves, args.plot)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    return 0


def _curve(id_b, ood_b, guard, id_rows, ood_rows) -> list[tuple[float, float]]:
    """(dev id_recall target, mean-over-sources OOD rejection on test) points, from the stored dev percentiles."""
    points = []
    sources = sorted({r.source for r in ood_rows})
    for recall in np.linspace(0.80, 1.0, 41):
        th = guard.rule.threshold_for(float(recall))
        id_kept = float(np.mean(id_b.id_percentile >= th))
        rej = [np.mean([ood_b.id_percentile[i] < th for i, r in enumerate(ood_rows) if r.source == s]) for s in sources]
        points.append((id_kept, float(np.mean(rej))))
    return points


def _plot(curves: dict[str, list[tuple[float, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    ax.set_xlabel("in-domain recall (test)")
    ax.set_ylabel("OOD rejection (mean over sources)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_report(r: dict[str, Any]) -> None:
    systems = {"guard": r, **r.get("baselines", {})}
    rows = []
    for name, m in systems.items():
        rows.append((name, f"{m['gqr_score']:.2f}", f"{m['id_accuracy']:.2f}", f"{m['id_macro_f1']:.2f}",
                     f"{m['ood_accuracy']:.2f}", f"{m['auroc']:.4f}", f"{m['latency_ms_p50']:.3f}",
                     f"{m['latency_ms_p99']:.3f}", f"{m['cpu_ms_p50']:.3f}", f"{m['cpu_ms_p99']:.3f}"))
    _print_table(["system", "GQR", "ID acc", "ID F1", "OOD acc", "AUROC", "p50 ms", "p99 ms", "cpu p50", "cpu p99"],
                 rows)
    for name, b in r.get("baselines", {}).items():  # the machine's speed drifts: ratios to a same-run peer
        print(f"guard vs {name} (same run): GQR {r['gqr_score'] - b['gqr_score']:+.2f}, latency p50 "
              f"{r['latency_ms_p50'] / b['latency_ms_p50']:.2f}x, p99 {r['latency_ms_p99'] / b['latency_ms_p99']:.2f}x")
    print()
    sources = list(r["ood_accuracy_per_source"])
    _print_table(["OOD accuracy", *systems],
                 [(s, *(f"{m['ood_accuracy_per_source'][s]:.2f}" for m in systems.values())) for s in sources])
    print()
    conf = r["confusion"]
    cols = list(next(iter(conf.values())))
    _print_table(["true \\ predicted", *cols], [(t, *(row[c] for c in cols)) for t, row in conf.items()])


# --------------------------------------------------------------------------------------------------
# add-examples
# --------------------------------------------------------------------------------------------------


def add_examples(args) -> int:
    """``switchyard guard add-examples ARTIFACT --file F --out DIR``: ``Guard.add_examples`` on the rows of
    ``F``, written as a new artifact (the input artifact is not changed)."""
    from routers.guard import OOD, Guard

    if Path(args.out).resolve() == Path(args.artifact).resolve():
        raise ValueError("--out must be a new folder, not the artifact itself")
    guard = Guard.load(args.artifact)
    rows = load_guard_rows(args.file, allowed_labels={*guard.domains, OOD})
    before = guard.rule.threshold
    counts = guard.add_examples([r.text for r in rows], [r.label for r in rows])
    out = guard.save(args.out)
    result = {"artifact": str(out), "added": counts, "threshold_before": before,
              "threshold_after": guard.rule.threshold, "added_total": guard.meta.get("added_examples", {})}
    _print_table(["add-examples", ""], [("from", str(args.artifact)), ("rows", str(len(rows))),
                                        ("added", ", ".join(f"{k} {v}" for k, v in counts.items())),
                                        ("OOD threshold", f"{before:.4f} -> {guard.rule.threshold:.4f}"),
                                        ("artifact", str(out))])
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


# --------------------------------------------------------------------------------------------------
# eval --loso
# --------------------------------------------------------------------------------------------------


def loso_guard(args) -> int:
    """``switchyard eval guard --loso``: the leave-one-source-out shift protocol
    (``training.guard_select.make_loso_folds``) for the guard ``train guard`` builds with the same options."""
    from routers.guard.kinds import DEFAULT_KIND
    from training.guard_fit import FitConfig, default_components
    from training.guard_select import OOD_VAL, CachedEmbedder, RuleSpec, Variant, select

    if not (args.train and args.dev):
        raise ValueError("--loso needs --train and --dev (the protocol never reads test files)")
    if args.ood_reject is not None and not (0.0 < args.ood_reject <= 1.0 and args.ood_val):
        raise ValueError("--ood-reject must be in (0, 1] and needs --ood-val (the OOD rows it is anchored on)")
    _one_thread()
    kind = args.kind or DEFAULT_KIND
    cfg = FitConfig.for_kind(kind, id_recall=args.id_recall, centroids_per_domain=args.centroids)
    train = load_guard_rows(args.train)
    dev = load_guard_rows(args.dev, allowed_labels={r.label for r in train})
    ood_val = load_guard_rows(args.ood_val, default_label="ood") if args.ood_val else []
    spec = RuleSpec("defaults", cfg.ood_components or default_components(kind), id_recall=cfg.id_recall,
                    per_class=cfg.per_class_threshold, early_accept=cfg.early_accept,
                    ood_reject=args.ood_reject or 0.0, semantic_accept=cfg.semantic_accept,
                    semantic_components=cfg.semantic_components)
    overrides = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if getattr(cfg, f) != getattr(FitConfig(), f)}
    embedder = CachedEmbedder(Path(args.embedding_cache) if args.embedding_cache else None, cfg) \
        if kind != "widemlp" else None
    res = select(train, dev, [Variant(kind, overrides)], [spec], base=FitConfig(),
                 cache=Path(args.cache) if args.cache else None, log=lambda m: print(m, file=sys.stderr),
                 embedder=embedder, ood_val=ood_val, loso=True)[0]
    folds = {k: v for k, v in res["folds"].items() if k != OOD_VAL}
    rows = [(name.removeprefix("loso-"), f"{f['shift_acc']:.2f}", f"{f['shift_kept']:.2f}", f"{f['id_acc']:.2f}",
             f"{f['ood_acc']:.2f}", f"{f['gqr']:.2f}") for name, f in folds.items()]
    rows.append(("mean", f"{res['shift_acc']:.2f}", f"{res['shift_kept']:.2f}", f"{res['id_acc']:.2f}",
                 f"{res['ood_acc']:.2f}", f"{res['score']:.2f}"))
    _print_table(["held-out source", "shifted acc", "shifted kept", "in-style acc", "OOD rejected", "GQR"], rows)
    out = {"kind": kind, "loso_gqr": res["score"], "shift_acc": res["shift_acc"], "shift_kept": res["shift_kept"],
           "in_style_acc": res["id_acc"], "ood_acc": res["ood_acc"], "ood_val_gqr": res["ood_val"],
           "per_source": folds}
    if res["ood_val"] is not None:
        print(f"ood-val fold (all sources trained, GQR protocol on --ood-val): {res['ood_val']:.2f}")
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0
