"""The ``Guard``: members (``kinds``), the OOD rule over their evidence (``rule``), and the artifact.

Serving contract: ``Guard.load(path)`` reads an artifact folder once; ``classify(text)`` is pure,
synchronous, CPU-only, thread-safe and does no I/O. ``classify`` is ``score_batch`` on one row plus one
explicit early-exit stage (``_early_exit``) that may answer before the costlier members run: its labels are
``score_batch``'s. Both compute only the evidence the OOD rule combines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from routers.artifact import Artifact, ArtifactError
from routers.artifact import load as load_artifact
from routers.embeddings import MiniLMEmbedder
from routers.guard.embedding import EmbeddingHead, EncoderMissing
from routers.guard.kinds import Member, family, guard_kind
from routers.guard.rule import EarlyAccept, OODRule, SemanticAccept
from routers.guard.verdict import OOD, RESERVED_LABELS, UNSAFE, GuardBatch, GuardVerdict
from routers.guard.widemlp import TfidfRows, WideMLP

# meta["guard_format"]: 1 (absent) = the first release; 2 adds per-class OOD percentiles, extra widemlp
# seeds (members widemlp_1, ...) and "energy"/"maha" evidence; 3 the optional early accept
# (``EarlyAccept``); 4 ships the embedding member's exact MiniLM graph and tokenizer (artifact files).
# Formats 1-3 load unchanged, except that an embedding member needs its graph added (ADD_ENCODER).
# 5 the OOD anchor (``OODRule.ood_reject``), "centroid" evidence and the semantic accept (``SemanticAccept``).
GUARD_FORMAT = 5
ADD_ENCODER = "switchyard artifact add-encoder {path}"


def single_thread_blas() -> None:
    """Limit numpy's BLAS to one thread for this process (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a core dependency
        return
    threadpool_limits(1, user_api="blas")


def named_evidence(family_name: str, comps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A member's evidence under the names the OOD rule uses (``knn`` → ``widemlp.knn``)."""
    return {f"{family_name}.{c}": v for c, v in comps.items()}


def mean_of(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise mean of same-shaped arrays, summed in order (as ``np.mean(arrays, axis=0)``) but
    without stacking them first; one array is returned as is (the common single-member case)."""
    if len(arrays) == 1:
        return arrays[0]
    total = arrays[0] + arrays[1]
    for a in arrays[2:]:
        total += a
    return total / len(arrays)


def share_featurizers(members: dict[str, Member]) -> None:
    """Let widemlp seeds fitted on the same texts share one featurizer object (one transform per query)."""
    seen = []
    for m in members.values():
        if not isinstance(m, WideMLP):
            continue
        same = next((f for f in seen if f.state()[0] == m.featurizer.state()[0]
                     and np.array_equal(f.idf, m.featurizer.idf)), None)
        if same is None:
            seen.append(m.featurizer)
        else:
            m.featurizer = same


Outputs = dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]  # member name → (probs, components)


def subset_cache(cache: dict, rows: list[int]) -> dict:
    """A members' per-call cache (``WideMLP.rows`` / ``tfknn``: TF-IDF rows and arrays with one entry per
    text) for the texts at positions ``rows``, in that order."""
    idx = np.asarray(rows, dtype=np.int64)
    return {key: value.take(idx) if isinstance(value, TfidfRows) else value[idx] for key, value in cache.items()}


@dataclass
class Guard:
    kind: str  # a name in routers.guard.kinds.GUARD_KINDS
    classes: list[str]  # classifier outputs: domains, then "unsafe"/"ood" when trained
    members: dict[str, Member]
    rule: OODRule
    max_chars: int = 2000  # the guard judges a text's first max_chars characters
    meta: dict[str, Any] = field(default_factory=dict)
    early_accept: EarlyAccept | None = None  # used only when ``can_exit_early``
    semantic_accept: SemanticAccept | None = None  # a second way in for text the OOD rule rejects

    @property
    def domains(self) -> list[str]:
        return [c for c in self.classes if c not in RESERVED_LABELS]

    # -- scoring --------------------------------------------------------------------------------------
    def combine(self, outs: Outputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Average class probabilities; name the evidence ``family.component`` (+ ``msp``), where members
        ``widemlp``, ``widemlp_1``, ... (seeds of one family) contribute the mean of their values."""
        n_dom = len(self.domains)
        probs = mean_of([p for p, _ in outs.values()])
        families: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
        for name, out in outs.items():
            families.setdefault(family(name), []).append(out)
        comps: dict[str, np.ndarray] = {}
        for fam, items in families.items():
            comps[f"{fam}.msp"] = mean_of([p for p, _ in items])[:, :n_dom].max(axis=1)
            for comp in dict.fromkeys(c for _, mc in items for c in mc):
                comps[f"{fam}.{comp}"] = mean_of([mc[comp] for _, mc in items if comp in mc])
        return probs, comps

    def evidence_wanted(self, member_name: str) -> frozenset[str]:
        """The components of ``member_name``'s family that the OOD rule combines (``msp`` is the guard's
        own: it costs nothing)."""
        fam = family(member_name)
        names = [*self.rule.dev_scores, *(self.semantic_accept.rule.dev_scores if self.semantic_accept else ())]
        return frozenset(c.split(".", 1)[1] for c in names if c.split(".", 1)[0] == fam)

    def predicted_domain(self, probs: np.ndarray) -> np.ndarray:
        """Index of the most probable domain class per row (reserved classes ignored)."""
        return probs[:, : len(self.domains)].argmax(axis=1)

    def score_batch(self, texts: Sequence[str], id_recall: float | None = None) -> GuardBatch:
        """Labels, class probabilities and in-domain percentiles of many texts (evaluation, calibration).
        ``id_recall`` overrides the stored threshold."""
        threshold = self.rule.threshold if id_recall is None else self.rule.threshold_for(id_recall)
        return self._score([t[: self.max_chars] for t in texts], {}, {}, threshold)

    def _score(self, texts: list[str], outs: Outputs, cache: dict, threshold: float) -> GuardBatch:
        """``score_batch`` on texts already cut, given the members' outputs computed so far (``outs``)."""
        for name, m in self.members.items():
            if name not in outs:
                outs[name] = m.evidence(texts, self.evidence_wanted(name), cache)
        probs, comps = self.combine({name: outs[name] for name in self.members})
        pct = self.rule.percentile(comps, self.predicted_domain(probs))
        labels = []
        semantic = self.semantic_accept.accepts(comps) if self.semantic_accept is not None else None
        for i, (p, q) in enumerate(zip(probs, pct, strict=True)):
            top = self.classes[int(np.argmax(p))]
            ok = top in RESERVED_LABELS or q >= threshold or (semantic is not None and bool(semantic[i]))
            labels.append(top if ok else OOD)
        if self.early_accept is not None and self.can_exit_early:  # what classify decides after widemlp
            wide_probs, wide_comps = outs["widemlp"]
            named = named_evidence("widemlp", wide_comps)
            for i in np.flatnonzero(self.early_accept.accepts(named)):
                if not self.rejects_for_sure({k: v[i:i + 1] for k, v in named.items()}, threshold)[0]:
                    labels[i] = self.domains[int(self.predicted_domain(wide_probs[i:i + 1])[0])]
        return GuardBatch(probs=probs, id_percentile=pct, labels=labels)

    def classify(self, text: str) -> GuardVerdict:
        """Verdict for one text (the request text; the guard reads its first ``max_chars`` characters)."""
        if not isinstance(text, str):
            raise ValueError(f"classify expects a str, got {type(text).__name__}")
        text = text[: self.max_chars]
        outs: Outputs = {}
        cache: dict = {}
        early = self._early_exit(text, outs, cache)
        if early is not None:
            return early
        batch = self._score([text], outs, cache, self.rule.threshold)
        return self._verdict(batch.probs[0], float(batch.id_percentile[0]), batch.labels[0])

    def classify_batch(self, texts: Sequence[str]) -> list[GuardVerdict]:
        """``classify`` of many texts in one pass (the gateway's batcher calls it): per text the same label
        as ``classify`` and, up to float rounding, the same confidence and scores. Each stage of the early
        exit runs once over the texts still undecided, so a text settled early skips the costlier members
        here too; the members' evidence is computed for those texts together (one kNN matrix product for
        all of them; MiniLM still encodes one text at a time)."""
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"classify_batch expects str texts, got {type(t).__name__}")
        if len(texts) == 1:  # a lone request (the batcher's common case at low load): exactly classify
            return [self.classify(texts[0])]
        cut = [t[: self.max_chars] for t in texts]
        verdicts: list[GuardVerdict | None] = [None] * len(cut)
        todo = list(range(len(cut)))  # rows without a verdict yet
        outs: Outputs = {}
        cache: dict = {}
        if self.can_exit_early and cut:
            wide = self.members["widemlp"]
            tfknn = wide.tfknn(wide.rows(cut, cache), cache)
            todo = self._settle(todo, {"widemlp.tfknn": tfknn}, verdicts)
            if todo and any(isinstance(m, EmbeddingHead) for m in self.members.values()):
                cut, cache = [cut[i] for i in todo], subset_cache(cache, todo)
                outs["widemlp"] = wide.evidence(cut, self.evidence_wanted("widemlp"), cache)
                named = named_evidence("widemlp", outs["widemlp"][1])
                left = self._settle(list(range(len(todo))), named, verdicts, index=todo,
                                    wide_probs=outs["widemlp"][0])
                keep = np.asarray(left, dtype=np.int64)
                outs = {"widemlp": (outs["widemlp"][0][keep], {k: v[keep] for k, v in outs["widemlp"][1].items()})}
                cut, cache, todo = [cut[j] for j in left], subset_cache(cache, left), [todo[j] for j in left]
            elif todo:
                cut, cache = [cut[i] for i in todo], subset_cache(cache, todo)
        if todo:
            batch = self._score(cut, outs, cache, self.rule.threshold)
            for j, i in enumerate(todo):
                verdicts[i] = self._verdict(batch.probs[j], float(batch.id_percentile[j]), batch.labels[j])
        assert all(v is not None for v in verdicts), "every text gets a verdict"
        return verdicts  # type: ignore[return-value]

    def _settle(self, rows: list[int], evidence: dict[str, np.ndarray], verdicts: list[GuardVerdict | None],
                index: list[int] | None = None, wide_probs: np.ndarray | None = None) -> list[int]:
        """One early-exit stage over ``rows`` (positions in ``evidence``; ``index`` maps them to positions in
        ``verdicts``): the sure ``ood`` rejection, then (given ``wide_probs``) the early accept — as
        ``_early_exit`` decides one text. Returns the rows still undecided."""
        left = []
        accepts = (self.early_accept.accepts(evidence) if wide_probs is not None and self.early_accept is not None
                   else None)
        for r in rows:
            i = r if index is None else index[r]
            sure, pct = self.rejects_for_sure({k: v[r:r + 1] for k, v in evidence.items()})
            if sure:
                verdicts[i] = self._early_ood(pct)
            elif accepts is not None and accepts[r]:
                verdicts[i] = self._early_domain(wide_probs[r])
            else:
                left.append(r)
        return left

    def _verdict(self, p: np.ndarray, pct: float, label: str) -> GuardVerdict:
        """The verdict of a text every member scored: class probabilities ``p``, in-domain percentile ``pct``
        and its ``score_batch`` label."""
        scores = {c: float(v) for c, v in zip(self.classes, p, strict=True)}
        scores["id_percentile"] = pct
        if label == OOD:
            if self.classes[int(np.argmax(p))] == OOD:  # the trained ood class won
                conf = float(p[self.classes.index(OOD)])
            else:  # rejected by the rule: how far below the threshold
                conf = 1.0 - pct / max(self.rule.threshold, 1e-9)
            return GuardVerdict("ood", None, min(max(conf, 0.0), 1.0), scores)
        if label == UNSAFE:
            return GuardVerdict("unsafe", None, float(p[self.classes.index(UNSAFE)]), scores)
        return GuardVerdict("domain", label, float(p[self.classes.index(label)]), scores)

    def _early_exit(self, text: str, outs: Outputs, cache: dict) -> GuardVerdict | None:
        """The early-exit stage: the cheapest evidence first, a verdict as soon as it is settled.

        1. TF-IDF kNN alone: ``ood`` when no value of the other evidence could lift the text above the
           threshold (``OODRule.rejects_for_sure``) — foreign text, toxic posts, other languages.
        2. With a costlier member to come (the ensemble's MiniLM): widemlp's evidence, then the same sure
           rejection, or ``EarlyAccept`` (widemlp's domain when its own evidence is in-domain enough).
        None: no verdict yet (what was computed stays in ``outs`` / ``cache`` for ``_score``). The labels
        equal ``score_batch``'s, which applies the same early accept.
        """
        if not self.can_exit_early:
            return None
        wide = self.members["widemlp"]
        sure, pct = self.rejects_for_sure({"widemlp.tfknn": wide.tfknn(wide.rows([text], cache), cache)})
        if sure:
            return self._early_ood(pct)
        if not any(isinstance(m, EmbeddingHead) for m in self.members.values()):
            return None
        outs["widemlp"] = wide.evidence([text], self.evidence_wanted("widemlp"), cache)
        named = named_evidence("widemlp", outs["widemlp"][1])
        sure, pct = self.rejects_for_sure(named)
        if sure:
            return self._early_ood(pct)
        if self.early_accept is not None and self.early_accept.accepts(named)[0]:
            return self._early_domain(outs["widemlp"][0][0])
        return None

    def rejects_for_sure(self, partial: dict[str, np.ndarray], threshold: float | None = None) -> tuple[bool, float]:
        """``OODRule.rejects_for_sure`` for the guard: also the semantic accept could not take the text in,
        whatever its unknown evidence turns out to be."""
        sure, pct = self.rule.rejects_for_sure(partial, threshold)
        if sure and self.semantic_accept is not None:
            sure = not self.semantic_accept.could_accept(partial)
        return sure, pct

    @property
    def can_exit_early(self) -> bool:
        """Whether ``classify`` may stop before computing every member: the rule combines the one widemlp's
        TF-IDF kNN evidence, and no trained class (``ood``/``unsafe``) could outrank the OOD rule."""
        wide = self.members.get("widemlp")
        return (isinstance(wide, WideMLP) and wide.ref_tf is not None and "widemlp.tfknn" in self.rule.dev_scores
                and not any(family(n) == "widemlp" and n != "widemlp" for n in self.members)
                and not any(c in RESERVED_LABELS for c in self.classes))

    def _early_ood(self, pct: float) -> GuardVerdict:
        """The ``ood`` verdict of a text rejected before every member ran (``rejects_for_sure``): the same
        label the full computation gives; ``scores`` has no class probabilities, ``id_percentile`` is an
        upper bound, and ``early_exit`` is 1."""
        conf = 1.0 - pct / max(self.rule.threshold, 1e-9)
        return GuardVerdict("ood", None, min(max(conf, 0.0), 1.0), {"id_percentile": pct, "early_exit": 1.0})

    def _early_domain(self, wide_probs: np.ndarray) -> GuardVerdict:
        """The verdict of a text accepted on widemlp's evidence alone (``EarlyAccept``): its most probable
        domain; ``scores`` are widemlp's class probabilities and ``early_exit`` is 1."""
        domain = self.domains[int(np.argmax(wide_probs[: len(self.domains)]))]
        scores = {c: float(v) for c, v in zip(self.classes, wide_probs, strict=True)}
        scores["early_exit"] = 1.0
        return GuardVerdict("domain", domain, scores[domain], scores)

    # -- deployment examples ---------------------------------------------------------------------------
    def add_examples(self, texts: Sequence[str], labels: Sequence[str], tfidf_max_df: float = 0.05) -> dict[str, int]:
        """Teach the guard a deployment's own examples without retraining (``switchyard guard add-examples``).

        In-domain examples (``labels`` naming a domain) join every member's kNN reference rows (hidden /
        MiniLM / TF-IDF), so text of their style finds close neighbours and scores in-domain evidence like
        the training style does; the dev calibration and the classifier weights are unchanged (the domain a
        text gets is still the classifier's). ``ood`` examples go to the rule (``OODRule.add_ood``): an
        OOD-anchored threshold rises until they are rejected, never above the dev threshold of its
        ``id_recall``. Returns the count added per label; ValueError for a label the guard does not know
        (``unsafe`` examples need a retrained ``unsafe`` class)."""
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        for lab in labels:
            if lab not in self.domains and lab != OOD:
                raise ValueError(f"unknown label {lab!r}: add-examples takes this guard's domains "
                                 f"({', '.join(self.domains)}) or {OOD!r}")
        cut = [t[: self.max_chars] for t in texts]
        in_domain = [t for t, lab in zip(cut, labels, strict=True) if lab != OOD]
        ood = [t for t, lab in zip(cut, labels, strict=True) if lab == OOD]
        for m in self.members.values():
            if isinstance(m, WideMLP):
                m.add_references(in_domain, tfidf_max_df)
            else:
                m.add_references(in_domain)
        if ood:
            probs, comps = self.combine({n: m.evidence(ood, self.evidence_wanted(n)) for n, m in self.members.items()})
            self.rule.add_ood({k: comps[k] for k in self.rule.dev_scores})
        counts: dict[str, int] = {}
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
        added = self.meta.setdefault("added_examples", {})
        for lab, n in counts.items():
            added[lab] = added.get(lab, 0) + n
        return counts

    # -- artifacts ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        arrays: dict[str, np.ndarray] = {}
        files: dict[str, Path] = {}
        members_meta = {}
        for name, m in self.members.items():
            mmeta, marrays = m.state(f"{name}.")
            members_meta[name] = mmeta
            arrays.update(marrays)
            if isinstance(m, EmbeddingHead):
                files.update(m.files(f"{name}."))
        rule_meta, rule_arrays = self.rule.state("rule.")
        arrays.update(rule_arrays)
        early_meta = None
        if self.early_accept is not None:
            early_meta, early_arrays = self.early_accept.state("early.")
            arrays.update(early_arrays)
        semantic_meta = None
        if self.semantic_accept is not None:
            semantic_meta, semantic_arrays = self.semantic_accept.state("semantic.")
            arrays.update(semantic_arrays)
        meta = {
            **self.meta,
            "description": f"switchyard guard ({self.kind})",
            "guard_kind": self.kind,
            "guard_format": GUARD_FORMAT,
            "labels": self.classes,
            "domains": self.domains,
            "members": members_meta,
            "thresholds": {**rule_meta, "early_accept": early_meta, "semantic_accept": semantic_meta},
            "max_chars": self.max_chars,
        }
        return Artifact(kind="guard", meta=meta, arrays=arrays, files=files).save(path)

    @classmethod
    def load(cls, path: str | Path, embedder: MiniLMEmbedder | None = None) -> Guard:
        """Read an artifact folder; raises ``ArtifactError`` (one line that says what to do) when it is not a
        loadable guard. ``embedder`` replaces the shipped MiniLM encoder (tests, comparisons).

        Side effect: limits OpenBLAS/MKL to one thread in this process (``single_thread_blas``): the
        guard's small matrix-vector products are 5-100x slower with BLAS threads, worst under load."""
        single_thread_blas()
        art = load_artifact(path, kind="guard")
        meta, arrays = art.meta, art.arrays
        fmt = meta.get("guard_format", 1)
        if not isinstance(fmt, int) or fmt > GUARD_FORMAT:
            raise ArtifactError(f"guard artifact {str(path)!r} has guard format {fmt!r}, newer than this "
                                f"switchyard (format {GUARD_FORMAT}); upgrade switchyard to load it")
        try:
            kind = guard_kind(meta["guard_kind"])
            members = {name: kind.load_member(name, mmeta, arrays, art.files, embedder)
                       for name, mmeta in meta["members"].items()}
            share_featurizers(members)
            for m in members.values():
                if isinstance(m, EmbeddingHead):
                    m.embedder.load()
            th = meta["thresholds"]
            rule = OODRule.from_state(th, arrays, "rule.", len(meta["domains"]))
            early = EarlyAccept.from_state(th["early_accept"], arrays, "early.", rule.id_recall) \
                if th.get("early_accept") else None
            semantic = SemanticAccept.from_state(th["semantic_accept"], arrays, "semantic.", rule.id_recall) \
                if th.get("semantic_accept") else None
        except KeyError as e:
            raise ArtifactError(f"guard artifact {str(path)!r} is missing {e}; retrain it") from None
        except EncoderMissing as e:
            raise ArtifactError(f"guard artifact {str(path)!r}: {e}; add it with "
                                f"`{ADD_ENCODER.format(path=path)}` (engine extra) or retrain it") from None
        except ValueError as e:
            raise ArtifactError(f"guard artifact {str(path)!r} is malformed: {e}; retrain it") from None
        return cls(kind=kind.name, classes=list(meta["labels"]), members=members, rule=rule,
                   max_chars=int(meta.get("max_chars", 2000)), meta=meta, early_accept=early,
                   semantic_accept=semantic)
