"""The OOD rule: dev-calibrated evidence percentiles combined with Fisher's method, and the ensemble's
early accept on widemlp's evidence alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class OODRule:
    """Dev-calibrated in-domain percentile, combining components with Fisher's method.

    Each component score ``s`` becomes ``p = (rank of s among the sorted dev scores + 0.5) / (n_dev + 1)``
    (its in-domain p-value); the combination is ``sum(log p)`` over components, and ``percentile`` is the
    share of dev rows whose combination is lower — so a text with ``percentile < threshold_for(r)`` is
    rejected and exactly ``r`` of the dev rows (up to ties) are kept.

    Per-class variant (``class_combined`` set): the percentile is taken among the dev rows the classifier
    assigns to the same domain as the text, so every domain keeps (at most, up to one row) ``r`` of its
    dev rows — a domain whose rows carry weaker evidence is not rejected more often than the others.
    """

    dev_scores: dict[str, np.ndarray]  # component → sorted dev scores
    dev_combined: np.ndarray  # sorted Fisher combinations of the dev rows
    id_recall: float
    threshold: float = 0.0
    class_combined: list[np.ndarray] | None = None  # per domain index: sorted combinations of its dev rows
    ood_reject: float = 0.0  # > 0: the threshold was anchored on OOD rows (``calibrate``)
    ood_combined: np.ndarray | None = None  # sorted Fisher combinations of those OOD rows
    ood_examples: np.ndarray | None = None  # Fisher combinations of OOD examples added later (``add_ood``)

    @classmethod
    def calibrate(cls, dev_components: dict[str, np.ndarray], id_recall: float,
                  dev_pred: np.ndarray | None = None, num_domains: int = 0,
                  ood_components: dict[str, np.ndarray] | None = None, ood_reject: float = 0.0) -> OODRule:
        """``dev_pred`` (predicted domain index per dev row) + ``num_domains`` make a per-class rule.

        OOD anchor (``ood_components`` of OOD calibration rows, ``ood_reject`` > 0): the threshold is the
        lowest percentile that still rejects ``ood_reject`` of those rows, unless that is above the dev
        threshold — so ``id_recall`` of the dev rows is a floor on what is kept, and where the OOD text sits
        far below the dev rows the threshold drops to just above it, keeping in-domain text of a style the
        dev rows lack (whose evidence is weaker than theirs, but stronger than the OOD text's)."""
        if not 0.0 < id_recall <= 1.0:
            raise ValueError(f"id_recall must be in (0, 1], got {id_recall}")
        sorted_scores = {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in dev_components.items()}
        rule = cls(dev_scores=sorted_scores, dev_combined=np.zeros(0), id_recall=id_recall)
        combined = rule.fisher(dev_components)
        rule.dev_combined = np.sort(combined)
        if dev_pred is not None:
            dev_pred = np.asarray(dev_pred)
            rule.class_combined = [np.sort(combined[dev_pred == c]) for c in range(num_domains)]
        rule.threshold = rule.threshold_for(id_recall)
        if ood_components is not None and ood_reject > 0:
            if not 0.0 < ood_reject <= 1.0:
                raise ValueError(f"ood_reject must be in (0, 1], got {ood_reject}")
            combined = rule.fisher(ood_components)
            if not len(combined):
                raise ValueError("the OOD anchor needs at least one OOD calibration row")
            rule.ood_reject, rule.ood_combined = ood_reject, np.sort(combined)
            rule.threshold = rule.anchored_threshold()
        return rule

    def anchored_threshold(self) -> float:
        """The OOD-anchored threshold: just above the OOD calibration row at rank ``ood_reject`` (so that
        share of them is rejected) and above every added OOD example, or the dev threshold of ``id_recall``
        when that is lower."""
        floor = self.threshold_for(self.id_recall)
        if self.ood_combined is None or not len(self.ood_combined) or self.ood_reject <= 0:
            return floor
        pct = np.sort(self._global_percentile(self.ood_combined))
        j = max(0, math.ceil(self.ood_reject * len(pct) - 1e-9) - 1)
        anchor = float(pct[j]) + 1e-9
        if self.ood_examples is not None and len(self.ood_examples):
            anchor = max(anchor, float(self._global_percentile(self.ood_examples).max()) + 1e-9)
        return min(floor, anchor)

    def add_ood(self, components: dict[str, np.ndarray]) -> None:
        """OOD examples added after training (``Guard.add_examples``): the threshold rises until every one of
        them is rejected, but never above the dev threshold of ``id_recall`` (an example more in-domain than
        that stays accepted). A rule without an OOD anchor already sits at that threshold: unchanged."""
        new = self.fisher(components)
        old = self.ood_examples if self.ood_examples is not None else np.zeros(0)
        self.ood_examples = np.concatenate([old, new])
        self.threshold = self.anchored_threshold()

    def _global_percentile(self, combined: np.ndarray) -> np.ndarray:
        """The percentile of Fisher combinations among every dev row (the anchor is one threshold for all
        domains; a per-class rule compares it with per-domain percentiles)."""
        return np.searchsorted(self.dev_combined, combined, side="left") / len(self.dev_combined)

    def fisher(self, components: dict[str, np.ndarray]) -> np.ndarray:
        total = None
        for name, ref in self.dev_scores.items():
            rank = np.searchsorted(ref, np.asarray(components[name], dtype=np.float64), side="left")
            logp = np.log((rank + 0.5) / (len(ref) + 1.0))
            total = logp if total is None else total + logp
        return total

    def percentile(self, components: dict[str, np.ndarray], pred: np.ndarray | None = None) -> np.ndarray:
        """In-domain percentile per row; ``pred`` (predicted domain index per row) is required by a
        per-class rule and ignored otherwise."""
        combined = self.fisher(components)
        if self.class_combined is None:
            return np.searchsorted(self.dev_combined, combined, side="left") / len(self.dev_combined)
        if pred is None:
            raise ValueError("a per-class OOD rule needs the predicted domain of every row")
        out = np.empty(len(combined), dtype=np.float64)
        for i, (c, v) in enumerate(zip(np.asarray(pred), combined, strict=True)):
            ref = self.class_combined[int(c)] if int(c) < len(self.class_combined) else self.dev_combined
            ref = ref if len(ref) else self.dev_combined
            out[i] = np.searchsorted(ref, v, side="left") / len(ref)
        return out

    def rejects_for_sure(self, partial: dict[str, np.ndarray], threshold: float | None = None) -> tuple[bool, float]:
        """Whether one text whose evidence is known only in part (``partial``: some of the rule's
        components, each [1]) is rejected whatever the others turn out to be, and the largest in-domain
        percentile it can still reach. The unknown components are set to their most in-domain p-value
        (the Fisher sum only grows with each), and the text must fall below the threshold among the dev
        rows of every domain (a per-class rule does not know the predicted domain yet). So a ``True`` is
        exact: computing the rest could not change the ``ood`` verdict."""
        bound = 0.0
        for name, ref in self.dev_scores.items():
            rank = np.searchsorted(ref, float(partial[name][0]), side="left") if name in partial else len(ref)
            bound += math.log((rank + 0.5) / (len(ref) + 1.0))
        refs = [r if len(r) else self.dev_combined for r in self.class_combined or [self.dev_combined]]
        pct = max(np.searchsorted(r, bound, side="left") / len(r) for r in refs)
        return pct < (self.threshold if threshold is None else threshold), float(pct)

    def state(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(the artifact's ``thresholds`` entries, arrays named ``prefix...``)."""
        arrays = {f"{prefix}dev_combined": self.dev_combined}
        arrays.update({f"{prefix}dev.{comp}": ref for comp, ref in self.dev_scores.items()})
        arrays.update({f"{prefix}class_combined.{c}": ref for c, ref in enumerate(self.class_combined or [])})
        if self.ood_combined is not None:
            arrays[f"{prefix}ood_combined"] = self.ood_combined
        if self.ood_examples is not None:
            arrays[f"{prefix}ood_examples"] = self.ood_examples
        return ({"id_recall": self.id_recall, "id_percentile": self.threshold, "components": sorted(self.dev_scores),
                 "per_class": self.class_combined is not None, "ood_reject": self.ood_reject}, arrays)

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str,
                   num_domains: int) -> OODRule:
        return cls(dev_scores={c: arrays[f"{prefix}dev.{c}"] for c in meta["components"]},
                   dev_combined=arrays[f"{prefix}dev_combined"], id_recall=float(meta["id_recall"]),
                   threshold=float(meta["id_percentile"]),
                   class_combined=[arrays[f"{prefix}class_combined.{c}"] for c in range(num_domains)]
                   if meta.get("per_class") else None, ood_reject=float(meta.get("ood_reject", 0.0)),
                   ood_combined=arrays.get(f"{prefix}ood_combined"), ood_examples=arrays.get(f"{prefix}ood_examples"))

    def threshold_for(self, id_recall: float) -> float:
        """Percentile threshold keeping ``id_recall`` of the dev rows; monotone non-increasing in it."""
        if not 0.0 < id_recall <= 1.0:
            raise ValueError(f"id_recall must be in (0, 1], got {id_recall}")
        if self.class_combined is not None:
            return 1.0 - id_recall - 1e-9
        n = len(self.dev_combined)
        return math.floor((1.0 - id_recall) * n + 1e-9) / n


@dataclass
class EarlyAccept:
    """Stop after the ``widemlp`` member for a text it alone already rates clearly in-domain: its own OOD
    rule (the full rule's ``widemlp.*`` components, calibrated on the same dev rows) puts the text at or
    above ``percentile`` of the dev rows, and the verdict is widemlp's most probable domain. Unlike the
    early rejection this can change a verdict — MiniLM's evidence might have rejected the text — so its
    price is measured (``training/guard_select.py --early-accept``; BENCHMARKS "Guard")."""

    rule: OODRule
    percentile: float

    def accepts(self, wide_components: dict[str, np.ndarray]) -> np.ndarray:
        """Per row: whether the widemlp evidence alone is in-domain enough to stop."""
        comps = {k: wide_components[k] for k in self.rule.dev_scores}
        return self.rule.percentile(comps) >= self.percentile

    def state(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"{prefix}dev_combined": self.rule.dev_combined}
        arrays.update({f"{prefix}dev.{comp}": ref for comp, ref in self.rule.dev_scores.items()})
        return {"percentile": self.percentile, "components": sorted(self.rule.dev_scores)}, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str,
                   id_recall: float) -> EarlyAccept:
        rule = OODRule(dev_scores={c: arrays[f"{prefix}dev.{c}"] for c in meta["components"]},
                       dev_combined=arrays[f"{prefix}dev_combined"], id_recall=id_recall)
        return cls(rule, float(meta["percentile"]))


@dataclass
class SemanticAccept(EarlyAccept):
    """A second way in, for in-domain text of a style the training rows lack: a text the OOD rule rejects
    is accepted (with the classifier's domain) when its own rule over a few style-robust components — the
    MiniLM similarity to the domain centroids and the TF-IDF kNN, by default — puts it at or above
    ``percentile`` of the dev rows. The main rule's hidden-space kNN is what rejects near-domain OOD text
    and also what rejects a new in-domain style (BENCHMARKS "Guard", leave-one-source-out protocol)."""

    def could_accept(self, partial: dict[str, np.ndarray]) -> bool:
        """Whether one text whose evidence is known only in part (``partial``, each [1]) could still reach
        ``percentile``: the unknown components at their most in-domain p-value (``OODRule.rejects_for_sure``
        for this rule)."""
        bound = 0.0
        for name, ref in self.rule.dev_scores.items():
            rank = np.searchsorted(ref, float(partial[name][0]), side="left") if name in partial else len(ref)
            bound += math.log((rank + 0.5) / (len(ref) + 1.0))
        return np.searchsorted(self.rule.dev_combined, bound, side="left") / len(self.rule.dev_combined) \
            >= self.percentile
