"""The guard: is a request in one of this deployment's domains, out of domain (``ood``), or ``unsafe``?

Kinds (``kinds.py``, a registry): ``widemlp`` (hashed TF-IDF → embedding bag → MLP, numpy at serve time;
``widemlp.py``), ``embedding`` (MiniLM → linear head; ``embedding.py``) and ``ensemble`` (both). Each is
trained on in-domain rows only (``training/guard_fit.py``).

The OOD rule (``rule.py``). Each member gives in-domain evidence scores (higher = more in-domain):
``msp`` (largest domain-class probability), ``knn`` (mean cosine similarity to the ``k`` nearest training
rows in the member's hidden/embedding space; ``knn.py``) and, for ``widemlp``, ``tfknn`` (the same in
TF-IDF space: catches foreign languages and off-topic vocabulary; ``sparse.py``); ``energy`` and ``maha``
exist for experiments and are computed only when a rule combines them. Each score becomes an in-domain
p-value against the dev rows, the p-values are combined with Fisher's method, and a text is ``ood`` when
that combination ranks below the share ``1 - id_recall`` of the dev rows (globally, or among the dev rows
of its predicted domain). With ``--ood-train`` / ``--unsafe-train`` those become trained classes that win
before the rule.

Serving: ``Guard.load(path)`` once, then ``classify(text)`` (``guard.py``) → ``GuardVerdict``
(``verdict.py``).
"""

from routers.guard.guard import GUARD_FORMAT, Guard, named_evidence, single_thread_blas
from routers.guard.kinds import GUARD_KINDS, guard_kind
from routers.guard.rule import EarlyAccept, OODRule, SemanticAccept
from routers.guard.verdict import OOD, RESERVED_LABELS, UNSAFE, GuardBatch, GuardVerdict

__all__ = ["GUARD_FORMAT", "GUARD_KINDS", "OOD", "RESERVED_LABELS", "UNSAFE", "EarlyAccept", "Guard", "GuardBatch",
           "GuardVerdict", "OODRule", "SemanticAccept", "guard_kind", "named_evidence", "single_thread_blas"]
