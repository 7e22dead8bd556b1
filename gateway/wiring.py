"""build_pipeline(settings): the real components of one gateway, made from the settings and handed to the
``Pipeline`` (``create_app``'s lifespan calls it). The Pipeline constructs nothing itself: tests give it
fakes through the same constructor, or replace the replicas / embedder / resolver here."""

from __future__ import annotations

from typing import Any

from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.settings import Settings


def build_pipeline(settings: Settings, *, backend_factory: Any = None, metrics: Metrics | None = None,
                   embed: Any = None, resolver: Any = None) -> Pipeline:
    """Loads the guard and router artifacts (fast; ``ConfigError`` when the router's pools don't fit the
    settings); pools start in ``Lifecycle.start()`` (``gateway/lifecycle.py``). ``backend_factory`` (PoolConfig, index) → Backend,
    ``embed`` (texts → unit vectors, for the example store) and ``resolver`` (DNS) replace the real replicas /
    MiniLM / resolver (tests)."""
    import routers.features  # noqa: F401 - imported now, not on the first request
    from backends.pool import PoolSet
    from gateway import cascade as _cascade  # noqa: F401
    from gateway.admission import Admitter, InProcessRateLimiter, RedisRateLimiter
    from gateway.artifacts import load_artifacts
    from gateway.budget import Budgets
    from gateway.decision_log import DecisionLog
    from gateway.sessions import build_session_store

    metrics = metrics or Metrics()
    pools = PoolSet.from_settings(settings, backend_factory=backend_factory,
                                  stat_logger_factory=metrics.engine.stat_logger, resolver=resolver)
    limiter = RedisRateLimiter(settings.redis_url) if settings.redis_url else InProcessRateLimiter()
    store = None
    if settings.example_cache.enabled and settings.example_cache.top_k > 0:
        from gateway.example_cache import build_example_store

        store = build_example_store(settings, embed=embed)
    traffic, traffic_log = settings.traffic_log, None
    if traffic.path:
        traffic_log = DecisionLog(traffic.path, traffic.sample, keep=0, max_bytes=traffic.max_bytes,
                                  max_age_s=traffic.retention_days * 86400.0, file_mode=0o600)
    return Pipeline(settings, pools=pools, admitter=Admitter(settings, limiter), metrics=metrics,
                    artifacts=load_artifacts(settings), sessions=build_session_store(settings),
                    decision_log=DecisionLog(settings.decision_log.path, settings.decision_log.sample),
                    budgets=Budgets(settings.redis_url), store=store, traffic_log=traffic_log)


__all__ = ["build_pipeline"]
