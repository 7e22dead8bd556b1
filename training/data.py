"""Routing and labelling data: loaders (JSONL / CSV / parquet) and the deterministic train/eval split.

Row formats (DESIGN.md):

- pairwise: ``{"prompt", "strong_score", "weak_score"}`` + optional ``source``, ``id``;
- N models: ``{"prompt", "model_scores": {name: score}}`` + optional ``source``, ``id``;
- both: a row may carry the pairwise scores and ``model_scores``; pairwise commands (the SLM/LLM router)
  read ``strong_score``/``weak_score``, N-model commands read ``model_scores``.

Every malformed row raises ``ValueError("FILE:LINE: what is wrong")`` — one line, naming the row.

The split is part of the contract: a row belongs to the eval split when ``sha1(key) mod 100 <
eval_percent``, where ``key`` is the row's ``id`` or, with no id, its prompt. Training and evaluation
commands use the same rule, so evaluation never sees a training row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RoutingRow:
    """One prompt with the scores of the models that answered it (scores in [0, 1], higher = better)."""

    prompt: str
    source: str
    row_id: str | None
    strong_score: float | None = None
    weak_score: float | None = None
    model_scores: dict[str, float] = field(default_factory=dict)

    @property
    def split_key(self) -> str:
        return self.row_id if self.row_id is not None else self.prompt

    @property
    def is_pairwise(self) -> bool:
        return self.strong_score is not None and self.weak_score is not None

    @property
    def weak_good_enough(self) -> bool:
        """The label the binary router learns: the weak answer scores at least as well as the strong one."""
        assert self.is_pairwise, "weak_good_enough needs strong_score and weak_score"
        return self.weak_score >= self.strong_score  # type: ignore[operator]


def eval_bucket(key: str) -> int:
    """Stable bucket 0..99 of a split key (sha1, independent of Python's hash seed)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 100


def is_eval_row(row: RoutingRow, eval_percent: int) -> bool:
    return eval_bucket(row.split_key) < eval_percent


def eval_percent_of(fraction: float) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    return int(round(fraction * 100))


def split_rows(rows: list[RoutingRow], eval_fraction: float = 0.2) -> tuple[list[RoutingRow], list[RoutingRow]]:
    """(train, eval) by the id-hash rule; order within each part is the input order."""
    pct = eval_percent_of(eval_fraction)
    train = [r for r in rows if not is_eval_row(r, pct)]
    held = [r for r in rows if is_eval_row(r, pct)]
    return train, held


def _score(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: {key!r} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{where}: {key!r} must be a number in [0, 1], got {value!r}")
    return v


def parse_routing_row(obj: Any, where: str) -> RoutingRow:
    """Validate one decoded row. ``where`` is ``FILE:LINE`` for the error message."""
    prompt = record_prompt(obj, where)
    source = obj.get("source") or "default"
    if not isinstance(source, str):
        raise ValueError(f"{where}: 'source' must be a string, got {source!r}")
    row_id = obj.get("id")
    if row_id is not None:
        row_id = str(row_id)
    model_scores: dict[str, float] = {}
    if obj.get("model_scores") is not None:
        ms = obj["model_scores"]
        if not isinstance(ms, dict) or not ms:
            raise ValueError(f"{where}: 'model_scores' must be a non-empty object {{model: score}}")
        model_scores = {str(k): _score(v, where, f"model_scores.{k}") for k, v in ms.items()}
        if "strong_score" not in obj and "weak_score" not in obj:
            return RoutingRow(prompt=prompt, source=source, row_id=row_id, model_scores=model_scores)
    missing = [k for k in ("strong_score", "weak_score") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(repr(m) for m in missing)} (or give 'model_scores')")
    return RoutingRow(
        prompt=prompt,
        source=source,
        row_id=row_id,
        strong_score=_score(obj["strong_score"], where, "strong_score"),
        weak_score=_score(obj["weak_score"], where, "weak_score"),
        model_scores=model_scores,
    )


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """Raw records as ``(FILE:LINE, object)`` from .jsonl/.json lines, .csv or .parquet."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            out = []
            for i, rec in enumerate(csv.DictReader(f), start=2):
                out.append((f"{p}:{i}", {k: _csv_value(k, v) for k, v in rec.items() if k is not None}))
            return out
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional; only for parquet input
        except ImportError:
            raise ValueError(f"{p}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(p).to_pylist()
        return [(f"{p}:row{i}", rec) for i, rec in enumerate(table)]
    out = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{p}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def _csv_value(key: str, value: str | None) -> Any:
    if value is None:
        return None
    if key in ("strong_score", "weak_score"):
        try:
            return float(value)
        except ValueError:
            return value
    if key == "model_scores":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def load_routing_rows(path: str | Path, *, require: str | None = None) -> list[RoutingRow]:
    """All rows of a routing file. ``require``: ``"pairwise"`` or ``"models"`` rejects the other format."""
    rows = []
    for where, obj in read_records(path):
        row = parse_routing_row(obj, where)
        if require == "pairwise" and not row.is_pairwise:
            raise ValueError(f"{where}: this command needs 'strong_score' and 'weak_score'")
        if require == "models" and not row.model_scores:
            raise ValueError(f"{where}: this command needs 'model_scores'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@dataclass(frozen=True)
class PromptRow:
    """Input of ``switchyard label``: a prompt and, when known, its reference answer."""

    prompt: str
    row_id: str | None
    source: str
    answer: str | None


def record_prompt(obj: Any, where: str, hint: str = "") -> str:
    """The non-empty ``prompt`` of one decoded record; ValueError naming ``where`` (and ``hint``) otherwise."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: missing or empty 'prompt'{hint}")
    return prompt


def load_prompt_rows(path: str | Path) -> list[PromptRow]:
    out = []
    for where, obj in read_records(path):
        prompt = record_prompt(obj, where)
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, str | int | float):
            raise ValueError(f"{where}: 'answer' must be a string or number, got {type(answer).__name__}")
        row_id = obj.get("id")
        out.append(
            PromptRow(
                prompt=prompt,
                row_id=None if row_id is None else str(row_id),
                source=str(obj.get("source") or "default"),
                answer=None if answer is None else str(answer),
            )
        )
    if not out:
        raise ValueError(f"{path}: no rows")
    return out
