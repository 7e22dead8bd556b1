"""What the guard says: ``GuardVerdict`` for one request, ``GuardBatch`` for many (evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

OOD = "ood"
UNSAFE = "unsafe"
RESERVED_LABELS = (OOD, UNSAFE)  # classifier classes that are verdicts of their own, not domains


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard says about one request.

    ``label``: ``"domain"`` (then ``domain`` names which), ``"ood"`` or ``"unsafe"`` (``domain`` is None).
    ``confidence``: in [0, 1], the guard's confidence in ``label`` (class probability for domain/unsafe;
    for ood, how far below the in-domain threshold the text fell). ``scores``: class probabilities plus
    ``id_percentile`` (in-domain evidence, 0..1), and ``early_exit`` = 1 when the verdict came before every
    member ran — for logs and metrics, not a stable schema.
    """

    label: Literal["domain", "ood", "unsafe"]
    domain: str | None
    confidence: float
    scores: dict[str, float]


@dataclass
class GuardBatch:
    """Batched raw outputs, for evaluation: class probabilities, in-domain percentile, verdict labels."""

    probs: np.ndarray  # [n, C] over Guard.classes
    id_percentile: np.ndarray  # [n]
    labels: list[str]  # per row: a domain name, "ood" or "unsafe"
