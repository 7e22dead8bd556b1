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
        print(f"{name}: ready at {path} ({time.perf_counter() - t0:.1f}s)")
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
