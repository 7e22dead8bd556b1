"""Guard data files: JSONL (or CSV) rows ``{"text", "label"}`` with an optional ``source``.

Every problem with a file is a ``ValueError`` whose message starts with ``file:line`` and fits on one line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GuardRow:
    text: str
    label: str
    source: str


def load_guard_rows(path: str | Path, allowed_labels: set[str] | None = None,
                    default_label: str | None = None) -> list[GuardRow]:
    """Read a guard file. ``default_label`` fills a missing ``label`` (e.g. ``"ood"`` for OOD files);
    ``allowed_labels`` rejects any other label with the offending line. Empty files are an error."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: file not found")
    rows: list[GuardRow] = []
    for lineno, rec in _records(p):
        where = f"{p}:{lineno}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        text = rec.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: missing or non-string 'text' column")
        label = rec.get("label", default_label)
        if label is None or label == "":
            raise ValueError(f"{where}: missing 'label' column")
        label = str(label)
        if allowed_labels is not None and label not in allowed_labels:
            raise ValueError(f"{where}: unknown label {label!r} (known: {', '.join(sorted(allowed_labels))})")
        rows.append(GuardRow(text=text, label=label, source=str(rec.get("source") or label)))
    if not rows:
        raise ValueError(f"{p}: empty file (no rows)")
    return rows


def _records(p: Path):
    if p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise ValueError(f"{p}:1: missing 'text' column in the CSV header")
            for i, rec in enumerate(reader, start=2):
                yield i, rec
        return
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: bad JSON ({e.msg})") from None
