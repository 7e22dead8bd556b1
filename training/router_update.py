"""Updating a serving router with labelled traffic, and the gate that decides whether the update serves.

``switchyard train router --init ARTIFACT --data NEW_ROWS`` refits: the init artifact's kind, split rule,
seed and price/cascade settings, fitted from scratch on the init artifact's own training rows (the files its
``meta.training_data.files`` records, or ``--init-data``) plus the training split of the new rows. No kind
is warm-started (the TF-IDF vocabulary statistics, per-source heads and Platt mapping all depend on the
whole row set, and a refit of a linear TF-IDF kind on ~15k rows takes seconds to minutes on one CPU).

The new rows are split by the init artifact's own rule (``sha1(id or prompt) mod 100 < eval_percent``):
the eval-split rows are never trained on and are the held-out slice of the logged traffic on which
``promotion_gate`` compares the candidate with the serving artifact (APGR: the comparison does not depend
on either threshold). The candidate passes when its APGR is at least the serving one's minus
``tolerance``; with no held-out rows, or held-out rows whose strong and weak mean scores are equal (no gap
to recover: APGR is undefined), it does not pass, and says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data import RoutingRow, is_eval_row, load_routing_rows

if TYPE_CHECKING:
    from routers.router import Router


@dataclass(frozen=True)
class TrainingFile:
    """One file whose training-split rows trained an artifact, and the sources left out of it."""

    path: str
    excluded_sources: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "excluded_sources": list(self.excluded_sources)}


def training_files(meta: dict[str, Any]) -> list[TrainingFile]:
    """The files an artifact was trained on: ``training_data.files`` (updated artifacts), else the single
    ``training_data.file`` with ``training_data.excluded_sources``; [] when it records none."""
    td = meta.get("training_data") or {}
    if td.get("files"):
        return [TrainingFile(f["path"], tuple(f.get("excluded_sources") or ())) for f in td["files"]]
    if td.get("file"):
        return [TrainingFile(str(td["file"]), tuple(td.get("excluded_sources") or ()))]
    return []


def load_training_files(files: list[TrainingFile]) -> list[RoutingRow]:
    """Every row of ``files`` minus each file's excluded sources (the split is applied by the fit)."""
    rows: list[RoutingRow] = []
    for f in files:
        if not os.path.isfile(f.path):
            raise ValueError(f"--init: the artifact's training data {f.path!r} is not found; pass --init-data FILE")
        rows += [r for r in load_routing_rows(f.path, require="pairwise") if r.source not in f.excluded_sources]
    return rows


@dataclass(frozen=True)
class Gate:
    """The promotion decision: ``passed`` and why, with both APGRs on the held-out rows."""

    passed: bool
    reason: str
    num_rows: int
    serving_apgr: float | None = None
    candidate_apgr: float | None = None
    tolerance: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def held_out_rows(rows: list[RoutingRow], eval_percent: int) -> list[RoutingRow]:
    return [r for r in rows if is_eval_row(r, eval_percent)]


def gate_precheck(held: list[RoutingRow], tolerance: float = 0.0) -> Gate | None:
    """The gate's verdict when ``held`` cannot support a comparison (no rows, or no gap to recover); None
    when it can. Checked before any fitting: a refit that could never be promoted is not run."""
    if tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {tolerance}")
    if not held:
        return Gate(False, "no held-out rows in the new data (its eval split by id hash is empty): label more "
                           "traffic", 0, tolerance=tolerance)
    strong = np.asarray([r.strong_score for r in held], dtype=np.float64)
    weak = np.asarray([r.weak_score for r in held], dtype=np.float64)
    if strong.mean() == weak.mean():
        return Gate(False, f"the {len(held)} held-out rows have equal strong and weak mean scores: no gap for a "
                           "router to recover, so no comparison", len(held), tolerance=tolerance)
    return None


def promotion_gate(serving: Router, candidate: Router, held: list[RoutingRow], tolerance: float = 0.0) -> Gate:
    """Is ``candidate`` no worse than ``serving`` (APGR, within ``tolerance``) on ``held``?"""
    from training.evaluate import metrics

    early = gate_precheck(held, tolerance)
    if early is not None:
        return early
    strong = np.asarray([r.strong_score for r in held], dtype=np.float64)
    weak = np.asarray([r.weak_score for r in held], dtype=np.float64)
    texts = [r.prompt for r in held]
    old = metrics(serving.score_batch(texts), strong, weak).apgr
    new = metrics(candidate.score_batch(texts), strong, weak).apgr
    passed = new >= old - tolerance
    cmp = ">=" if passed else "<"
    margin = f" - tolerance {tolerance:g}" if tolerance else ""
    return Gate(passed, f"candidate APGR {new:.4f} {cmp} serving {old:.4f}{margin} on {len(held)} held-out rows "
                        "of the new data", len(held), old, new, tolerance)
