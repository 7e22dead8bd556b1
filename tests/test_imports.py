"""The import graph points down (DESIGN.md): an ast walk over every .py file of the packages.

  * ``backends/engine/`` is self-contained: it imports the standard library, torch, transformers, triton,
    numpy, xgrammar (constrained decoding), safetensors (the weight files, a transformers dependency) and itself — never ``gateway``,
    ``routers``, ``training`` or another ``backends`` module;
  * nothing in ``gateway/``, ``routers/`` or ``backends/`` imports ``training`` (the offline CLI);
  * no import points up: ``backends`` and ``routers`` never import ``gateway``; ``backends`` never imports
    ``routers``.

Every import counts, also one inside a function (imported lazily is still a dependency).
"""

from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "routers", "backends", "training")
ENGINE = "backends.engine"
ENGINE_THIRD_PARTY = frozenset({"torch", "transformers", "triton", "numpy", "safetensors", "xgrammar"})

# Known offenders (each one a (file, imported module) pair); none left since issue 18. The list only
# shrinks: an entry that no longer occurs is reported (a warning) so it can be deleted.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` gives x and x.y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "__future__":
                continue
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations() -> list[tuple[str, str, str]]:
    """(file, imported module, rule) for every import that breaks a rule above."""
    found: list[tuple[str, str, str]] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            me = _module_name(path)
            for name in imports_of(path):
                top = name.split(".")[0]
                if _is_under(me, ENGINE):
                    is_own = _is_under(name, ENGINE)
                    if top in PACKAGES and not is_own:
                        found.append((rel, name, "backends/engine imports only itself among the packages"))
                    elif top not in PACKAGES and top not in sys.stdlib_module_names and top not in ENGINE_THIRD_PARTY:
                        found.append((rel, name, "backends/engine imports torch, transformers, triton, numpy, xgrammar "
                                                 "and the standard library only"))
                if top == "training" and not _is_under(me, "training"):
                    found.append((rel, name, "nothing imports training/"))
                if top == "gateway" and (_is_under(me, "backends") or _is_under(me, "routers")):
                    found.append((rel, name, "imports point down: backends/routers never import gateway"))
                if top == "routers" and _is_under(me, "backends"):
                    found.append((rel, name, "imports point down: backends never import routers"))
    return found


def test_imports_point_down_and_the_engine_is_self_contained():
    found = violations()
    bad = sorted({(f, m, why) for f, m, why in found
                  if (f, m) not in ALLOWED and not any(f == af and _is_under(m, am) for af, am in ALLOWED)})
    assert not bad, "imports against the layering (DESIGN.md):\n" + "\n".join(
        f"  {f}: {m} ({why})" for f, m, why in bad)
    stale = sorted(entry for entry in ALLOWED if not any(f == entry[0] and _is_under(m, entry[1])
                                                         for f, m, _ in found))
    if stale:
        warnings.warn(f"ALLOWED import exceptions that no longer occur (delete them): {stale}", stacklevel=1)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function and a relative import are both found."""
    pkg = tmp_path / "backends" / "engine"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from gateway.settings import Settings\nfrom ..local import x\n"
                                "import requests\nfrom . import args\n")
    for package in ("gateway", "routers", "training"):
        (tmp_path / package).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = {(m, why.split(":")[0]) for f, m, why in violations() if f == "backends/engine/bad.py"}
    modules = {m for m, _ in found}
    assert {"gateway.settings", "backends.local", "requests"} <= modules
    assert "backends.engine" not in modules and "backends.engine.args" not in modules
