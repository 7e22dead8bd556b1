"""The package's public face: ``build_example_store``, the public names, and imports without a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import gateway.example_cache as ec
from gateway.example_cache import ExampleStore, InMemoryExampleStore, RedisExampleStore, build_example_store
from gateway.settings import settings_from_dict
from tests.gateway.fakes import cache_settings

PACKAGE = Path(ec.__file__).parent


def test_build_example_store():
    base = {"pools": [{"name": "slm", "model": "m"}, {"name": "llm", "model": "m"}]}
    assert isinstance(build_example_store(settings_from_dict(base)), InMemoryExampleStore)
    off = settings_from_dict({**base, "example_cache": {"enabled": False}})
    assert build_example_store(off) is None
    red = settings_from_dict({**base, "redis_url": "redis://127.0.0.1:1/0", "example_cache": {"backend": "redis"}})
    store = build_example_store(red)
    assert isinstance(store, RedisExampleStore) and isinstance(store, ExampleStore)
    with pytest.raises(ValueError):
        RedisExampleStore("http://nope", cache_settings())


def test_public_names_resolve():
    assert all(getattr(ec, name) is not None for name in ec.__all__)


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports, at any depth of the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gateway.example_cache."):
            found.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "gateway.example_cache":
            found.add("__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("gateway.example_cache.")}
    return found


def test_modules_import_without_a_cycle():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    assert all("__init__" not in deps for name, deps in graph.items() if name != "__init__"), graph
    order: list[str] = []
    while len(order) < len(graph):
        ready = sorted(n for n, deps in graph.items() if n not in order and deps <= set(order))
        assert ready, f"import cycle among {sorted(set(graph) - set(order))}: {graph}"
        order.extend(ready)


def test_nothing_serving_imports_training():
    root = PACKAGE.parents[1]
    importing = re.compile(r"^\s*(from|import)\s+training\b", re.M)
    offenders = [str(path.relative_to(root)) for folder in ("gateway", "backends")
                 for path in (root / folder).rglob("*.py") if importing.search(path.read_text())]
    assert offenders == []
