"""The request path, short and literal (DESIGN.md):

    [1] model, admission, budget → [2] session → [3] request text → [4] guard → [5] policy → [6] examples
    → [7-8] pool, backend → [9] cascade (gateway/cascade.py) → Decision → [10] (stream) → [11] finish(Outcome):
    accounting, example-cache admit → record: metrics, decision log, spans

``Pipeline.run(job, credentials)`` does everything up to and including the first Delta, so that every
error a client should see as an HTTP status (403/404/429/400 policy/503/504; 401 is the edge's) is raised
*before* any byte is sent. Each step returns its own small type (``gateway/decision.py``: ``GuardAction``,
``RouteDecision``, ``Examples``, ``Started``); the ``Decision`` the headers, the ``switchyard`` body field and
the decision log read is built from them once. ``run`` returns an ``Execution``: that decision and the Delta
stream, whose normal end hands an ``Outcome`` to ``finish`` (``gateway/accounting.py`` books it; the example
cache learns). Components are built by ``gateway/wiring.py`` and reached through the small Protocols below (a
fake of each serves the tests). With ``opentelemetry: true`` each stage opens and ends a span through the
request's ``RequestSpans`` (``gateway/tracing.py``); otherwise each hook is one ``None`` check.

Cascade mechanics (which requests are judged, escalation) live in ``gateway/cascade.py``; start-up, reload,
readiness, scrape values and background work in ``gateway/lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from backends.base import BackendError, Delta, GenerationRequest, SamplingParams, Usage
from backends.types import num_image_parts
from gateway.admission import Admission, Admitter
from gateway.budget import Budgets
from gateway.cascade import Cascade, replay, start
from gateway.decision import (
    GUARD_EXEMPT,
    GUARD_OFF,
    NO_EXAMPLES,
    Decision,
    Examples,
    GuardAction,
    Meter,
    Started,
    round_to,
)
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PolicyRejection,
    from_backend_error,
)
from gateway.lifecycle import Background
from gateway.metrics import Metrics
from gateway.settings import Settings
from routers.policy import RouteDecision
from routers.text import content_text

if TYPE_CHECKING:
    from gateway.artifacts import ServingArtifacts
    from gateway.cascade import CascadeRule
    from gateway.decision_log import DecisionLog
    from gateway.example_cache.types import ExampleStore
    from gateway.sessions import SessionStore

log = logging.getLogger("switchyard.pipeline")

# Cascade judge needs token logprobs from the SLM even when the caller did not ask for them.
_CASCADE_ROUTES = ("slm", "slm_then_escalate")
_AUTO_ROUTES = frozenset({"slm", "slm_then_escalate", "llm", "session"})  # decided for model "auto"
IMAGE_TOKENS_ESTIMATE = 765  # prompt tokens one image counts for in the prompt-length limit (OpenAI: 1024², high)


class _RequestIds:
    """Job ids (32 hex digits): a random prefix drawn once per process, then a counter — unique across
    processes and restarts like uuid4, at a fraction of its cost. A forked child draws its own prefix."""

    def __init__(self) -> None:
        self._prefix = ""
        self._num = 0

    def __call__(self) -> str:
        if not self._prefix:
            self._prefix = secrets.token_hex(8)
            os.register_at_fork(after_in_child=self._forget)
        self._num += 1
        return f"{self._prefix}{self._num:016x}"

    def _forget(self) -> None:
        self._prefix = ""


_REQUEST_IDS = _RequestIds()
# Trace and span ids: random, not secret (OpenTelemetry's RandomIdGenerator draws them the same way); all-zero
# ids are invalid in W3C trace context.
_random_bits = random.getrandbits


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
    state: dict[str, Any] | None = None  # the request's scope state: ``run`` leaves its steps' results for ``record``
    request_id: str = field(default_factory=_REQUEST_IDS)
    t_start: float = field(default_factory=time.perf_counter)
    num_images: int = field(init=False)  # image parts (image_url) in the messages: only some pools take them

    def __post_init__(self) -> None:
        self.num_images = num_image_parts(self.messages)

    @property
    def n(self) -> int:
        return self.sampling.n

    @property
    def has_images(self) -> bool:
        return self.num_images > 0


@dataclass(slots=True)
class Outcome:
    """A request whose answer ended normally: what ``Pipeline.finish`` books and learns from."""

    job: Job
    admission: Admission
    decision: Decision
    judged: bool  # the cascade judged the SLM's answer (its examples have had their feedback)
    meter: Meter  # ``Accounting.charge`` adds the answer's cost to ``meter.cost_usd``
    usage: Usage
    finish_reason: str | None  # choice 0's
    answer: str  # choice 0's text
    request_text: str  # what guard / router / cache saw
    reservation: Any = None  # gateway.budget.Reservation


class Execution:
    """A request past its first Delta: its ``decision`` and its Delta stream. Iterate ``deltas()`` once;
    its normal end hands an ``Outcome`` to ``Pipeline.finish``; afterwards ``usage`` and ``meter`` are final."""

    def __init__(self, pipeline: Pipeline, job: Job, admission: Admission, decision: Decision, model_name: str,
                 started: Started, text: str, *, meter: Meter, spans: Any = None) -> None:
        self.pipeline = pipeline
        self.job = job
        self.admission = admission
        self.decision = decision
        self.model_name = model_name
        self.meter = meter
        self.spans = spans  # gateway.tracing.RequestSpans when `opentelemetry: true`; ended by record()
        self.usage: Usage | None = None
        self._first = started.first
        self._rest: AsyncIterator[Delta] | None = started.rest
        self._judged = started.judged
        self._text = text  # what guard / router / cache saw
        self._answer: list[str] = []
        self._finish_reason: str | None = None
        self._num_deltas = 0
        self.reservation: Any = None  # gateway.budget.Reservation, settled by finish()

    @property
    def request_text(self) -> str:
        """What guard / router / cache read of this request (``routers.text.RequestText``)."""
        return self._text

    @property
    def overhead_s(self) -> float | None:
        return self.meter.overhead_s

    def info(self) -> dict[str, Any]:
        """The response's ``switchyard`` field."""
        return self.decision.info(self.meter)

    def headers(self, *, with_cost: bool) -> dict[str, str]:
        """The ``x-switchyard-*`` response headers (the cost once the answer is complete)."""
        return self.decision.headers(self.meter, with_cost=with_cost)

    async def deltas(self) -> AsyncIterator[Delta]:
        try:
            if self._first is not None:
                self._see(self._first)
                yield self._first
            if self._rest is not None:
                async for delta in self._rest:
                    self._see(delta)
                    yield delta
        finally:
            await self.aclose()
        meter = self.meter
        if self.job.stream is False and meter.overhead_s is not None:
            meter.overhead_s = time.perf_counter() - self.job.t_start - meter.backend_wait_s
        self.pipeline.finish(Outcome(
            job=self.job, admission=self.admission, decision=self.decision,
            judged=self._judged, meter=meter, usage=self.usage or Usage(0, self._num_deltas),
            finish_reason=self._finish_reason, answer="".join(self._answer), request_text=self._text,
            reservation=self.reservation))

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
    """Built once per app by ``gateway/wiring.py`` (``build_pipeline``), which makes the real components;
    the Pipeline only receives them (tests pass fakes through the same constructor)."""

    def __init__(self, settings: Settings, *, pools: PoolsComponent, admitter: Admitter, metrics: Metrics,
                 artifacts: ServingArtifacts, sessions: SessionStore, decision_log: DecisionLog,
                 budgets: Budgets | None = None, store: ExampleStore | None = None,
                 traffic_log: DecisionLog | None = None, background: Background | None = None) -> None:
        from gateway.accounting import Accounting
        from gateway.artifacts import auto_pools

        self.settings = settings
        self.pools = pools
        self.admitter = admitter
        self.metrics = metrics
        # One snapshot, replaced whole by reload(); each request reads it once (see gateway/artifacts.py).
        self.artifacts = artifacts
        self.sessions = sessions
        self.budgets = budgets or Budgets(None)
        self.store = store
        self.decision_log = decision_log  # the latest records always (the /ui dashboard); lines when configured
        self.traffic_log = traffic_log  # the same writer, recording prompts (settings.traffic_log; opt-in)
        self.tracing: Any = None  # gateway.tracing.Tracing when `opentelemetry: true` (create_app sets it)
        self._recorded_keys = frozenset(settings.traffic_log.keys)
        self._recorded_namespaces = frozenset(settings.traffic_log.namespaces)
        self.background = background or Background()  # after-the-answer work; cancelled by Lifecycle.close
        self.guard_batcher: Any = None  # routers.batcher.Batcher: (guard, text) → classify_batch (Lifecycle, when on)
        self.router_batcher: Any = None  # ... (router, text) → score_batch
        self.num_deciding = 0  # requests between admission and their first Delta (in _decide_and_start)
        self._pool_cfg = {p.name: p for p in settings.pools}.__getitem__  # name → PoolConfig, one lookup
        self.cascade = Cascade(settings.routing, metrics, self._pool_cfg)
        self.accounting = Accounting(settings, metrics, admitter, self.budgets, self.background,
                                     auto_pools=auto_pools(artifacts.policy))
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
        """Steps [1]-[9] up to the first Delta. What a request got to is left in its scope state
        (``admission``, ``guard``, ``route``, ``spans``), so that ``record`` can log a request that fails on
        the way."""
        spans = self.tracing.begin(job) if self.tracing is not None else None  # ended by record()
        if job.state is not None:
            job.state["spans"] = spans
        try:
            return await self._run(job, api_key, spans)
        except BaseException as e:
            if spans is not None:
                spans.error(e)
            raise

    async def _run(self, job: Job, api_key: str | None, spans: Any) -> Execution:
        # [1] the model, resolved once; admission of the resolved pool (the key was checked at the edge)
        span = spans and spans.start("admission")
        requested = self.resolve_model(job.model)
        admission = await self.admitter.admit(api_key, requested)
        if job.state is not None:
            job.state["admission"] = admission
        if requested != "auto" and self._pool_cfg(requested).task != "generate":
            raise NotFound(f"Pool {requested!r} serves embeddings (POST /v1/embeddings), not generation.",
                           code="wrong_endpoint", param="model")
        num_prompt_tokens = self._check_limits(job)
        reservation = None
        if admission.max_budget_usd is not None:
            reservation = await self.accounting.reserve(admission, requested, num_prompt_tokens,
                                                        job.sampling.max_tokens * job.n)
        if span:
            spans.end(span, key=admission.key_name, model=requested)
        meter = Meter()
        self.num_deciding += 1
        try:
            execution = await self._decide_and_start(job, admission, requested, meter, spans)
        except BaseException:
            self.accounting.release(reservation, meter.cost_usd)  # nothing was answered
            raise
        finally:
            self.num_deciding -= 1
        execution.reservation = reservation
        return execution

    async def _decide_and_start(self, job: Job, admission: Admission, requested: str, meter: Meter,
                                spans: Any) -> Execution:
        """Steps [2]-[9]: session, guard, policy, examples, pool and backend up to the first Delta; each step
        returns its own small type, and the ``Decision`` is built from them at the end. The serving artifacts
        are read once, here: a reload while this request runs does not change its guard, router or cascade
        rule."""
        arts = self.artifacts
        session_key, session = await self._session(job, admission, requested)  # [2]
        text, guard_text = self._routing_text(job, requested, arts.guard)  # [3]
        guard = await self._guard(arts.guard, guard_text, admission, spans)  # [4]
        if job.state is not None:
            job.state["guard"] = guard
        if guard.action == "reject":
            raise PolicyRejection(guard.message, code="out_of_domain" if guard.label == "ood" else "unsafe_content")
        if guard.action == "refuse":
            return self._refusal(job, admission, guard, text, meter, spans)
        route = await self._route(job, arts.policy, requested, guard, text, session, spans)  # [5]
        if job.state is not None:
            job.state["route"] = route
        examples = await self._examples(job, admission, route, text, session, spans)  # [6]
        if examples.keeps_on_slm:
            route = replace(route, route="slm", reason=f"good examples found (similarity "
                            f"{examples.similarity:.3f} >= {self.settings.example_cache.keep_on_slm_similarity})")
        messages = _with_examples(job.messages or [], examples.messages) if examples.messages else job.messages
        request = self._generation_request(job, route.pool, messages, admission.namespace)  # [7-9] pool → backend → cascade
        try:
            if self.cascade.applies(route, examples, arts.cascade_rule):  # [9]
                started = await self._cascade(job, admission.namespace, request, examples, arts.cascade_rule, meter,
                                              spans)
            else:
                started = await start(self._timed(route.pool, request, job.stream, meter, spans), route.pool)
        except BackendError as e:
            raise from_backend_error(e, route.pool) from None
        meter.overhead_s = time.perf_counter() - job.t_start - meter.backend_wait_s
        decision = Decision.of(guard, route, examples, started)
        if session_key is not None:
            self.background(self._remember_session(session_key, session, decision))
        return Execution(self, job, admission, decision, self._pool_cfg(started.pool).model, started, text,
                         meter=meter, spans=spans)

    async def _session(self, job: Job, admission: Admission, requested: str) -> tuple[Any, Any]:
        """[2] (its key, its state) for an ``auto`` request of a session: the tier that holds and the examples
        kept (``gateway/sessions.py``); (None, None) otherwise. The state is None for a new session."""
        if job.session_id is None or requested != "auto":
            return None, None
        from gateway.sessions import SessionKey

        key = SessionKey(admission.namespace, job.session_id)
        return key, await self.sessions.get(key)

    async def _guard(self, guard: GuardComponent | None, text: str, admission: Admission, spans: Any) -> GuardAction:
        """[4] The guard's verdict on the request text and the action the settings give it."""
        if guard is None:
            return GUARD_OFF
        if admission.guard_exempt:
            return GUARD_EXEMPT
        span = spans and spans.start("guard")
        if self._on_loop(self.guard_batcher):
            label = guard.classify(text).label
        else:  # this request's guard (its snapshot's), batched with others'
            label = (await self.guard_batcher.run((guard, text))).label
        if span:
            spans.end(span, guard=label)
        self.metrics.adder(self.metrics.guard, label)(1)
        if label == "domain":
            return GuardAction(label)
        policy = self.settings.guard.ood if label == "ood" else self.settings.guard.unsafe
        if policy.action in ("reject", "refuse"):
            return GuardAction(label, policy.action, message=policy.message)
        if policy.action == "route":
            return GuardAction(label, "route", pool=policy.pool)
        return GuardAction(label)

    async def _route(self, job: Job, policy: PolicyComponent, requested: str, guard: GuardAction, text: str,
                     session: Any, spans: Any) -> RouteDecision:
        """[5] Where the request goes: the guard's pool, the pool it named, or — for ``auto`` — the policy's
        choice (the router runs only here), held on the LLM by its session, moved to the LLM when only it
        serves the tools / JSON mode asked for. Raises 400 when the pool cannot serve them."""
        span = spans and spans.start("routing")
        if guard.action == "route":
            route = RouteDecision("guard", guard.pool, None, None, f"guard verdict {guard.label}")
        elif requested != "auto":
            route = RouteDecision("explicit", requested, None, None, "model named in the request")
        else:
            score = None
            if not self._on_loop(self.router_batcher) and policy.needs_score(job.hint):
                score = float(await self.router_batcher.run((policy.router, text)))
            route = policy.decide(text, job.hint, score=score)
            llm = self.settings.routing.llm_pool
            if session is not None and self.settings.sessions.hold_tier and session.holds_llm and route.pool != llm:
                route = replace(route, route="session", pool=llm,
                                reason="the session's tier holds: an earlier turn was answered by the LLM")
            if ((job.tools or self._wants_json(job) or job.has_images) and route.pool != llm
                    and not self._can_serve(job, route.pool) and self._can_serve(job, llm)):
                # local pools always serve tools and JSON mode, never images; when the LLM pool cannot serve
                # them either, _check_capabilities answers 400
                route = replace(route, route="llm", pool=llm, reason="tools / response_format / images need the LLM pool")
        self._check_capabilities(job, route.pool)
        if span:
            spans.end(span, route=route.route, pool=route.pool, score=route.score, threshold=route.threshold)
        return route

    async def _examples(self, job: Job, admission: Admission, route: RouteDecision, text: str, session: Any,
                        spans: Any) -> Examples:
        """[6] In-context examples for a chat request routed to the SLM: the session's first ones again (this
        turn's prompt then extends the last one's: prefix cache), else the store's most similar answers. A
        miss, an embedding failure or a store error is ``NO_EXAMPLES``: the cache never fails a request."""
        if (job.kind != "chat" or route.route not in _CASCADE_ROUTES
                or route.pool != self.settings.routing.slm_pool):
            return NO_EXAMPLES
        if session is not None and self.settings.sessions.keep_examples and session.examples:
            return Examples(messages=tuple(session.examples), ids=tuple(session.example_ids))
        if self.store is None or not text:
            return NO_EXAMPLES
        span = spans and spans.start("cache")
        embedding = found = None
        try:
            embedding = await self.store.embed(text)  # None: embedding failed (counted)
            found = [] if embedding is None else await self.store.lookup(
                admission.namespace, text, self.settings.example_cache.top_k, embedding=embedding)
            self.metrics.child(self.metrics.cache_lookups, "hit" if found else "miss").inc()
        except Exception as e:  # noqa: BLE001 - the cache is an optimisation: never fail the request
            log.warning("example cache lookup failed: %r", e)
            self.metrics.child(self.metrics.cache_lookups, "error").inc()
            found = []
        if span:
            spans.end(span, num_examples=len(found))
        if not found:
            return Examples(query_embedding=embedding) if embedding is not None else NO_EXAMPLES
        from gateway.example_cache import format_examples

        keep_at = self.settings.example_cache.keep_on_slm_similarity
        similarity = found[0].similarity
        return Examples(messages=tuple(format_examples(found)), ids=tuple(e.id for e in found),
                        similarity=similarity, query_embedding=embedding,
                        keeps_on_slm=(route.route == "slm_then_escalate" and keep_at is not None
                                      and similarity >= keep_at))

    def _on_loop(self, batcher: Any) -> bool:
        """Whether a classifier runs here on the event loop rather than in its batcher's thread: without a
        batcher (classifiers.batching off), or — with classifiers.inline_when_alone — when this request is
        the only one deciding and the batcher is idle: there is nothing to batch it with, and a thread hop
        would only add its wake-ups (BENCHMARKS.md "Classifiers at gateway speed")."""
        if batcher is None:
            return True
        return self.settings.classifiers.inline_when_alone and self.num_deciding == 1 and batcher.is_idle

    async def _remember_session(self, key: Any, state: Any, decision: Decision) -> None:
        """After an ``auto`` turn of a session: the tier moves up when the LLM answered (routed or escalated),
        a held tier counts its turns down, the first examples are kept; written only when there is state."""
        from gateway.sessions import SessionState

        cfg = self.settings.sessions
        state = state or SessionState()
        if cfg.hold_tier and decision.pool == self.settings.routing.llm_pool:
            if decision.route != "session":
                state.tier, state.turns_left = "llm", cfg.hold_turns or -1
            elif state.turns_left > 0:
                state.turns_left -= 1
        examples = decision.examples
        if cfg.keep_examples and examples.messages and not state.examples:
            state.examples, state.example_ids = list(examples.messages), list(examples.ids)
        if state.tier or state.examples:
            await self.sessions.put(key, state)

    def _routing_text(self, job: Job, requested: str, guard: GuardComponent | None) -> tuple[str, str]:
        """[3] (the text router and cache read, the text the guard reads): one ``RequestText`` per request,
        cut to ``guard.max_context_chars`` and to the guard artifact's own budget. ("", "") for a request to a
        named pool with no guard and no example cache: nothing would read it (the traffic log records
        ``auto`` requests only)."""
        if guard is None and requested != "auto" and self.store is None:
            return "", ""
        max_chars = self.settings.guard.max_context_chars
        if job.messages is not None:
            from routers.text import RequestText

            turns = RequestText.of(job.messages)
            text = turns.text(max_chars)
            return text, (turns.text(guard.max_chars) if guard is not None else text)
        if isinstance(job.prompt, str):
            return job.prompt[-max_chars:], job.prompt[-max_chars:]
        return "", ""

    def _check_limits(self, job: Job) -> int:
        """400 when ``n``, ``max_tokens`` or the estimated prompt length is over its limit; else that estimate."""
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
        return num

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
                           else (f"{_random_bits(128) or 1:032x}", "01"))
        return {"x-request-id": job.correlation_id, "traceparent": f"00-{trace_id}-{_random_bits(64) or 1:016x}-{flags}"}

    async def _timed(self, alias: str, request: GenerationRequest, stream: bool, meter: Meter,
                     spans: Any) -> AsyncIterator[Delta]:
        """The pool's Delta stream; time spent waiting on it is added to ``meter.backend_wait_s``."""
        agen = self.pools.get(alias).generate(request, stream=stream)
        if spans is not None:
            agen = spans.backend(agen, alias, request.model)
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
                    meter.backend_wait_s += time.perf_counter() - t
                yield delta
        finally:
            await agen.aclose()

    async def _cascade(self, job: Job, namespace: str, request: GenerationRequest, examples: Examples,
                       rule: CascadeRule, meter: Meter, spans: Any) -> Started:
        """[9] The SLM answer judged by ``rule``, then replayed or replaced by the LLM's (``Cascade.run``)."""
        llm = self.cascade.llm

        def llm_request() -> GenerationRequest:
            self._check_capabilities(job, llm)
            return self._generation_request(job, llm, job.messages, namespace)

        def feedback(escalated: bool) -> bool:
            if self.store is None or not examples.ids:
                return False
            self.background(self.store.feedback(namespace, list(examples.ids), escalated))
            return True

        return await self.cascade.run(rule, request, functools.partial(self._timed, meter=meter, spans=spans),
                                      tools=job.tools, stream=job.stream, meter=meter, llm_request=llm_request,
                                      feedback=feedback)

    def _refusal(self, job: Job, admission: Admission, guard: GuardAction, text: str, meter: Meter,
                 spans: Any) -> Execution:
        """The guard's policy answer (``refuse``), as ``n`` choices of ``guard.message``."""
        meter.overhead_s = time.perf_counter() - job.t_start
        finish = "content_filter" if guard.label == "unsafe" else "stop"
        deltas = [Delta(index=i, text=guard.message, finish_reason=finish, is_final=(i == job.n - 1),
                        usage=Usage(0, 0) if i == job.n - 1 else None) for i in range(job.n)]
        reason = f"guard verdict {guard.label}: refused"
        decision = Decision(guard.label, RouteDecision("policy", "policy", None, None, reason), NO_EXAMPLES,
                            "policy", reason)
        return Execution(self, job, admission, decision, "switchyard-policy",
                         Started(deltas[0], replay(deltas[1:]), "policy"), text, meter=meter, spans=spans)

    # ------------------------------------------------------------------------------ bookkeeping

    def finish(self, outcome: Outcome) -> None:
        """[11] Called once per answer that ended normally: accounting, then what the example cache learns."""
        self.accounting.charge(outcome)
        decision, examples, job = outcome.decision, outcome.decision.examples, outcome.job
        if self.store is None:
            return
        if (job.kind == "chat" and decision.pool == self.settings.routing.llm_pool
                and outcome.finish_reason == "stop" and outcome.request_text
                and decision.guard in ("domain", "off", "exempt")):
            self.background(self._admit_example(outcome.admission.namespace, outcome.request_text, outcome.answer,
                                                 decision.pool, examples.query_embedding))
        if examples.ids and not outcome.judged:
            self.background(self.store.feedback(outcome.admission.namespace, list(examples.ids), False))

    async def _admit_example(self, namespace: str, text: str, answer: str, pool: str, embedding: Any = None) -> None:
        """Offer an LLM answer to the example store; the metric counts only answers it kept. ``embedding``:
        the lookup's vector of the same text (escalated requests), so the text is not embedded twice."""
        if await self.store.admit(namespace, text, answer, pool, "stop", guard_ok=True, embedding=embedding):
            self.metrics.cache_admits.inc()

    def record(self, *, route: str, model: str, status: int, t_start: float, overhead_s: float | None,
               execution: Execution | None = None, scope: dict[str, Any] | None = None) -> None:
        """Count one finished request (metrics), write its decision-log record and end its spans: exactly once
        per request. A request that failed inside ``run`` has no ``execution``: its record takes the guard
        verdict and router score from the step results ``run`` left in the scope state, when it got that far. An
        answered ``auto`` request of a key or namespace named in ``traffic_log`` may also be recorded."""
        latency_s = time.perf_counter() - t_start
        self.metrics.record_request(route=route, model=model, status=status, latency_s=latency_s,
                                    overhead_s=overhead_s)
        if self.traffic_log is not None and execution is not None and status == 200:
            self._record_traffic(execution, scope)
        state = (scope or {}).get("state") or {}
        shown = execution.meter.shown() if execution is not None else None  # as the switchyard field has them
        if overhead_s is None:
            overhead_ms = None
        elif shown is not None and overhead_s == execution.meter.overhead_s:
            overhead_ms = shown[0]
        else:
            overhead_ms = round_to(overhead_s * 1000, 1000)
        entry: dict[str, Any] = {
            "request_id": state.get("request_id"),
            "endpoint": (scope or {}).get("path"), "status": status, "route": route, "pool": model,
            "latency_ms": round_to(latency_s * 1000, 1000), "overhead_ms": overhead_ms}
        spans = None
        if execution is not None:
            decision, usage, spans = execution.decision, execution.usage, execution.spans
            routing = decision.routing
            if routing.scores is not None:
                entry["scores"] = routing.scores
            entry.update(key=execution.admission.key_name, score=routing.score, threshold=routing.threshold,
                         guard=decision.guard, escalated=decision.escalated, num_examples=len(decision.examples.ids),
                         prompt_tokens=usage.prompt_tokens if usage else None,
                         completion_tokens=usage.completion_tokens if usage else None,
                         cost_usd=shown[1])
        elif state:  # refused on the way (guard, limits, budget, backend): what was decided before
            spans = state.get("spans")
            admission, guard, route = state.get("admission"), state.get("guard"), state.get("route")
            if admission is not None and admission.key_name is not None:
                entry["key"] = admission.key_name
            if guard is not None and guard.label != "off":
                entry["guard"] = guard.label
            if route is not None and route.score is not None:
                entry.update(score=route.score, threshold=route.threshold)
        self.decision_log.write(entry)
        if spans is not None:
            spans.finish(status, entry)

    def _record_traffic(self, execution: Execution, scope: dict[str, Any] | None) -> None:
        """One traffic-log line (``switchyard label --from-log`` reads it): ``ts``, ``request_id``, ``key``,
        ``namespace``, ``endpoint``, ``route``, ``pool``, ``score``, ``threshold``, ``escalated`` and
        ``prompt`` — the request text the router read. Only ``auto`` requests are recorded: they are the ones
        a router decides, and the labeller's own calls (pools named explicitly) never loop back."""
        decision, admission = execution.decision, execution.admission
        if decision.route not in _AUTO_ROUTES or not execution.request_text:
            return
        if admission.key_name not in self._recorded_keys and admission.namespace not in self._recorded_namespaces:
            return
        entry = {"request_id": ((scope or {}).get("state") or {}).get("request_id"), "key": admission.key_name,
                 "namespace": admission.namespace, "endpoint": (scope or {}).get("path"), "route": decision.route,
                 "pool": decision.pool, "score": decision.routing.score, "threshold": decision.routing.threshold,
                 "escalated": decision.escalated, "prompt": execution.request_text}
        if self.traffic_log.write(entry):
            self.metrics.traffic_logged.inc()


def _with_examples(messages: list[dict[str, Any]], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Examples go after the leading system/developer messages, before the conversation."""
    i = 0
    while i < len(messages) and messages[i].get("role") in ("system", "developer"):
        i += 1
    return [*messages[:i], *examples, *messages[i:]]


__all__ = ["Execution", "GatewayError", "Job", "Outcome", "Pipeline"]
