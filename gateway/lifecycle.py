"""The gateway's lifecycle around its ``Pipeline``: start-up, readiness, artifact reloads, the values read at
each ``/metrics`` scrape, background work, and shutdown. The Pipeline holds the per-request steps only; this
module owns everything that happens once per process or on a timer.

``create_app``'s lifespan makes one ``Lifecycle`` over the pipeline it built, awaits ``start()`` and, at
shutdown, ``close()``; ``GET /readyz`` asks ``readiness()``, ``POST /admin/reload`` and SIGHUP ``reload()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.pipeline import Pipeline

log = logging.getLogger("switchyard.lifecycle")


class Background:
    """Coroutines run after a request's answer (example admits, feedback, settlements, session writes) or for
    the process's lifetime (retention timers). A failure is logged, never raised; ``cancel()`` at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def __call__(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %r", task.exception())

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class Lifecycle:
    """Start, readiness, reload and close of one pipeline and the components it was given."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        """The classifier batchers, the example store, the pools (local replicas load here), the traffic log's
        retention timer, and the values read at each scrape. A replica that did not come up is logged."""
        p = self.pipeline
        self.start_batchers()
        if p.store is not None:  # first: example_cache.server_search = 'on' without it fails start-up fast
            await p.store.start()
        if any(cfg.kind == "local" for cfg in p.settings.pools):
            # Local replicas load in worker threads at the same time; importing transformers from two
            # threads at once can fail ("cannot import name ..."), so import it once here first.
            import transformers  # noqa: F401
            from transformers import AutoConfig, AutoTokenizer  # noqa: F401
        await p.pools.start()
        if p.traffic_log is not None:
            p.background(self._expire_traffic_log())
        for alias, replicas in p.pools.health().items():
            for name, ok in replicas.items():
                if not ok:
                    log.warning("pool %s: replica %s is not available after start-up", alias, name)
        p.metrics.read_at_scrape(self._scrape_values)

    def start_batchers(self) -> None:
        """The guard's and the router's batchers (``classifiers.batching``): each runs in a worker thread
        over the requests waiting for it. An item is (the request's guard or router, its text): a request
        keeps the artifacts of the snapshot it started with, so one batch may hold two snapshots' requests
        after a reload, and each artifact scores its own (``per_owner``)."""
        p = self.pipeline
        cfg = p.settings.classifiers
        if not cfg.batching or p.guard_batcher is not None or p.router_batcher is not None:
            return
        from routers.batcher import Batcher, per_owner

        opts = {"max_batch": cfg.max_batch, "max_wait_s": cfg.max_wait_ms / 1000}
        p.guard_batcher = Batcher(per_owner("classify_batch"), name="guard", **opts)
        p.router_batcher = Batcher(per_owner("score_batch"), name="router", **opts)

    async def close(self) -> None:
        """Background work cancelled, batchers drained (queued requests are answered; nothing new is
        accepted), then pools, store, limiter, sessions, budgets and logs closed."""
        p = self.pipeline
        p.background.cancel()
        for batcher in (p.guard_batcher, p.router_batcher):
            if batcher is not None:
                await asyncio.to_thread(batcher.close, 10.0)
        await p.pools.close()
        if p.store is not None:
            with contextlib.suppress(Exception):
                await p.store.close()
        with contextlib.suppress(Exception):
            await p.admitter.limiter.close()
        with contextlib.suppress(Exception):
            await p.sessions.close()
        with contextlib.suppress(Exception):
            await p.budgets.close()
        p.decision_log.close()
        if p.traffic_log is not None:
            p.traffic_log.close()

    async def reload(self) -> dict[str, Any]:
        """Read the configured guard and router artifacts again (in a worker thread) and serve them from now
        on; requests already deciding or answering keep the snapshot they took. A load that fails keeps the
        old snapshot, logs why, and says so: ``{"reloaded": False, "error": ..., "serving": ...}``; success is
        ``{"reloaded": True, "serving": ..., "previous": ...}``. Reloads run one at a time (SIGHUP and
        ``POST /admin/reload`` share this)."""
        from gateway.artifacts import auto_pools, load_artifacts

        p = self.pipeline
        async with self._reload_lock:
            old = p.artifacts
            try:
                new = await asyncio.to_thread(load_artifacts, p.settings)
                if auto_pools(new.policy) != auto_pools(old.policy):
                    raise ValueError(f"the router now chooses among pools {auto_pools(new.policy)} instead of "
                                     f"{auto_pools(old.policy)}: restart the gateway to serve it")
            except Exception as e:  # noqa: BLE001 - any failure keeps the old artifacts serving
                error = str(e) if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {e}"
                log.error("artifact reload failed, still serving the previous artifacts: %s", error)
                p.metrics.child(p.metrics.artifact_reloads, "failed").inc()
                return {"reloaded": False, "error": error, "serving": old.describe()}
            p.artifacts = new  # one assignment: the swap
            p.metrics.child(p.metrics.artifact_reloads, "ok").inc()
            serving = new.describe()
            log.info("artifacts reloaded: router %s, guard %s", serving["router"], serving["guard"])
            return {"reloaded": True, "serving": serving, "previous": old.describe()}

    def reload_in_background(self) -> None:
        """``reload()`` as a task (a signal handler cannot await); its outcome is logged."""
        self.pipeline.background(self.reload())

    async def readiness(self) -> dict[str, Any]:
        """{"ready", "status", "pools": {alias: {replica: bool}}, "redis": bool | None}.

        Ready while some traffic can be served: every pool has an available replica. Redis is an
        optimisation (the limiter and the example cache fail open), so Redis down is ``status: degraded``,
        still ready; a pool without a replica is ``status: unavailable``, not ready."""
        p = self.pipeline
        pools = p.pools.health()
        ready = all(any(r.values()) for r in pools.values())
        redis_ok: bool | None = None
        checks = []
        ping = getattr(p.admitter.limiter, "ping", None)  # the Redis limiter's
        if ping is not None:
            checks.append(ping())
        if p.store is not None and p.settings.example_cache.backend == "redis":
            checks.append(p.store.health())
        if checks:
            results = await asyncio.gather(*checks, return_exceptions=True)
            redis_ok = all(r is True for r in results)
        status = "unavailable" if not ready else "degraded" if redis_ok is False else "ok"
        p.metrics.degraded.set(1.0 if status == "degraded" else 0.0)
        return {"ready": ready, "status": status, "pools": pools, "redis": redis_ok}

    async def _expire_traffic_log(self) -> None:
        """Enforce the traffic log's retention on a quiet log too (writes enforce it as well)."""
        traffic_log = self.pipeline.traffic_log
        period = min(60.0, traffic_log.max_age_s / 20)
        while True:
            await asyncio.sleep(period)
            traffic_log.enforce_retention()

    def _scrape_values(self) -> dict[str, Any]:
        p = self.pipeline
        failures: dict[str, int] = {}
        limiter = p.admitter.limiter
        if hasattr(limiter, "num_failures"):
            failures["rate_limiter"] = limiter.num_failures
        if p.settings.redis_url:
            failures["budgets"] = p.budgets.num_failures
        if p.store is not None:
            stats = getattr(p.store, "stats", {}) or {}
            failures["example_cache"] = sum(int(stats.get(k, 0)) for k in ("redis_errors", "timeouts", "admit_failures"))
            values_cache = {k: v for k, v in stats.items() if isinstance(v, int | float)}
        else:
            values_cache = {}
        healthy = {alias: sum(1 for ok in replicas.values() if ok) for alias, replicas in p.pools.health().items()}
        pool_events = {alias: {k.removeprefix("num_"): v for k, v in vars(st).items()}
                       for alias, st in p.pools.stats().items()}
        batchers = {b.name: (b.num_batches, b.num_items) for b in (p.guard_batcher, p.router_batcher)
                    if b is not None}
        return {"redis_failures": failures, "healthy_replicas": healthy, "example_cache": values_cache,
                "pool_events": pool_events, "classifier_batches": batchers}


__all__ = ["Background", "Lifecycle"]
