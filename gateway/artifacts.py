"""The artifacts a gateway serves with — guard, route policy (router) and cascade rule — as one snapshot.

``load_artifacts(settings)`` reads the configured artifact folders (CPU and disk: the pipeline calls it in
a worker thread when it reloads) and returns a ``ServingArtifacts``. The pipeline holds exactly one snapshot
and replaces it with a single assignment (``Lifecycle.reload``): a request takes the snapshot once when its
decision starts and uses that snapshot to the end (guard, router score and threshold, cascade rule), so
in-flight requests finish on the artifacts they started with while new requests get the new ones.
A load that fails raises (``ArtifactError`` and friends) and the caller keeps the old snapshot.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.settings import Settings


@dataclass(frozen=True)
class ArtifactInfo:
    """Which artifact folder is serving: its path, the manifest's ``created`` stamp and sha256 (first 16
    hex digits: changes with any retrain or calibration), and the router kind / threshold."""

    path: str
    created: str | None
    manifest_sha256: str
    kind: str | None = None
    threshold: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ServingArtifacts:
    guard: Any = None  # routers.guard.Guard | None (gateway.pipeline.GuardComponent)
    policy: Any = None  # routers.policy.RoutePolicy (gateway.pipeline.PolicyComponent)
    cascade_rule: Any = None  # gateway.cascade.CascadeRule | None (cascade off)
    router_info: ArtifactInfo | None = None
    guard_info: ArtifactInfo | None = None
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        """What ``POST /admin/reload`` reports as serving."""
        return {"router": self.router_info.as_dict() if self.router_info else None,
                "guard": self.guard_info.as_dict() if self.guard_info else None,
                "loaded_at": round(self.loaded_at, 3)}


def artifact_info(path: str | Path, *, kind: str | None = None, threshold: float | None = None) -> ArtifactInfo:
    from routers.artifact import MANIFEST

    raw = (Path(path) / MANIFEST).read_bytes()
    created = json.loads(raw).get("created")
    return ArtifactInfo(path=str(path), created=created, manifest_sha256=hashlib.sha256(raw).hexdigest()[:16],
                        kind=kind, threshold=threshold)


def cascade_rule_for(settings: Settings, router: Any) -> Any:
    """Settings' cascade thresholds, else the router artifact's, else the default; None when the cascade is off."""
    from gateway.cascade import resolve_rule

    cascade = settings.routing.cascade
    if cascade.mode == "off":
        return None
    artifact_cascade = (router.meta.get("cascade") or None) if router is not None else None
    return resolve_rule(cascade.min_mean_logprob, cascade.min_token_logprob, artifact_cascade)


def auto_pools(policy: Any) -> list[str] | None:
    """The pools an N-model policy chooses among (None for two pools): accounting reserves budgets on them,
    so a reload may not change them."""
    pools = getattr(policy, "pools", None)
    return sorted(alias for alias, _ in pools.values()) if pools else None


def load_artifacts(settings: Settings) -> ServingArtifacts:
    """Read ``guard.artifact`` and ``routing.router_artifact`` (either may be None = off). Raises
    ``routers.artifact.ArtifactError`` (a ValueError with a one-line reason), ``ConfigError`` (an N-model
    router whose models the settings do not map to pools) or OSError when one cannot load."""
    from routers.policy import RoutePolicy

    guard = guard_info = None
    if settings.guard.artifact:
        from routers.guard import Guard

        guard = Guard.load(settings.guard.artifact)
        guard_info = artifact_info(settings.guard.artifact)
    router = router_info = router_pools = None
    if settings.routing.router_artifact:
        from routers.router import Router

        router = Router.load(settings.routing.router_artifact)
        router_pools = settings.router_pools(router.kind, router.models)  # ConfigError when they don't fit
        router_info = artifact_info(settings.routing.router_artifact, kind=router.kind, threshold=router.threshold)
    return ServingArtifacts(guard=guard, policy=RoutePolicy(settings.routing, router, pools=router_pools),
                            cascade_rule=cascade_rule_for(settings, router), router_info=router_info,
                            guard_info=guard_info)
