"""Handlers of ``switchyard train router``, ``switchyard eval router`` and ``switchyard calibrate``."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.calibrate import calibrate_scores, share_for_cost, share_table
from training.data import RoutingRow, eval_bucket, eval_percent_of, is_eval_row, load_routing_rows
from training.evaluate import measure_latency, metrics, oracle_scores, random_scores
from training.fit import TrainConfig, fit_router

if TYPE_CHECKING:
    from routers.router import Router


def _single_thread() -> None:
    """Router latency is measured (and served) on one CPU thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _prices(args: argparse.Namespace, stored: dict | None = None) -> dict[str, float]:
    prices = dict(stored or {})
    if getattr(args, "slm_price", None) is not None:
        prices["slm"] = float(args.slm_price)
    if getattr(args, "llm_price", None) is not None:
        prices["llm"] = float(args.llm_price)
    return prices


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def train_router(args: argparse.Namespace) -> int:
    if getattr(args, "init", None):
        return _update_router(args)
    for flag in ("init_data", "promote_if_better"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} is for updating a router: add --init ARTIFACT")
    args.kind = args.kind or "tfidf_source_ridge"
    args.eval_fraction = 0.2 if args.eval_fraction is None else args.eval_fraction
    args.strong_share = 0.5 if args.strong_share is None else args.strong_share
    args.seed = 0 if args.seed is None else args.seed
    rows = load_routing_rows(args.data)
    if args.kind == "nmodel" or not any(r.is_pairwise for r in rows):
        return _train_nmodel(args, rows)
    if args.price or args.alpha is not None:
        raise ValueError("--price and --alpha are for --kind nmodel (two-pool routers: --slm-price/--llm-price)")
    cfg = TrainConfig(
        kind=args.kind,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
        exclude_sources=tuple(args.exclude_source),
        strong_share=args.strong_share,
        prices=_prices(args),
    )
    from routers.scorers import SCORERS

    if cfg.kind not in SCORERS:
        raise ValueError(f"unknown router kind {cfg.kind!r}; valid kinds: {', '.join(sorted(SCORERS))}, nmodel")
    router = fit_router(rows, cfg)
    router.meta["training_data"]["file"] = str(args.data)
    out = router.save(args.out)
    td = router.meta["training_data"]
    print(f"trained {cfg.kind} router on {td['num_fit_rows']} rows ({td['sources']}), "
          f"calibrated on {td['num_calibration_rows']}; threshold {router.threshold:.4f} "
          f"for strong share {cfg.strong_share:g} → {out}")
    if getattr(args, "json", False):
        print(json.dumps({"kind": cfg.kind, "out": str(out), "threshold": router.threshold,
                          "num_fit_rows": td["num_fit_rows"], "sources": td["sources"]}))
    return 0


def model_prices(args: argparse.Namespace, models: list[str], stored: dict | None = None) -> dict[str, float]:
    """N-model prices (USD per 1k requests): the artifact's, overridden by ``--price NAME=USD``."""
    prices = {m: float(v) for m, v in (stored or {}).items() if m in models}
    for item in getattr(args, "price", None) or []:
        name, sep, value = item.rpartition("=")
        try:
            usd = float(value)
        except ValueError:
            usd = -1.0
        if not sep or not name or usd < 0:
            raise ValueError(f"--price {item!r}: give MODEL=USD_PER_1K_REQUESTS, e.g. --price {models[0]}=0.2")
        if name not in models:
            raise ValueError(f"--price {item!r}: {name!r} is not a model of this router; its models: {models}")
        prices[name] = usd
    return prices


def _update_router(args: argparse.Namespace) -> int:
    """``train router --init A``: refit A's kind on A's training rows + the new rows; with
    ``--promote-if-better`` write ``--out`` only when the gate passes (exit 1 otherwise)."""
    from routers.router import Router
    from training.router_update import (
        TrainingFile,
        gate_precheck,
        held_out_rows,
        load_training_files,
        promotion_gate,
        training_files,
    )

    serving = Router.load(args.init)
    if getattr(serving, "is_nmodel", False):
        raise ValueError(f"--init {args.init} is an nmodel router: --init updates two-pool routers; retrain an "
                         "nmodel router with `switchyard train router --kind nmodel` on old + new rows")
    td = serving.meta.get("training_data") or {}
    pct = int(td.get("split", {}).get("eval_percent", 20))
    if args.price or args.alpha is not None:
        raise ValueError("--price and --alpha are for --kind nmodel; an update keeps the artifact's prices "
                         "(--slm-price/--llm-price override them)")
    if args.kind is not None and args.kind != serving.kind:
        raise ValueError(f"--kind {args.kind} differs from the --init artifact's kind {serving.kind}: an update "
                         "keeps the kind (train a new router without --init to change it)")
    if args.eval_fraction is not None and eval_percent_of(args.eval_fraction) != pct:
        raise ValueError(f"--eval-fraction {args.eval_fraction:g} differs from the --init artifact's split "
                         f"({pct} %): an update keeps the split, so its eval rows stay unseen")
    if args.init_data:
        old_files = [TrainingFile(f, tuple(td.get("excluded_sources") or ())) for f in args.init_data]
    else:
        old_files = training_files(serving.meta)
        if not old_files:
            raise ValueError(f"--init {args.init}: the artifact does not record its training data; pass "
                             "--init-data FILE")
    old_rows = load_training_files(old_files)
    new_rows = [r for r in load_routing_rows(args.data, require="pairwise") if r.source not in args.exclude_source]
    if not new_rows:
        raise ValueError(f"{args.data}: no rows left after --exclude-source")
    held = held_out_rows(new_rows, pct)
    early = gate_precheck(held, args.tolerance)
    if args.promote_if_better and early is not None:
        print(f"gate: not passed: {early.reason}")
        print(f"not promoted (nothing fitted): {args.out} is unchanged; the serving artifact {args.init} stays")
        if getattr(args, "json", False):
            print(json.dumps({"init": str(args.init), "kind": serving.kind, "out": str(args.out),
                              "num_new_rows": len(new_rows), "gate": early.as_dict(), "promote_if_better": True,
                              "written": False}))
        return 1
    stored_share = (serving.meta.get("calibration") or {}).get("target_share")
    share = args.strong_share if args.strong_share is not None else stored_share if stored_share is not None else 0.5
    cfg = TrainConfig(kind=serving.kind, seed=args.seed if args.seed is not None else int(td.get("seed", 0)),
                      eval_fraction=pct / 100, strong_share=float(share),
                      prices=_prices(args, serving.meta.get("prices")))
    candidate = fit_router(old_rows + new_rows, cfg)
    files = [*old_files, TrainingFile(os.path.abspath(args.data), tuple(args.exclude_source))]
    ctd = candidate.meta["training_data"]
    ctd["file"], ctd["files"] = files[0].path, [f.as_dict() for f in files]
    ctd["excluded_sources"] = list(td.get("excluded_sources") or ())
    ctd["update"] = {"init": str(args.init), "method": "refit from scratch on the init artifact's training rows "
                     "+ the new rows' training split (same kind, split and seed)",
                     "num_old_rows": len(old_rows), "num_new_rows": len(new_rows),
                     "num_new_heldout_rows": len(held)}
    candidate.meta["cascade"] = serving.meta.get("cascade")
    gate = promotion_gate(serving, candidate, held, args.tolerance)
    candidate.meta["promotion"] = {**gate.as_dict(), "serving": str(args.init)}
    report = {"init": str(args.init), "kind": serving.kind, "out": str(args.out), "num_old_rows": len(old_rows),
              "num_new_rows": len(new_rows), "num_new_train_rows": len(new_rows) - len(held),
              "gate": gate.as_dict(), "promote_if_better": bool(args.promote_if_better)}
    print(f"updated {serving.kind} router {args.init}: refit on {ctd['num_fit_rows']} rows "
          f"({len(old_rows)} of its own data before the split, {len(new_rows) - len(held)} new training rows); "
          f"{len(held)} new rows held out")
    print(f"gate: {'passed' if gate.passed else 'not passed'}: {gate.reason}")
    write = gate.passed or not args.promote_if_better
    if write:
        out = candidate.save(args.out)
        print(f"threshold {candidate.threshold:.4f} for strong share {cfg.strong_share:g} → {out}"
              + ("" if gate.passed else " (written without --promote-if-better)"))
    else:
        print(f"not promoted: {args.out} is unchanged; the serving artifact {args.init} stays")
    report["written"] = write
    if getattr(args, "json", False):
        print(json.dumps(report))
    return 0 if write else 1


def _train_nmodel(args: argparse.Namespace, rows: list[RoutingRow]) -> int:
    from routers.features import HashedTfidf
    from routers.router import DEFAULT_TOLERANCE, Router
    from routers.scorers import NModelScorer

    pct = eval_percent_of(args.eval_fraction)
    train = [r for r in rows if not is_eval_row(r, pct) and r.source not in args.exclude_source]
    if not train:
        raise ValueError("no training rows left after the eval split and --exclude-source")
    models = sorted({m for r in train for m in r.model_scores})
    for r in train:
        if set(r.model_scores) != set(models):
            raise ValueError(f"row {r.split_key[:60]!r}: model_scores must name the same models on every row "
                             f"({models})")
    texts = [r.prompt for r in train]
    scores = np.asarray([[r.model_scores[m] for m in models] for r in train], dtype=np.float64)
    tfidf = HashedTfidf(n_features=2**18).fit(texts)
    nm = NModelScorer(models, alpha=args.alpha if args.alpha is not None else 3.0).fit(texts, scores, tfidf)
    router = Router(nm, nm.feats, {
        "description": "switchyard N-model router: predicted score per model; cheapest within tolerance",
        "prices": model_prices(args, models),
        "tolerance": DEFAULT_TOLERANCE,
        "training_data": {"file": str(args.data), "num_fit_rows": len(train),
                          "sources": dict(Counter(r.source for r in train)),
                          "split": {"eval_percent": pct}},
    })
    router.save(args.out)
    print(f"trained N-model router ({len(models)} models, alpha {nm.alpha:g}) on {len(train)} rows; "
          f"tolerance {router.tolerance:g} until `switchyard calibrate --max-cost` → {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------


def _eval_rows(rows: list[RoutingRow], meta: dict, all_rows: bool) -> list[RoutingRow]:
    if all_rows:
        return rows
    pct = int(meta.get("training_data", {}).get("split", {}).get("eval_percent", 20))
    held = [r for r in rows if is_eval_row(r, pct)]
    if not held:
        raise ValueError("no rows fall in the eval split; pass --all-rows for data never seen in training")
    return held


def _arrays(rows: list[RoutingRow]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray([r.strong_score for r in rows], dtype=np.float64),
            np.asarray([r.weak_score for r in rows], dtype=np.float64))


def eval_router(args: argparse.Namespace) -> int:
    from routers import artifact
    from routers.router import Router

    _single_thread()
    peers = getattr(args, "peers", False)
    if peers:
        from training.peers import resolve_impl

        args.baselines = True  # the peers are reported beside TF-IDF+LR, fitted on the same rows
        peers_impl = resolve_impl(args.peers_impl)
    elif args.peers_impl != "auto" or args.embedding_cache or args.peers_encoder != "minilm":
        raise ValueError("--peers-impl, --peers-encoder and --embedding-cache are for --peers")
    if args.baseline_data and not (args.baselines and args.all_rows):
        raise ValueError("--baseline-data is for --baselines with --all-rows")
    art = artifact.load(args.model, kind="router")
    if art.meta.get("scorer", {}).get("kind") == "nmodel":
        if peers:
            raise ValueError("--peers compares two-model routers; this artifact is an nmodel router")
        return _eval_nmodel(args, art)
    if getattr(args, "price", None) or getattr(args, "tolerance", None):
        raise ValueError("--price and --tolerance are for an nmodel router")
    router = Router.load(args.model)
    rows = load_routing_rows(args.data, require="pairwise")
    held = _eval_rows(rows, router.meta, args.all_rows)
    if getattr(args, "source", None):
        held = [r for r in held if r.source in args.source]
        if not held:
            raise ValueError(f"no eval rows with source in {args.source}")
    texts = [r.prompt for r in held]
    scores = router.score_batch(texts)
    systems: dict[str, np.ndarray] = {router.kind: scores}
    baseline_fit = None
    peer_info = None
    if args.baselines:
        fit_rows, baseline_fit, cfg = _disjoint_training_rows(args, router.meta, rows, held)
        systems["tfidf_lr"] = fit_router(fit_rows, cfg).score_batch(texts)
        if peers:
            import tempfile

            from training.peers import CachedMiniLM, peer_scores

            with tempfile.TemporaryDirectory(prefix="switchyard-peers-") as work:
                embed = CachedMiniLM(args.embedding_cache, encoder=args.peers_encoder)
                run = peer_scores(fit_rows, texts, embed, peers_impl, Path(work))
            systems.update(run.scores)
            peer_info = dict(run.info, rows="the rows tfidf_lr is fitted on (baseline_fit)")
    sources = sorted(Counter(r.source for r in held))
    report: dict = {"model": str(args.model), "kind": router.kind, "num_eval_rows": len(held),
                    "threshold": router.threshold, "sources": {}}
    if baseline_fit is not None:
        report["baseline_fit"] = baseline_fit
    if peer_info is not None:
        report["peers"] = peer_info
    groups = [(s, [i for i, r in enumerate(held) if r.source == s]) for s in sources]
    if len(sources) > 1:
        groups.append(("all", list(range(len(held)))))
    curves = {}
    for name, idx in groups:
        strong, weak = _arrays([held[i] for i in idx])
        entry = {}
        for sys_name, sc in systems.items():
            m = metrics(sc[idx], strong, weak, threshold=router.threshold if sys_name == router.kind else None)
            entry[sys_name] = m.as_dict()
        entry["random"] = metrics(random_scores(len(idx), seed=0), strong, weak).as_dict()
        entry["oracle"] = metrics(oracle_scores(strong, weak), strong, weak).as_dict()
        report["sources"][name] = entry
        curves[name] = (strong, weak, {k: v[idx] for k, v in systems.items()})
    lat = measure_latency(router.score, texts[: min(len(texts), 1000)])
    report["latency_ms_p50"] = round(lat.p50_ms, 4)
    report["latency_ms_p99"] = round(lat.p99_ms, 4)
    _print_report(report, list(systems))
    if args.plot:
        from training.plots import plot_curves

        plot_curves(curves, args.plot, title=f"{router.kind} router: cost vs quality")
        print(f"plot → {args.plot}")
    if args.json:
        print(json.dumps(_flat_json(report, router.kind)))
    return 0


def _disjoint_training_rows(args: argparse.Namespace, meta: dict, rows: list[RoutingRow],
                            held: list[RoutingRow]) -> tuple[list[RoutingRow], dict, TrainConfig]:
    """The rows the baselines and peers are fitted on, like the router (its split, its excluded sources)
    and disjoint from ``held``: the training split of ``--data``, or with ``--all-rows`` of the router's
    own training data (the file its artifact records, or ``--baseline-data``). Rows sharing an id or a
    prompt with an evaluated row are left out. Returns the rows, what they are (``baseline_fit`` in the
    report) and the TF-IDF+LR config."""
    td = meta.get("training_data", {})
    pct = int(td.get("split", {}).get("eval_percent", 20))
    cfg = TrainConfig(kind="tfidf_lr", eval_fraction=pct / 100,
                      exclude_sources=tuple(td.get("excluded_sources", [])))
    data = args.data
    if args.all_rows:
        data = args.baseline_data or td.get("file")
        if not data:
            raise ValueError("--baselines with --all-rows fits the baseline on the router's training data, but the "
                             "artifact does not record its file: pass --baseline-data FILE")
        if not os.path.isfile(data):
            raise ValueError(f"--baselines with --all-rows fits the baseline on the router's training data "
                             f"{data!r}, which is not found: pass --baseline-data FILE")
        rows = load_routing_rows(data, require="pairwise")
    evaluated = {r.split_key for r in held} | {r.prompt for r in held}
    train = [r for r in rows if not is_eval_row(r, pct) and r.source not in cfg.exclude_sources]
    fit_rows = [r for r in train if r.split_key not in evaluated and r.prompt not in evaluated]
    if not fit_rows:
        raise ValueError(f"--baselines: every training-split row of {data} is among the evaluated rows, so the "
                         "baseline has nothing disjoint to fit on; evaluate rows the router was not trained on")
    fit = {"file": str(data), "rows": f"training split: sha1(id or prompt) mod 100 >= {pct}",
           "num_rows": len(fit_rows), "num_left_out_as_evaluated": len(train) - len(fit_rows),
           "disjoint_from_eval": True}
    return fit_rows, fit, cfg


def _flat_json(report: dict, kind: str) -> dict:
    out = dict(report)
    out["per_source"] = {
        s: {
            "apgr": e[kind]["apgr"], "cpt50": e[kind]["cpt50"], "cpt80": e[kind]["cpt80"],
            "strong_share_at_threshold": e[kind]["strong_share_at_threshold"],
        }
        for s, e in report["sources"].items()
    }
    return out


def _print_report(report: dict, systems: list[str]) -> None:
    print(f"router {report['kind']} on {report['num_eval_rows']} held-out rows; threshold {report['threshold']:.4f}")
    header = f"{'source':<10} {'system':<19} {'n':>6} {'APGR':>7} {'CPT50':>7} {'CPT80':>7} {'share@t':>8}"
    print(header)
    for src, entry in report["sources"].items():
        for name in [*systems, "random", "oracle"]:
            m = entry[name]
            share = m["strong_share_at_threshold"]
            print(f"{src:<10} {name:<19} {m['n']:>6} {m['apgr']:>7.3f} {m['cpt50']:>7.1%} {m['cpt80']:>7.1%} "
                  f"{'' if share is None else format(share, '.1%'):>8}")
    fit = report.get("baseline_fit")
    if fit is not None:
        fitted = "tfidf_lr baseline" + (" and RouteLLM peers" if "peers" in report else "")
        print(f"{fitted} fitted on {fit['num_rows']} rows of {fit['file']} ({fit['rows']}), none of them "
              f"evaluated ({fit['num_left_out_as_evaluated']} left out for sharing an id or prompt)")
    print(f"router latency per query: p50 {report['latency_ms_p50']:.3f} ms, p99 {report['latency_ms_p99']:.3f} ms")


def _eval_nmodel(args: argparse.Namespace, art) -> int:
    """Quality vs cost on held-out rows (``training.cost_quality``): every single model, the zero router
    ("random"), the oracle and the router's tolerance sweep, each with its non-decreasing convex hull and
    AIQ; the router at its artifact's tolerance and at each ``--tolerance``; where its hull stands against
    the best single model."""
    from routers.router import Router
    from routers.scorers import choose_indices
    from training import cost_quality as cq

    router = Router.from_artifact(art)
    models = router.models
    rows = load_routing_rows(args.data, require="models")
    held = _eval_rows(rows, art.meta, args.all_rows)
    if getattr(args, "source", None):
        held = [r for r in held if r.source in args.source]
        if not held:
            raise ValueError(f"no eval rows with source in {args.source}")
    missing = [r.split_key for r in held if not set(models) <= set(r.model_scores)]
    if missing:
        raise ValueError(f"{len(missing)} eval rows lack scores of this router's models {models} "
                         f"(first: {missing[0][:60]!r})")
    given = model_prices(args, models, art.meta.get("prices"))
    if not given:  # no prices anywhere: the listed (name) order, cheapest first
        price_source, given = "rank in name order (no prices given)", {m: float(i + 1) for i, m in enumerate(models)}
    elif set(given) != set(models):
        raise ValueError(f"prices name {sorted(given)} but the router's models are {models}: price every model "
                         "(--price MODEL=USD, USD per 1k requests)")
    else:
        price_source = "--price / artifact"
    prices = np.asarray([given[m] for m in models], dtype=np.float64)
    pred = router.predict_batch([r.prompt for r in held])
    true = np.asarray([[r.model_scores[m] for m in models] for r in held], dtype=np.float64)
    c_min, c_max = float(prices.min()), float(prices.max())

    singles = cq.single_points(true, prices)
    systems = {"router": cq.router_points(pred, true, prices), "oracle": cq.oracle_points(true, prices),
               "random": singles}  # random = RouterBench's zero router: random mixes of single models
    hulls = {name: cq.hull(pts) for name, pts in systems.items()}
    best = int(np.argmax([p.quality for p in singles]))
    b = singles[best]
    rh = hulls["router"]
    match = cq.cost_to_reach(rh, b.quality)
    uniform = cq.point(np.random.default_rng(0).integers(0, len(models), len(held)), true, prices)
    report: dict = {
        "model": str(args.model), "kind": "nmodel", "num_eval_rows": len(held), "models": models,
        "prices_per_1k": given, "price_source": price_source, "cost_range_per_1k": [c_min, c_max],
        "single_models": {m: {"cost_per_1k": round(p.cost, 6), "quality": round(p.quality, 4)}
                          for m, p in zip(models, singles, strict=True)},
        "best_single": models[best],
        "aiq": {name: round(cq.aiq(h, c_min, c_max), 4) for name, h in hulls.items()},
        "hulls": {name: [[round(c, 6), round(q, 4)] for c, q in h] for name, h in hulls.items()},
        "uniform_random": {"cost_per_1k": round(uniform.cost, 6), "quality": round(uniform.quality, 4)},
        "oracle_quality": round(float(true.max(axis=1).mean()), 4),
        "router_vs_best_single": {
            "best_single_cost_per_1k": round(b.cost, 6), "best_single_quality": round(b.quality, 4),
            "router_quality_at_that_cost": round(cq.quality_at(rh, b.cost), 4),
            "router_cost_to_match_its_quality": None if match is None else round(match, 6)},
        "artifact_tolerance": router.tolerance, "tolerances": {},
    }
    tolerances = sorted({0.0, 0.02, 0.05, 0.1, router.tolerance, *(getattr(args, "tolerance", None) or [])})
    for tol in tolerances:
        picks = choose_indices(pred, prices, tol)
        pt = cq.point(picks, true, prices, tol)
        report["tolerances"][f"{tol:g}"] = {
            "quality": round(pt.quality, 4), "cost_per_1k": round(pt.cost, 6),
            "picks": {models[j]: int(n) for j, n in sorted(Counter(picks.tolist()).items())}}
    _print_nmodel_report(report)
    if args.plot:
        from training.plots import plot_cost_quality

        plot_cost_quality(hulls, {m: (p.cost, p.quality) for m, p in zip(models, singles, strict=True)},
                          args.plot, title=f"N-model router on {len(held)} held-out rows")
        print(f"plot → {args.plot}")
    if args.json:
        print(json.dumps(report))
    return 0


def _print_nmodel_report(report: dict) -> None:
    print(f"N-model router on {report['num_eval_rows']} held-out rows; prices (USD per 1k requests): "
          f"{report['price_source']}")
    print(f"{'system':<54} {'cost/1k':>13} {'quality':>8} {'AIQ':>7}")
    for m, e in sorted(report["single_models"].items(), key=lambda kv: (kv[1]["cost_per_1k"], kv[0])):
        print(f"{'always ' + m:<54} {e['cost_per_1k']:>13.4g} {e['quality']:>8.4f}")
    u = report["uniform_random"]
    print(f"{'uniform random model per request':<54} {u['cost_per_1k']:>13.4g} {u['quality']:>8.4f}")
    labels = {"random": "random (zero router: mixes of single models), hull", "router": "router (tolerance sweep), hull",
              "oracle": "oracle (best model per row at each price weight), hull"}
    for name, label in labels.items():
        h = report["hulls"][name]
        span = f"{h[0][0]:.4g}–{h[-1][0]:.4g}"
        print(f"{label:<54} {span:>13} {h[-1][1]:>8.4f} {report['aiq'][name]:>7.4f}")
    for tol, e in report["tolerances"].items():
        mark = "  (artifact)" if tol == f"{report['artifact_tolerance']:g}" else ""
        print(f"{'router, tolerance ' + tol + mark:<54} {e['cost_per_1k']:>13.4g} {e['quality']:>8.4f}")
    v = report["router_vs_best_single"]
    match = v["router_cost_to_match_its_quality"]
    print(f"best single model {report['best_single']}: quality {v['best_single_quality']:.4f} at "
          f"{v['best_single_cost_per_1k']:.4g}; router hull at that cost {v['router_quality_at_that_cost']:.4f}; "
          f"its quality reached at cost {'never' if match is None else format(match, '.4g')}")


# --------------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------------


def calibrate(args: argparse.Namespace) -> int:
    from routers import artifact
    from routers.router import Router

    _single_thread()
    router = Router.load(args.model)
    if router.is_nmodel:
        return _calibrate_nmodel(args, router)
    if getattr(args, "price", None):
        raise ValueError("--price is for an nmodel router; this one has two pools: --slm-price/--llm-price")
    rows = load_routing_rows(args.data)
    held = _eval_rows(rows, router.meta, getattr(args, "all_rows", False))
    cal = [r for r in held if eval_bucket(r.split_key + "#cal") % 2 == 0]
    test = [r for r in held if eval_bucket(r.split_key + "#cal") % 2 == 1]
    if not cal or not test:
        raise ValueError(f"calibration needs at least 2 held-out rows; got {len(held)}")
    cal_scores = router.score_batch([r.prompt for r in cal])
    test_scores = router.score_batch([r.prompt for r in test])
    prices = _prices(args, router.meta.get("prices"))
    max_cost = None
    if args.max_cost is not None:
        if "slm" not in prices or "llm" not in prices:
            raise ValueError("--max-cost needs prices: train with --slm-price/--llm-price or pass them here")
        share = share_for_cost(args.max_cost, prices["slm"], prices["llm"])
        max_cost = float(args.max_cost)
    else:
        share = float(args.strong_share)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"--strong-share must be in [0, 1], got {share}")
    c = calibrate_scores(cal_scores, test_scores, share)
    result = c.as_dict()
    if max_cost is not None:
        result["max_cost_per_1k"] = max_cost
        result["expected_cost_per_1k"] = round(
            (1 - c.realised_share) * prices["slm"] + c.realised_share * prices["llm"], 6)
    calibration = {"rule": "quantile", **result, "share_table": share_table(cal_scores),
                   "data": str(args.data)}
    updates = {"threshold": c.threshold, "calibration": calibration, "prices": prices}
    escalate = getattr(args, "escalate_share", None)
    if escalate is not None:
        rule, realised, n = _fit_cascade(args.data, router.meta, getattr(args, "all_rows", False), escalate)
        updates["cascade"] = {**rule.as_dict(), "target_escalate_share": escalate,
                              "realised_escalate_share": realised, "num_rows": n}
        result["cascade"] = updates["cascade"]
        print(f"cascade: escalate when mean logprob < {rule.min_mean_logprob:.4f} or a token < "
              f"{rule.min_token_logprob:.4f}; escalates {realised:.4f} of {n} held-out SLM answers")
    artifact.update_meta(args.model, **updates)
    print(f"threshold {c.threshold:.6f} for strong share {share:.4f} (set on {c.num_calibration_rows} rows); "
          f"realised share on {c.num_heldout_rows} held-out rows: {c.realised_share:.4f}")
    if max_cost is not None:
        print(f"expected cost {result['expected_cost_per_1k']:.4f} USD per 1k requests (budget {max_cost:g})")
    if args.json:
        print(json.dumps(result))
    return 0


def _calibrate_nmodel(args: argparse.Namespace, router: Router) -> int:
    """The quality tolerance for ``--max-cost`` (USD per 1k requests at the artifact's / ``--price`` prices):
    set on the even id-hash buckets of the eval split, measured on the odd ones (prompts only)."""
    from routers import artifact
    from training.calibrate import tolerance_for_cost

    if args.max_cost is None:
        raise ValueError("an nmodel router is calibrated to a cost budget: --max-cost USD_PER_1K_REQUESTS")
    if getattr(args, "escalate_share", None) is not None:
        raise ValueError("--escalate-share calibrates the two-pool cascade; an nmodel router has none")
    models = router.models
    prices = model_prices(args, models, router.meta.get("prices"))
    if set(prices) != set(models):
        raise ValueError(f"--max-cost needs a price for every model; missing {sorted(set(models) - set(prices))} "
                         "(--price MODEL=USD, USD per 1k requests, here or at train time)")
    rows = load_routing_rows(args.data)
    held = _eval_rows(rows, router.meta, getattr(args, "all_rows", False))
    cal = [r for r in held if eval_bucket(r.split_key + "#cal") % 2 == 0]
    test = [r for r in held if eval_bucket(r.split_key + "#cal") % 2 == 1]
    if not cal or not test:
        raise ValueError(f"calibration needs at least 2 held-out rows; got {len(held)}")
    c = tolerance_for_cost(router.predict_batch([r.prompt for r in cal]),
                           router.predict_batch([r.prompt for r in test]),
                           np.asarray([prices[m] for m in models], dtype=np.float64), float(args.max_cost))
    result = c.as_dict()
    calibration = {"rule": "cost_budget", **result, "data": str(args.data)}
    artifact.update_meta(args.model, tolerance=c.tolerance, calibration=calibration, prices=prices)
    print(f"tolerance {c.tolerance:.6g} for at most {c.max_cost_per_1k:g} USD per 1k requests: expected "
          f"{c.expected_cost_per_1k:.6g} on the {c.num_calibration_rows} rows that set it, "
          f"{c.realised_cost_per_1k:.6g} on {c.num_heldout_rows} held-out rows")
    if args.json:
        print(json.dumps(result))
    return 0


def _fit_cascade(data: str, meta: dict, all_rows: bool, escalate_share: float):
    """Cascade thresholds from labelled rows carrying ``slm_mean_logprob``/``slm_min_logprob`` (from
    ``switchyard label``): set on even id-hash buckets of the eval split, measured on odd ones."""
    from gateway.cascade import Confidence
    from training.calibrate import escalation_share, fit_cascade_rule
    from training.data import read_records

    pct = int(meta.get("training_data", {}).get("split", {}).get("eval_percent", 20))
    cal, test = [], []
    for where, obj in read_records(data):
        if not isinstance(obj, dict) or "slm_mean_logprob" not in obj:
            continue
        mean, low = obj.get("slm_mean_logprob"), obj.get("slm_min_logprob", obj.get("slm_mean_logprob"))
        if not isinstance(mean, int | float) or not isinstance(low, int | float):
            raise ValueError(f"{where}: slm_mean_logprob / slm_min_logprob must be numbers")
        key = str(obj.get("id") if obj.get("id") is not None else obj.get("prompt", ""))
        if not all_rows and eval_bucket(key) >= pct:
            continue
        conf = Confidence(float(mean), float(low), 1)
        (cal if eval_bucket(key + "#cal") % 2 == 0 else test).append(conf)
    if not cal:
        raise ValueError(f"{data}: --escalate-share needs held-out rows with slm_mean_logprob "
                         "(produce them with `switchyard label`)")
    rule = fit_cascade_rule(cal, escalate_share)
    held = test or cal
    return rule, escalation_share(rule, held), len(held)
