"""Handlers for `switchyard models|keys|config ...` (small admin commands)."""

from __future__ import annotations

import argparse
import sys
import time


def list_cmd(args: argparse.Namespace) -> int:
    from backends.models import list_models

    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['status']:<14}  {r['description']}")
        print(f"{'':<{width}}  {'':<14}  {r['path']}")
    return 0


def prepare_cmd(args: argparse.Namespace) -> int:
    from backends.models import CATALOG, prepare

    names = args.names or list(CATALOG)
    for name in names:
        if name not in CATALOG:
            raise ValueError(f"unknown bundled model {name!r}; bundled: {', '.join(CATALOG)}")
    for name in names:
        t0 = time.perf_counter()
        path = prepare(name, force=args.force, verify=args.verify)
        if name == "minilm":  # the example cache's encoder: serving reads this graph, never exports one
            from routers.embeddings import MiniLMEmbedder

            path = MiniLMEmbedder(path).prepare(force=args.force).graph_file()
        print(f"{name}: ready at {path} ({time.perf_counter() - t0:.1f}s)")
    return 0


def add_encoder_cmd(args: argparse.Namespace) -> int:
    """Ship the MiniLM graph an artifact written before artifacts carried theirs uses: export the graph its
    recorded encoder options name (torch, on this host) and add it, with its tokenizer, to the folder."""
    from routers.artifact import load
    from routers.embeddings import MiniLMEmbedder, encoder_files
    from routers.router import DEFAULT_ENCODER, Router

    art = load(args.path)
    specs: dict[str, dict] = {}  # file prefix → encoder options
    if art.kind == "guard":
        for name, mmeta in art.meta.get("members", {}).items():
            if mmeta.get("embedder") == "minilm":
                specs[f"{name}."] = {**mmeta, "graph": mmeta.get("graph", "hf")}  # before "graph": the HF one
    elif art.kind == "router" and (art.meta.get("scorer") or {}).get("kind") != "nmodel":
        if Router.from_artifact(art).scorer.uses_embeddings:
            art.meta["encoder"] = art.meta.get("encoder") or dict(DEFAULT_ENCODER)
            specs["encoder."] = art.meta["encoder"]
    if not specs:
        print(f"{args.path}: uses no MiniLM encoder; unchanged")
        return 0
    for prefix, spec in specs.items():
        embedder = MiniLMEmbedder(max_length=int(spec.get("max_length", 256)), num_layers=spec.get("num_layers"),
                                  int8=bool(spec.get("int8")), graph=spec["graph"]).prepare()
        art.files.update(encoder_files(embedder, prefix))
    art.save(args.path)
    print(f"{args.path}: added {', '.join(sorted(art.files))}")
    return 0


def hash_key_cmd(args: argparse.Namespace) -> int:
    from gateway.settings import hash_api_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        raise ValueError("empty key")
    print(hash_api_key(key))
    return 0


def config_check_cmd(args: argparse.Namespace) -> int:
    from gateway.settings import load_settings

    settings = load_settings(args.config)
    print(f"ok: {len(settings.pools)} pools ({', '.join(p.name for p in settings.pools)})")
    return 0


def config_default_cmd(args: argparse.Namespace) -> int:
    from gateway.settings import default_config_text

    print(default_config_text(), end="")
    return 0
