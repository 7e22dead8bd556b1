"""The request path, short and literal (DESIGN.md):

    model → admission → budget → guard → policy → example cache → pool → backend → cascade → (stream)
          → finish(Outcome): accounting, example-cache admit → record: metrics, decision log, spans

``Pipeline.run(job, credentials)`` does everything up to and including the first Delta, so that every
error a client should see as an HTTP status (403/404/429/400 policy/503/504; 401 is the edge's) is raised
*before* any byte is sent. It returns an ``Execution``: the decision (``Trace``) and the Delta stream, whose
normal end hands an ``Outcome`` to ``finish`` (``gateway/accounting.py`` books it; the example cache learns).
Components are reached through the small Protocols below (a fake of each serves the tests). With
``opentelemetry: true`` each stage opens and ends a span through ``trace.spans`` (``gateway/tracing.py``);
otherwise each hook is one ``None`` check.

Cascade (``routing.cascade``): for route ``slm_then_escalate`` — and for route ``slm`` when
``stream_mode`` is ``buffer`` — the SLM answer is produced in full (with token logprobs), judged by
``CascadeRule``, and either replayed or replaced by the LLM's answer. With ``stream_when_confident`` a
route-``slm`` request streams the SLM directly (lowest time to first token, no after-the-fact check).
The latency trade-off: buffering adds the whole SLM generation time to the time to first token (and the
LLM's on escalation); streaming directly keeps TTFT at the SLM's but cannot take an answer back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from backends.base import BackendError, Delta, GenerationRequest, SamplingParams, Usage
from backends.types import num_image_parts
from gateway.admission import Admission, Admitter
from gateway.budget import Budgets
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PolicyRejection,
    from_backend_error,
)
from gateway.metrics import Metrics
from gateway.settings import Settings
from routers.text import content_text

if TYPE_CHECKING:
    from gateway.artifacts import ServingArtifacts
    from gateway.cascade import CascadeRule
    from gateway.example_cache.types import ExampleStore
    from gateway.sessions import SessionStore

log = logging.getLogger("switchyard.pipeline")

# Cascade judge needs token logprobs from the SLM even when the caller did not ask for them.
_CASCADE_ROUTES = ("slm", "slm_then_escalate")
_AUTO_ROUTES = frozenset({"slm", "slm_then_escalate", "llm", "session"})  # decided for model "auto"
IMAGE_TOKENS_ESTIMATE = 765  # prompt tokens one image counts for in the prompt-length limit (OpenAI: 1024², high)


@dataclass
class Job:
    """One parsed request, chat or completion, as the pipeline sees it."""

    kind: Literal["chat", "completion"]
    model: str  # as requested: "auto", a pool alias, or a pool's model name
    messages: list[dict[str, Any]] | None
    prompt: str | list[int] | None
    sampling: SamplingParams  # built once by the wire request's to_sampling_params(); carries n
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # None: the backend's default (parallel calls allowed)
    response_format: dict[str, Any] | None = None
    user: str | None = None
    hint: Any = None  # routers.policy.RouteHint | None (body ``switchyard`` field or x-switchyard-* header)
    priority: int = 0  # engine scheduling, lower first (vLLM's extra ``priority``)
    chat_template_kwargs: dict[str, Any] | None = None
    correlation_id: str | None = None  # the x-request-id the edge accepted or made
    traceparent: str | None = None  # the client's W3C traceparent, if it sent one
    session_id: str | None = None  # the agent session (gateway/sessions.py session_of)
    program_id: str | None = None  # the multi-agent job (x-program-id; defaults to the session)
    input_param: str = "messages"  # the request field holding the messages, as the endpoint names it (400 params)
    state: dict[str, Any] | None = None  # the request's scope state: ``run`` leaves its Trace there for ``record``
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return self.sampling.n

    @functools.cached_property
    def num_images(self) -> int:
        """Image parts (``image_url``) in the messages: only pools that serve images may take the request."""
        return num_image_parts(self.messages)

    @property
    def has_images(self) -> bool:
        return self.num_images > 0


@dataclass
class Trace:
    """What the gateway decided and measured for one request (→ x-switchyard-* headers, ``switchyard``)."""

    route: str = "explicit"
    pool: str = ""
    guard: str = "off"
    score: float | None = None
    threshold: float | None = None
    scores: dict[str, float] | None = None  # N-model router: predicted score per pool alias
    tolerance: float | None = None  # N-model router: the quality tolerance of the choice
    reason: str = ""
    escalated: bool = False
    judged: bool = False  # the cascade judged an SLM answer
    namespace: str = "default"
    key_name: str | None = None  # the admitted key's name (None: open gateway, or not admitted yet)
    num_examples: int = 0
    example_ids: list[str] = field(default_factory=list)
    query_embedding: Any = field(default=None, repr=False)  # the cache lookup's vector, reused by admit
    example_similarity: float | None = None  # cosine of the best example retrieved (None: none)
    is_kept_on_slm: bool = False  # good examples found: no cascade (example_cache.keep_on_slm_similarity)
    examples: list[dict[str, Any]] = field(default_factory=list, repr=False)  # example messages looked up now
    backend_wait_s: float = 0.0
    overhead_s: float | None = None
    cost_usd: float = 0.0  # finished backend calls so far (the SLM's, when escalated)
    spans: Any = field(default=None, repr=False)  # gateway.tracing.RequestSpans when `opentelemetry: true`

    def info(self) -> dict[str, Any]:
        return {"route": self.route, "model": self.pool, "guard": self.guard, "score": self.score,
                "threshold": self.threshold, "scores": self.scores, "tolerance": self.tolerance,
                "escalated": self.escalated, "num_examples": self.num_examples,
                "example_similarity": self.example_similarity,
                "overhead_ms": round((self.overhead_s or 0.0) * 1000, 3), "cost_usd": round(self.cost_usd, 10),
                "reason": self.reason}

    def headers(self, *, with_cost: bool) -> dict[str, str]:
        h = {"x-switchyard-route": self.route, "x-switchyard-model": self.pool, "x-switchyard-guard": self.guard,
             "x-switchyard-overhead-ms": f"{(self.overhead_s or 0.0) * 1000:.3f}"}
        if with_cost:
            h["x-switchyard-cost-usd"] = f"{self.cost_usd:.10f}"
        if self.scores is not None:
            h["x-switchyard-scores"] = ",".join(f"{alias}={score:.4f}" for alias, score in self.scores.items())
        return h


@dataclass(slots=True)
class Outcome:
    """A request whose answer ended normally: what ``Pipeline.finish`` books and learns from."""

    job: Job
    admission: Admission
    trace: Trace
    usage: Usage
    finish_reason: str | None  # choice 0's
    answer: str  # choice 0's text
    request_text: str  # what guard / router / cache saw
    reservation: Any = None  # gateway.budget.Reservation


class Execution:
    """A request past its first Delta. Iterate ``deltas()`` once; afterwards ``usage`` and ``trace`` are final."""

    def __init__(self, pipeline: Pipeline, job: Job, admission: Admission, trace: Trace, model_name: str,
                 first: Delta | None, rest: AsyncIterator[Delta] | None, text: str) -> None:
        self.pipeline = pipeline
        self.job = job
        self.admission = admission
        self.trace = trace
        self.model_name = model_name
        self.usage: Usage | None = None
        self._first = first
        self._rest = rest
        self._text = text  # what guard / router / cache saw
        self._answer: list[str] = []
        self._finish_reason: str | None = None
        self._num_deltas = 0
        self._done = False
        self.reservation: Any = None  # gateway.budget.Reservation, settled by finish()

    @property
    def request_text(self) -> str:
        """What guard / router / cache read of this request (``routers.text.RequestText``)."""
        return self._text

    async def deltas(self) -> AsyncIterator[Delta]:
        try:
            if self._first is not None:
                self._see(self._first)
                yield self._first
            if self._rest is not None:
                async for delta in self._rest:
                    self._see(delta)
                    yield delta
            self._done = True
        finally:
            await self.aclose()
        if self.job.stream is False and self.trace.overhead_s is not None:
            self.trace.overhead_s = time.perf_counter() - self.job.t_start - self.trace.backend_wait_s
        self.pipeline.finish(Outcome(
            job=self.job, admission=self.admission, trace=self.trace,
            usage=self.usage or Usage(0, self._num_deltas), finish_reason=self._finish_reason,
            answer="".join(self._answer), request_text=self._text, reservation=self.reservation))

    def _see(self, delta: Delta) -> None:
        self._num_deltas += 1
        if delta.index == 0:
            if delta.text:
                self._answer.append(delta.text)
            if delta.finish_reason is not None:
                self._finish_reason = delta.finish_reason
        if delta.usage is not None:
            self.usage = delta.usage

    async def aclose(self) -> None:
        """Abort the backend request if it is still running (client went away, deadline, error)."""
        rest, self._rest = self._rest, None
        if rest is not None and hasattr(rest, "aclose"):
            with contextlib.suppress(Exception):
                await rest.aclose()


async def _replay(deltas: list[Delta]) -> AsyncIterator[Delta]:
    for d in deltas:
        yield d


def _strip_logprobs(deltas: list[Delta]) -> list[Delta]:
    return [replace(d, logprobs=()) if d.logprobs else d for d in deltas]


def _estimate_prompt_tokens(job: Job) -> int:
    """Cheap upper-end estimate for the prompt-length limit: ~4 characters per token."""
    if isinstance(job.prompt, list):
        return len(job.prompt)
    if job.prompt is not None:
        return (len(job.prompt) + 3) // 4
    messages = job.messages or ()
    chars = sum(len(content_text(m.get("content"))) for m in messages)  # text parts: an image's URL is not text
    return (chars + 3) // 4 + 4 * len(messages) + IMAGE_TOKENS_ESTIMATE * job.num_images


class GuardComponent(Protocol):
    """What the pipeline asks of a guard (``routers.guard.Guard``)."""

    max_chars: int

    def classify(self, text: str) -> Any: ...  # → routers.guard.GuardVerdict

    def classify_batch(self, texts: list[str]) -> list[Any]: ...  # classify of each, in one call


class PolicyComponent(Protocol):
    """What the pipeline asks of the route policy (``routers.policy.RoutePolicy``)."""

    router: Any  # routers.router.Router | None: its ``score_batch`` is batched across requests

    def needs_score(self, hint: Any = None) -> bool: ...

    def decide(self, text: str, hint: Any = None, score: float | None = None) -> Any: ...  # → RouteDecision


class PoolsComponent(Protocol):
    """What the pipeline asks of the model pools (``backends.pool.PoolSet``)."""

    def get(self, alias: str) -> Any: ...

    def health(self) -> dict[str, dict[str, bool]]: ...

    def stats(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Pipeline:
    """Built once per app (``create_app``'s lifespan). Components are injected; ``build`` makes the real ones."""

    def __init__(self, settings: Settings, pools: PoolsComponent, *, admitter: Admitter, metrics: Metrics,
                 policy: PolicyComponent, guard: GuardComponent | None = None, cascade_rule: CascadeRule | None = None,
                 store: ExampleStore | None = None, limiter_ping: Callable[[], Awaitable[bool]] | None = None,
                 budgets: Budgets | None = None, sessions: SessionStore | None = None,
                 artifacts: ServingArtifacts | None = None) -> None:
        from gateway.sessions import build_session_store

        self.settings = settings
        self.sessions = sessions if sessions is not None else build_session_store(settings)
        self.budgets = budgets or Budgets(None)
        from gateway.decision_log import DecisionLog

        # the latest records always (the /ui dashboard); lines too when decision_log.path is set
        self.decision_log = DecisionLog(settings.decision_log.path, settings.decision_log.sample)
        self.tracing: Any = None  # gateway.tracing.Tracing when `opentelemetry: true` (create_app sets it)
        self.traffic_log: Any = None  # the same writer, recording prompts (settings.traffic_log; opt-in)
        traffic = settings.traffic_log
        if traffic.path:
            self.traffic_log = DecisionLog(traffic.path, traffic.sample, keep=0, max_bytes=traffic.max_bytes,
                                           max_age_s=traffic.retention_days * 86400.0, file_mode=0o600)
        self._recorded_keys = frozenset(traffic.keys)
        self._recorded_namespaces = frozenset(traffic.namespaces)
        self.pools = pools
        self.admitter = admitter
        self.metrics = metrics
        from gateway.artifacts import ServingArtifacts

        # One snapshot, replaced whole by reload(); each request reads it once (see gateway/artifacts.py).
        self.artifacts = artifacts or ServingArtifacts(guard=guard, policy=policy, cascade_rule=cascade_rule)
        self._reload_lock = asyncio.Lock()
        self.store = store
        self._limiter_ping = limiter_ping
        self.guard_batcher: Any = None  # routers.batcher.Batcher: (guard, text) → classify_batch (start(), when on)
        self.router_batcher: Any = None  # ... (router, text) → score_batch
        self.num_deciding = 0  # requests between admission and their first Delta (in _decide_and_start)
        self._tasks: set[asyncio.Task] = set()
        self._pool_cfg = {p.name: p for p in settings.pools}.__getitem__  # name → PoolConfig, one lookup
        from gateway.accounting import Accounting

        nmodel_pools = getattr(policy, "pools", None)  # an N-model router's {model: (pool, cost)}
        self.accounting = Accounting(settings, metrics, admitter, self.budgets, self._background,
                                     auto_pools=[alias for alias, _ in nmodel_pools.values()] if nmodel_pools else None)
        self.default_max_tokens = min(settings.limits.default_max_tokens, settings.limits.max_completion_tokens)

    # The serving guard / policy / cascade rule: views of the current snapshot (a request uses the snapshot it
    # started with). Setting one (tests) replaces the snapshot with a copy that differs in it.

    @property
    def guard(self) -> GuardComponent | None:
        return self.artifacts.guard

    @guard.setter
    def guard(self, value: GuardComponent | None) -> None:
        self.artifacts = replace(self.artifacts, guard=value)

    @property
    def policy(self) -> PolicyComponent:
        return self.artifacts.policy

    @policy.setter
    def policy(self, value: PolicyComponent) -> None:
        self.artifacts = replace(self.artifacts, policy=value)

    @property
    def cascade_rule(self) -> CascadeRule | None:
        return self.artifacts.cascade_rule

    @cascade_rule.setter
    def cascade_rule(self, value: CascadeRule | None) -> None:
        self.artifacts = replace(self.artifacts, cascade_rule=value)

    # ------------------------------------------------------------------------------ lifecycle

    async def reload(self) -> dict[str, Any]:
        """Read the configured guard and router artifacts again (in a worker thread) and serve them from now
        on; requests already deciding or answering keep the snapshot they took. A load that fails keeps the
        old snapshot, logs why, and says so: ``{"reloaded": False, "error": ..., "serving": ...}``; success is
        ``{"reloaded": True, "serving": ..., "previous": ...}``. Reloads run one at a time (SIGHUP and
        ``POST /admin/reload`` share this)."""
        from gateway.artifacts import auto_pools, load_artifacts

        async with self._reload_lock:
            old = self.artifacts
            try:
                new = await asyncio.to_thread(load_artifacts, self.settings)
                if auto_pools(new.policy) != auto_pools(old.policy):
                    raise ValueError(f"the router now chooses among pools {auto_pools(new.policy)} instead of "
                                     f"{auto_pools(old.policy)}: restart the gateway to serve it")
            except Exception as e:  # noqa: BLE001 - any failure keeps the old artifacts serving
                error = str(e) if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {e}"
                log.error("artifact reload failed, still serving the previous artifacts: %s", error)
                self.metrics.child(self.metrics.artifact_reloads, "failed").inc()
                return {"reloaded": False, "error": error, "serving": old.describe()}
            self.artifacts = new  # one assignment: the swap
            self.metrics.child(self.metrics.artifact_reloads, "ok").inc()
            serving = new.describe()
            log.info("artifacts reloaded: router %s, guard %s", serving["router"], serving["guard"])
            return {"reloaded": True, "serving": serving, "previous": old.describe()}

    def reload_in_background(self) -> None:
        """``reload()`` as a task (a signal handler cannot await); its outcome is logged."""
        self._background(self.reload())

    @classmethod
    def build(cls, settings: Settings, *, backend_factory: Any = None, metrics: Metrics | None = None,
              embed: Any = None, resolver: Any = None) -> Pipeline:
        """The real components from settings. Loads artifacts (fast); pools start in ``start()``.
        ``backend_factory`` (PoolConfig, index) → Backend and ``embed`` (texts → unit vectors, for the
        example store) replace the real replicas / MiniLM (tests)."""
        import routers.features  # noqa: F401 - imported now, not on the first request
        from backends.pool import PoolSet
        from gateway import cascade as _cascade  # noqa: F401
        from gateway.admission import InProcessRateLimiter, RedisRateLimiter
        from gateway.artifacts import load_artifacts

        metrics = metrics or Metrics()
        pools = PoolSet.from_settings(settings, backend_factory=backend_factory,
                                      stat_logger_factory=metrics.engine.stat_logger, resolver=resolver)
        limiter = RedisRateLimiter(settings.redis_url) if settings.redis_url else InProcessRateLimiter()
        artifacts = load_artifacts(settings)  # ConfigError when the router's pools don't fit the settings
        store = None
        if settings.example_cache.enabled and settings.example_cache.top_k > 0:
            from gateway.example_cache import build_example_store

            store = build_example_store(settings, embed=embed)
        ping = limiter.ping if isinstance(limiter, RedisRateLimiter) else None
        from gateway.budget import Budgets

        return cls(settings, pools, admitter=Admitter(settings, limiter), metrics=metrics,
                   policy=artifacts.policy, store=store, limiter_ping=ping, budgets=Budgets(settings.redis_url),
                   artifacts=artifacts)

    def start_batchers(self) -> None:
        """The guard's and the router's batchers (``classifiers.batching``): each runs in a worker thread
        over the requests waiting for it. An item is (the request's guard or router, its text): a request
        keeps the artifacts of the snapshot it started with, so one batch may hold two snapshots' requests
        after a reload, and each artifact scores its own (``per_owner``)."""
        cfg = self.settings.classifiers
        if not cfg.batching or self.guard_batcher is not None or self.router_batcher is not None:
            return
        from routers.batcher import Batcher, per_owner

        opts = {"max_batch": cfg.max_batch, "max_wait_s": cfg.max_wait_ms / 1000}
        self.guard_batcher = Batcher(per_owner("classify_batch"), name="guard", **opts)
        self.router_batcher = Batcher(per_owner("score_batch"), name="router", **opts)

    async def start(self) -> None:
        self.start_batchers()
        if self.store is not None:  # first: example_cache.server_search = 'on' without it fails start-up fast
            await self.store.start()
        if any(p.kind == "local" for p in self.settings.pools):
            # Local replicas load in worker threads at the same time; importing transformers from two
            # threads at once can fail ("cannot import name ..."), so import it once here first.
            import transformers  # noqa: F401
            from transformers import AutoConfig, AutoTokenizer  # noqa: F401
        await self.pools.start()
        if self.traffic_log is not None:
            self._background(self._expire_traffic_log())
        for alias, replicas in self.pools.health().items():
            for name, ok in replicas.items():
                if not ok:
                    log.warning("pool %s: replica %s is not available after start-up", alias, name)
        self.metrics.read_at_scrape(self._scrape_values)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for batcher in (self.guard_batcher, self.router_batcher):
            if batcher is not None:  # queued requests are answered first; nothing new is accepted
                await asyncio.to_thread(batcher.close, 10.0)
        await self.pools.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        with contextlib.suppress(Exception):
            await self.admitter.limiter.close()
        with contextlib.suppress(Exception):
            await self.sessions.close()
        with contextlib.suppress(Exception):
            await self.budgets.close()
        self.decision_log.close()
        if self.traffic_log is not None:
            self.traffic_log.close()

    async def _expire_traffic_log(self) -> None:
        """Enforce the traffic log's retention on a quiet log too (writes enforce it as well)."""
        period = min(60.0, self.traffic_log.max_age_s / 20)
        while True:
            await asyncio.sleep(period)
            self.traffic_log.enforce_retention()

    def _scrape_values(self) -> dict[str, Any]:
        failures: dict[str, int] = {}
        limiter = self.admitter.limiter
        if hasattr(limiter, "num_failures"):
            failures["rate_limiter"] = limiter.num_failures
        if self.settings.redis_url:
            failures["budgets"] = self.budgets.num_failures
        if self.store is not None:
            stats = getattr(self.store, "stats", {}) or {}
            failures["example_cache"] = sum(int(stats.get(k, 0)) for k in ("redis_errors", "timeouts", "admit_failures"))
            values_cache = {k: v for k, v in stats.items() if isinstance(v, int | float)}
        else:
            values_cache = {}
        healthy = {alias: sum(1 for ok in replicas.values() if ok) for alias, replicas in self.pools.health().items()}
        pool_events = {alias: {k.removeprefix("num_"): v for k, v in vars(st).items()}
                       for alias, st in self.pools.stats().items()}
        batchers = {b.name: (b.num_batches, b.num_items) for b in (self.guard_batcher, self.router_batcher)
                    if b is not None}
        return {"redis_failures": failures, "healthy_replicas": healthy, "example_cache": values_cache,
                "pool_events": pool_events, "classifier_batches": batchers}

    async def readiness(self) -> dict[str, Any]:
        """{"ready", "status", "pools": {alias: {replica: bool}}, "redis": bool | None}.

        Ready while some traffic can be served: every pool has an available replica. Redis is an
        optimisation (the limiter and the example cache fail open), so Redis down is ``status: degraded``,
        still ready; a pool without a replica is ``status: unavailable``, not ready."""
        pools = self.pools.health()
        ready = all(any(r.values()) for r in pools.values())
        redis_ok: bool | None = None
        checks = []
        if self._limiter_ping is not None:
            checks.append(self._limiter_ping())
        if self.store is not None and self.settings.example_cache.backend == "redis":
            checks.append(self.store.health())
        if checks:
            results = await asyncio.gather(*checks, return_exceptions=True)
            redis_ok = all(r is True for r in results)
        status = "unavailable" if not ready else "degraded" if redis_ok is False else "ok"
        self.metrics.degraded.set(1.0 if status == "degraded" else 0.0)
        return {"ready": ready, "status": status, "pools": pools, "redis": redis_ok}

    def model_ids(self) -> list[str]:
        """The public aliases: every pool, and ``auto`` when there is a choice to route (``auto`` is accepted
        with one pool too, e.g. ``switchyard engine serve``, but not listed)."""
        pools = [p.name for p in self.settings.pools]
        return pools if len(pools) == 1 else ["auto", *pools]

    # ---------------------------------------------------------------------------- the request

    def resolve_model(self, model: str) -> str:
        """'auto', a pool alias, or a pool's model name → 'auto' or the alias (``Settings.resolve_model``);
        unknown → 404."""
        alias = self.settings.resolve_model(model)
        if alias is None:
            raise NotFound(f"The model {model!r} does not exist; available: {self.model_ids()}",
                           code="model_not_found", param="model")
        return alias

    async def run(self, job: Job, api_key: str | None) -> Execution:
        trace = Trace()
        if job.state is not None:
            job.state["trace"] = trace  # what was decided, for record() when the request fails on the way
        if self.tracing is not None:
            trace.spans = self.tracing.begin(job)  # gateway/tracing.py: ended by record()
        try:
            return await self._run(job, api_key, trace)
        except BaseException as e:
            if trace.spans is not None:
                trace.spans.error(e)
            raise

    async def _run(self, job: Job, api_key: str | None, trace: Trace) -> Execution:
        # [1] the model, resolved once; admission of the resolved pool (the key was checked at the edge)
        span = trace.spans and trace.spans.start("admission")
        requested = self.resolve_model(job.model)
        admission = await self.admitter.admit(api_key, requested)
        trace.namespace, trace.key_name = admission.namespace, admission.key_name
        if requested != "auto" and self._pool_cfg(requested).task != "generate":
            raise NotFound(f"Pool {requested!r} serves embeddings (POST /v1/embeddings), not generation.",
                           code="wrong_endpoint", param="model")
        self._check_limits(job)
        reservation = None
        if admission.max_budget_usd is not None:
            reservation = await self.accounting.reserve(admission, requested, _estimate_prompt_tokens(job),
                                                        job.sampling.max_tokens * job.n)
        if span:
            trace.spans.end(span, key=admission.key_name, model=requested)
        self.num_deciding += 1
        try:
            execution = await self._decide_and_start(job, admission, trace, requested)
        except BaseException:
            self.accounting.release(reservation, trace.cost_usd)  # nothing was answered
            raise
        finally:
            self.num_deciding -= 1
        execution.reservation = reservation
        return execution

    async def _decide_and_start(self, job: Job, admission: Admission, trace: Trace, requested: str) -> Execution:
        """Steps [2]-[7]: guard, policy, examples, pool and backend up to the first Delta. The serving
        artifacts are read once, here: a reload while this request runs does not change its guard, router or
        cascade rule."""
        arts = self.artifacts
        guard = arts.guard
        text, guard_text = self._routing_text(job, guard)
        session_key, session = None, None
        if job.session_id is not None and requested == "auto":  # the session's tier and examples (sessions.py)
            from gateway.sessions import SessionKey

            session_key = SessionKey(admission.namespace, job.session_id)
            session = await self.sessions.get(session_key)
        # [2] guard
        forced_pool = None
        if guard is None:
            trace.guard = "off"
        elif admission.guard_exempt:
            trace.guard = "exempt"
        else:
            span = trace.spans and trace.spans.start("guard")
            if self._on_loop(self.guard_batcher):
                verdict = guard.classify(guard_text)
            else:  # this request's guard (its snapshot's), batched with others'
                verdict = await self.guard_batcher.run((guard, guard_text))
            trace.guard = verdict.label
            if span:
                trace.spans.end(span, guard=verdict.label)
            self.metrics.child(self.metrics.guard, verdict.label).inc()
            if verdict.label != "domain":
                policy = self.settings.guard.ood if verdict.label == "ood" else self.settings.guard.unsafe
                code = "out_of_domain" if verdict.label == "ood" else "unsafe_content"
                if policy.action == "reject":
                    raise PolicyRejection(policy.message, code=code)
                if policy.action == "refuse":
                    return self._refusal(job, admission, trace, policy.message, text)
                if policy.action == "route":
                    forced_pool = policy.pool
        # [3] policy
        span = trace.spans and trace.spans.start("routing")
        if forced_pool is not None:
            trace.route, trace.pool, trace.reason = "guard", forced_pool, f"guard verdict {trace.guard}"
        elif requested != "auto":
            trace.route, trace.pool, trace.reason = "explicit", requested, "model named in the request"
        else:
            score = None  # the router runs only here: never for a request the guard's verdict ended
            if not self._on_loop(self.router_batcher) and arts.policy.needs_score(job.hint):
                score = float(await self.router_batcher.run((arts.policy.router, text)))
            decision = arts.policy.decide(text, job.hint, score=score)
            trace.route, trace.pool, trace.reason = decision.route, decision.pool, decision.reason
            trace.score, trace.threshold = decision.score, decision.threshold
            trace.scores, trace.tolerance = decision.scores, decision.tolerance
            llm = self.settings.routing.llm_pool
            if session is not None and self.settings.sessions.hold_tier and session.holds_llm and trace.pool != llm:
                trace.route, trace.pool = "session", llm
                trace.reason = "the session's tier holds: an earlier turn was answered by the LLM"
            self._route_for_capabilities(job, trace)
        self._check_capabilities(job, trace.pool)
        if span:
            trace.spans.end(span, route=trace.route, pool=trace.pool, score=trace.score, threshold=trace.threshold)
        # [4] example cache (only the SLM gets examples)
        messages = job.messages
        kept = session is not None and self.settings.sessions.keep_examples and bool(session.examples)
        if (kept and job.kind == "chat" and trace.route in _CASCADE_ROUTES
                and trace.pool == self.settings.routing.slm_pool):
            # the session's first examples again: this turn's prompt extends the last one's (prefix cache)
            trace.num_examples = len(session.example_ids)
            trace.example_ids = list(session.example_ids)
            messages = _with_examples(job.messages or [], session.examples)
        elif (self.store is not None and job.kind == "chat" and trace.route in _CASCADE_ROUTES
                and trace.pool == self.settings.routing.slm_pool and text):
            span = trace.spans and trace.spans.start("cache")
            try:
                trace.query_embedding = await self.store.embed(text)  # None: embedding failed (counted)
                examples = [] if trace.query_embedding is None else await self.store.lookup(
                    admission.namespace, text, self.settings.example_cache.top_k, embedding=trace.query_embedding)
                self.metrics.child(self.metrics.cache_lookups, "hit" if examples else "miss").inc()
            except Exception as e:  # noqa: BLE001 - the cache is an optimisation: never fail the request
                log.warning("example cache lookup failed: %r", e)
                self.metrics.child(self.metrics.cache_lookups, "error").inc()
                examples = []
            if span:
                trace.spans.end(span, num_examples=len(examples))
            if examples:
                from gateway.example_cache import format_examples

                trace.num_examples = len(examples)
                trace.example_ids = [e.id for e in examples]
                trace.example_similarity = examples[0].similarity
                trace.examples = format_examples(examples)
                messages = _with_examples(job.messages or [], trace.examples)
                keep_at = self.settings.example_cache.keep_on_slm_similarity
                if trace.route == "slm_then_escalate" and keep_at is not None and trace.example_similarity >= keep_at:
                    trace.route, trace.is_kept_on_slm = "slm", True
                    trace.reason = f"good examples found (similarity {trace.example_similarity:.3f} >= {keep_at})"
        # [5-7] pool → backend → cascade
        request = self._generation_request(job, trace.pool, messages, trace.namespace)
        cascade = self._cascade_applies(trace, arts.cascade_rule)
        try:
            if cascade:
                first, rest = await self._cascade(job, request, trace, arts.cascade_rule)
            else:
                first, rest = await self._start(self._timed(trace.pool, request, job.stream, trace), trace)
        except BackendError as e:
            raise from_backend_error(e, trace.pool) from None
        trace.overhead_s = time.perf_counter() - job.t_start - trace.backend_wait_s
        if session_key is not None:
            self._background(self._remember_session(session_key, session, trace))
        model_name = self._pool_cfg(trace.pool).model
        return Execution(self, job, admission, trace, model_name, first, rest, text)

    def _on_loop(self, batcher: Any) -> bool:
        """Whether a classifier runs here on the event loop rather than in its batcher's thread: without a
        batcher (classifiers.batching off), or — with classifiers.inline_when_alone — when this request is
        the only one deciding and the batcher is idle: there is nothing to batch it with, and a thread hop
        would only add its wake-ups (BENCHMARKS.md "Classifiers at gateway speed")."""
        if batcher is None:
            return True
        return self.settings.classifiers.inline_when_alone and self.num_deciding == 1 and batcher.is_idle

    async def _remember_session(self, key: Any, state: Any, trace: Trace) -> None:
        """After an ``auto`` turn of a session: the tier moves up when the LLM answered (routed or escalated),
        a held tier counts its turns down, the first examples are kept; written only when there is state."""
        from gateway.sessions import SessionState

        cfg = self.settings.sessions
        state = state or SessionState()
        if cfg.hold_tier and trace.pool == self.settings.routing.llm_pool:
            if trace.route != "session":
                state.tier, state.turns_left = "llm", cfg.hold_turns or -1
            elif state.turns_left > 0:
                state.turns_left -= 1
        if cfg.keep_examples and trace.examples and not state.examples:
            state.examples, state.example_ids = trace.examples, list(trace.example_ids)
        if state.tier or state.examples:
            await self.sessions.put(key, state)

    def _routing_text(self, job: Job, guard: GuardComponent | None) -> tuple[str, str]:
        """(the text router and cache read, the text the guard reads): one ``RequestText`` per request,
        cut to ``guard.max_context_chars`` and to the guard artifact's own budget."""
        max_chars = self.settings.guard.max_context_chars
        if job.messages is not None:
            from routers.text import RequestText

            turns = RequestText.of(job.messages)
            text = turns.text(max_chars)
            return text, (turns.text(guard.max_chars) if guard is not None else text)
        if isinstance(job.prompt, str):
            return job.prompt[-max_chars:], job.prompt[-max_chars:]
        return "", ""

    def _check_limits(self, job: Job) -> None:
        limits = self.settings.limits
        n = job.sampling.n
        if n > limits.max_n:
            raise InvalidRequest(f"n = {n} is above the limit {limits.max_n}", param="n")
        if job.sampling.max_tokens > limits.max_completion_tokens:
            raise InvalidRequest(f"max_tokens = {job.sampling.max_tokens} is above the limit "
                                 f"{limits.max_completion_tokens}", param="max_tokens")
        num = _estimate_prompt_tokens(job)
        if num > limits.max_prompt_tokens:
            raise InvalidRequest(f"The prompt is about {num} tokens, above the limit of {limits.max_prompt_tokens}.",
                                 code="context_length_exceeded", param=job.input_param if job.messages else "prompt")

    def _route_for_capabilities(self, job: Job, trace: Trace) -> None:
        """An auto-routed request that needs tools, JSON mode or images goes to the LLM pool when only it can
        serve them (local pools always serve tools and JSON mode, never images); when the LLM pool cannot
        either, ``_check_capabilities`` answers 400."""
        if not (job.tools or self._wants_json(job) or job.has_images):
            return
        llm = self.settings.routing.llm_pool
        if trace.pool != llm and not self._can_serve(job, trace.pool) and self._can_serve(job, llm):
            trace.route, trace.pool = "llm", llm
            trace.reason = "tools / response_format / images need the LLM pool"

    @staticmethod
    def _wants_json(job: Job) -> bool:
        return bool(job.response_format) and job.response_format.get("type") in ("json_object", "json_schema")

    def _can_serve(self, job: Job, alias: str) -> bool:
        cfg = self._pool_cfg(alias)
        if job.tools and not cfg.serves_tools:
            return False
        if job.has_images and not cfg.serves_images:
            return False
        return not (self._wants_json(job) and not cfg.serves_json)

    def _check_capabilities(self, job: Job, alias: str) -> None:
        cfg = self._pool_cfg(alias)
        if job.has_images and not cfg.serves_images:
            vision = [p.name for p in self.settings.pools if p.serves_images and p.task == "generate"]
            hint = (f"pools that take images: {', '.join(vision)}" if vision
                    else "no pool takes images: set supports_vision on a remote pool that serves a vision model")
            raise InvalidRequest(f"Pool {alias!r} does not accept image input in {job.input_param} ({hint}).",
                                 code="image_input_not_supported", param=job.input_param)
        if job.tools and not cfg.serves_tools:
            raise InvalidRequest(f"Pool {alias!r} does not support tools / tool_choice "
                                 f"(set supports_tools on a remote pool).", code="tools_not_supported", param="tools")
        if self._wants_json(job) and not cfg.serves_json:
            raise InvalidRequest(f"Pool {alias!r} does not support response_format "
                                 f"{job.response_format.get('type')!r} (supports_json_mode is false).",
                                 code="response_format_not_supported", param="response_format")

    def _cascade_applies(self, trace: Trace, rule: CascadeRule | None) -> bool:
        if rule is None or trace.pool != self.settings.routing.slm_pool or trace.is_kept_on_slm:
            return False
        if trace.route == "slm_then_escalate":
            return True
        return trace.route == "slm" and self.settings.routing.cascade.stream_mode == "buffer"

    def _generation_request(self, job: Job, alias: str, messages: list[dict[str, Any]] | None,
                            namespace: str) -> GenerationRequest:
        deadline = time.monotonic() + self.settings.limits.request_timeout_s
        return GenerationRequest(
            request_id=job.request_id, model=self._pool_cfg(alias).model,
            messages=messages if job.kind == "chat" else None, prompt=job.prompt if job.kind == "completion" else None,
            sampling=job.sampling, tools=job.tools, tool_choice=job.tool_choice,
            response_format=job.response_format, user=job.user, deadline=deadline, priority=job.priority,
            parallel_tool_calls=job.parallel_tool_calls,
            trace_headers=self._trace_headers(job, alias) if job.correlation_id is not None else {},
            chat_template_kwargs=job.chat_template_kwargs,
            session_id=job.session_id, program_id=job.program_id, namespace=namespace,
        )

    def _trace_headers(self, job: Job, alias: str) -> dict[str, str]:
        """For a remote pool: ``x-request-id`` and a ``traceparent`` whose parent is this gateway hop (the
        client's trace id when it sent one, else a new trace)."""
        if self._pool_cfg(alias).kind != "remote" or job.correlation_id is None:
            return {}
        trace_id, flags = ((job.traceparent[3:35], job.traceparent[53:55]) if job.traceparent
                           else (secrets.token_hex(16), "01"))
        return {"x-request-id": job.correlation_id, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"}

    async def _timed(self, alias: str, request: GenerationRequest, stream: bool, trace: Trace) -> AsyncIterator[Delta]:
        """The pool's Delta stream; time spent waiting on it is added to ``trace.backend_wait_s``."""
        agen = self.pools.get(alias).generate(request, stream=stream)
        if trace.spans is not None:
            agen = trace.spans.backend(agen, alias, request.model)
        try:
            while True:
                t = time.perf_counter()
                try:
                    delta = await agen.__anext__()
                except StopAsyncIteration:
                    return
                except (BackendError, asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as e:  # a bug in a backend must not look like a gateway bug (500)
                    log.exception("pool %s: backend raised %s", alias, type(e).__name__)
                    raise BackendError(f"backend failed: {type(e).__name__}: {e}", retryable=False,
                                       status_code=502, code="backend_error") from e
                finally:
                    trace.backend_wait_s += time.perf_counter() - t
                yield delta
        finally:
            await agen.aclose()

    async def _start(self, deltas: AsyncIterator[Delta], trace: Trace) -> tuple[Delta | None, AsyncIterator[Delta]]:
        """Wait for the first Delta, so failures before it become HTTP errors."""
        try:
            first = await deltas.__anext__()
        except StopAsyncIteration:
            return None, deltas
        except BaseException:
            await deltas.aclose()
            raise
        return first, deltas

    async def _collect(self, alias: str, request: GenerationRequest, trace: Trace) -> list[Delta]:
        return [d async for d in self._timed(alias, request, False, trace)]

    async def _cascade(self, job: Job, request: GenerationRequest, trace: Trace,
                       rule: CascadeRule) -> tuple[Delta | None, AsyncIterator[Delta]]:
        """Produce the SLM answer, judge it (``CascadeRule.judge``), then replay it or start the LLM's."""
        slm, llm = self.settings.routing.slm_pool, self.settings.routing.llm_pool
        judged = replace(request, sampling=replace(request.sampling, logprobs=request.sampling.logprobs or 0))
        escalate, reason = False, ""
        try:
            deltas = await self._collect(slm, judged, trace)
        except BackendError as e:
            if e.status_code < 500 and e.code != "no_healthy_replica":
                raise
            escalate, reason, deltas = True, f"SLM failed ({e.code or e.status_code})", []
        if not escalate:
            trace.judged = True
            self.metrics.cascade_judged.inc()
            unsure = rule.judge(deltas, job.tools)
            escalate, reason = unsure is not None, unsure or ""
        if self.store is not None and trace.example_ids:
            trace.judged = True
            self._background(self.store.feedback(trace.namespace, trace.example_ids, escalate))
        if not escalate:
            if job.sampling.logprobs is None:
                deltas = _strip_logprobs(deltas)
            return await self._start(_replay(deltas), trace)
        usage = next((d.usage for d in reversed(deltas) if d.usage is not None), None)
        if usage is not None:
            trace.cost_usd += self._pool_cfg(slm).price.cost_usd(usage.prompt_tokens, usage.completion_tokens)
        self.metrics.escalations.inc()
        trace.escalated, trace.pool, trace.reason = True, llm, reason
        self._check_capabilities(job, llm)
        llm_request = self._generation_request(job, llm, job.messages, trace.namespace)
        llm_request.deadline = request.deadline
        return await self._start(self._timed(llm, llm_request, job.stream, trace), trace)

    def _refusal(self, job: Job, admission: Admission, trace: Trace, message: str, text: str) -> Execution:
        trace.route, trace.pool, trace.reason = "policy", "policy", f"guard verdict {trace.guard}: refused"
        trace.overhead_s = time.perf_counter() - job.t_start
        finish = "content_filter" if trace.guard == "unsafe" else "stop"
        deltas = [Delta(index=i, text=message, finish_reason=finish, is_final=(i == job.n - 1),
                        usage=Usage(0, 0) if i == job.n - 1 else None) for i in range(job.n)]
        return Execution(self, job, admission, trace, "switchyard-policy", deltas[0], _replay(deltas[1:]), text)

    # ------------------------------------------------------------------------------ bookkeeping

    def finish(self, outcome: Outcome) -> None:
        """[11] Called once per answer that ended normally: accounting, then what the example cache learns."""
        self.accounting.charge(outcome)
        trace, job = outcome.trace, outcome.job
        if (self.store is not None and job.kind == "chat" and trace.pool == self.settings.routing.llm_pool
                and outcome.finish_reason == "stop" and outcome.request_text
                and trace.guard in ("domain", "off", "exempt")):
            self._background(self._admit_example(outcome.admission.namespace, outcome.request_text, outcome.answer,
                                                 trace.pool, trace.query_embedding))
        if self.store is not None and trace.example_ids and not trace.judged:
            self._background(self.store.feedback(trace.namespace, trace.example_ids, False))

    async def _admit_example(self, namespace: str, text: str, answer: str, pool: str, embedding: Any = None) -> None:
        """Offer an LLM answer to the example store; the metric counts only answers it kept. ``embedding``:
        the lookup's vector of the same text (escalated requests), so the text is not embedded twice."""
        if await self.store.admit(namespace, text, answer, pool, "stop", guard_ok=True, embedding=embedding):
            self.metrics.cache_admits.inc()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %r", task.exception())

    def record(self, *, route: str, model: str, status: int, t_start: float, overhead_s: float | None,
               execution: Execution | None = None, scope: dict[str, Any] | None = None) -> None:
        """Count one finished request (metrics), write its decision-log record and end its spans: exactly once
        per request. A request that failed inside ``run`` has no ``execution``: its record takes the guard
        verdict and router score from the Trace ``run`` left in the scope state, when it got that far. An
        answered ``auto`` request of a key or namespace named in ``traffic_log`` may also be recorded."""
        latency_s = time.perf_counter() - t_start
        self.metrics.record_request(route=route, model=model, status=status, latency_s=latency_s,
                                    overhead_s=overhead_s)
        if self.traffic_log is not None and execution is not None and status == 200:
            self._record_traffic(execution, scope)
        state = (scope or {}).get("state") or {}
        entry: dict[str, Any] = {
            "request_id": state.get("request_id"),
            "endpoint": (scope or {}).get("path"), "status": status, "route": route, "pool": model,
            "latency_ms": round(latency_s * 1000, 3),
            "overhead_ms": None if overhead_s is None else round(overhead_s * 1000, 3)}
        if execution is not None:
            trace, usage = execution.trace, execution.usage
            if trace.scores is not None:
                entry["scores"] = trace.scores
            entry.update(key=execution.admission.key_name, score=trace.score, threshold=trace.threshold,
                         guard=trace.guard, escalated=trace.escalated, num_examples=trace.num_examples,
                         prompt_tokens=usage.prompt_tokens if usage else None,
                         completion_tokens=usage.completion_tokens if usage else None,
                         cost_usd=round(trace.cost_usd, 10))
        else:
            trace = state.get("trace")
            if trace is not None:  # refused on the way (guard, limits, budget, backend): what was decided
                if trace.key_name is not None:
                    entry["key"] = trace.key_name
                if trace.guard != "off":
                    entry["guard"] = trace.guard
                if trace.score is not None:
                    entry.update(score=trace.score, threshold=trace.threshold)
        self.decision_log.write(entry)
        if trace is not None and trace.spans is not None:
            trace.spans.finish(status, entry)

    def _record_traffic(self, execution: Execution, scope: dict[str, Any] | None) -> None:
        """One traffic-log line (``switchyard label --from-log`` reads it): ``ts``, ``request_id``, ``key``,
        ``namespace``, ``endpoint``, ``route``, ``pool``, ``score``, ``threshold``, ``escalated`` and
        ``prompt`` — the request text the router read. Only ``auto`` requests are recorded: they are the ones
        a router decides, and the labeller's own calls (pools named explicitly) never loop back."""
        trace, admission = execution.trace, execution.admission
        if trace.route not in _AUTO_ROUTES or not execution.request_text:
            return
        if admission.key_name not in self._recorded_keys and admission.namespace not in self._recorded_namespaces:
            return
        entry = {"request_id": ((scope or {}).get("state") or {}).get("request_id"), "key": admission.key_name,
                 "namespace": admission.namespace, "endpoint": (scope or {}).get("path"), "route": trace.route,
                 "pool": trace.pool, "score": trace.score, "threshold": trace.threshold,
                 "escalated": trace.escalated, "prompt": execution.request_text}
        if self.traffic_log.write(entry):
            self.metrics.traffic_logged.inc()


def _with_examples(messages: list[dict[str, Any]], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Examples go after the leading system/developer messages, before the conversation."""
    i = 0
    while i < len(messages) and messages[i].get("role") in ("system", "developer"):
        i += 1
    return [*messages[:i], *examples, *messages[i:]]


__all__ = ["Execution", "GatewayError", "Job", "Pipeline", "Trace"]
