"""Versioned artifact folders for guard and router models.

Layout of an artifact folder::

    manifest.json   {"schema_version", "kind", "created", "switchyard_version", "meta": {...}}
    arrays.npz      named numpy arrays (weights, centroids, ...), loaded without pickle
    MODEL_CARD.md   human-readable summary written from ``meta`` (training data, metrics, thresholds)
    <name>          files the model ships as they are (an exported ONNX encoder graph, its tokenizer),
                    each listed with its sha256 under the manifest's ``"files"``

``meta`` is free-form JSON owned by the model kind (featurizer spec, thresholds, label set, training
data summary, metrics). ``load`` checks ``schema_version``, ``kind`` and every shipped file's sha256 and
raises ``ArtifactError`` with a message that says what to do (retrain or upgrade) — never a KeyError deep
inside a model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
CARD = "MODEL_CARD.md"


class ArtifactError(ValueError):
    """The folder is not a loadable artifact of the expected kind and schema."""


@dataclass
class Artifact:
    kind: str  # "guard" | "router" | ...
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    files: dict[str, Path] = field(default_factory=dict)  # name in the folder → where its bytes are now

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp folder + rename); an existing artifact at ``path`` is replaced."""
        out = Path(path)
        tmp = out.with_name(out.name + ".tmp-save")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from importlib.metadata import PackageNotFoundError, version

        try:
            switchyard_version = version("switchyard")
        except PackageNotFoundError:  # a source tree that was never installed
            switchyard_version = "unknown"
        manifest = {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "switchyard_version": switchyard_version,
            "meta": self.meta,
        }
        if self.files:
            manifest["files"] = {}
            for name, src in sorted(self.files.items()):
                assert "/" not in name and name not in (MANIFEST, ARRAYS, CARD), f"bad artifact file name {name!r}"
                shutil.copyfile(src, tmp / name)
                manifest["files"][name] = sha256_file(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default))
        np.savez(tmp / ARRAYS, **self.arrays)
        (tmp / CARD).write_text(model_card(self))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        self.files = {name: out / name for name in self.files}
        return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load(path: str | Path, kind: str | None = None) -> Artifact:
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {str(folder)!r} does not exist")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{str(folder)!r} is not a switchyard artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e.msg} at line {e.lineno})") from None
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{mpath}: missing schema_version")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact {str(folder)!r} has schema v{version}, newer than this switchyard (v{SCHEMA_VERSION}); "
            "upgrade switchyard to load it"
        )
    if version < SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact {str(folder)!r} has schema v{version}, older than this switchyard (v{SCHEMA_VERSION}); "
            "retrain it with `switchyard train ...`"
        )
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"artifact {str(folder)!r} is a {manifest.get('kind')!r} artifact, expected {kind!r}")
    arrays: dict[str, np.ndarray] = {}
    apath = folder / ARRAYS
    if apath.is_file():
        try:
            with np.load(apath, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise ArtifactError(f"{apath}: corrupt arrays file ({e})") from None
    files = {}
    for name, sha in (manifest.get("files") or {}).items():
        fpath = folder / name
        if not fpath.is_file():
            raise ArtifactError(f"artifact {str(folder)!r} is missing its file {name!r}; copy the whole folder")
        if sha256_file(fpath) != sha:
            raise ArtifactError(f"{fpath}: sha256 differs from the manifest's (corrupt or replaced file)")
        files[name] = fpath
    return Artifact(kind=manifest["kind"], meta=manifest.get("meta", {}), arrays=arrays, schema_version=version,
                    files=files)


def update_meta(path: str | Path, **updates: Any) -> Artifact:
    """Load, merge ``updates`` into meta (top-level keys), save in place. Used by calibration."""
    art = load(path)
    art.meta.update(updates)
    art.save(path)
    return art


def model_card(art: Artifact) -> str:
    lines = [f"# switchyard {art.kind} artifact", "", f"schema v{art.schema_version}", ""]
    for key in ("description", "labels", "featurizer", "thresholds", "training_data", "metrics", "calibration"):
        if key in art.meta:
            lines += [f"## {key}", "", "```json", json.dumps(art.meta[key], indent=2, default=_json_default),
                      "```", ""]
    if art.files:
        lines += ["## files", ""] + [f"- `{name}`" for name in sorted(art.files)] + [""]
    lines += ["## arrays", ""] + [f"- `{k}`: {v.dtype} {tuple(v.shape)}" for k, v in sorted(art.arrays.items())]
    return "\n".join(lines) + "\n"
