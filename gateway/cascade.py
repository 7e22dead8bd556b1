"""[9] The cascade: is the SLM's own answer confident enough to return, and if not, the LLM's answer instead.

``CascadeRule`` (pure, no I/O) judges a whole SLM answer from its token log-probabilities and tool calls.
``Cascade`` is the mechanics around it, run by the pipeline (gateway/pipeline.py) for the requests it
``applies`` to: route ``slm_then_escalate`` — and route ``slm`` when ``stream_mode`` is ``buffer`` — get the
SLM answer in full (with token logprobs), judged, then replayed or replaced by the LLM's answer. With
``stream_when_confident`` a route-``slm`` request streams the SLM directly (lowest time to first token, no
after-the-fact check). The latency trade-off: buffering adds the whole SLM generation time to the time to
first token (and the LLM's on escalation); streaming directly keeps TTFT at the SLM's but cannot take an
answer back. ``start`` (wait for a first Delta) and ``replay`` serve the direct path and the guard's
refusals too.

Thresholds come from calibration (``fit_cascade_rule`` in ``training/calibrate.py``: pick ``min_mean_logprob``
so a target share of held-out SLM answers escalates; stored in the router artifact's ``meta["cascade"]``);
gateway settings (``routing.cascade.min_mean_logprob`` / ``min_token_logprob``) override them. With neither, the
``DEFAULT_RULE`` below is used (documented constants, the fallback for a deployment that has not
calibrated yet).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from backends.base import BackendError, Delta
from gateway.decision import Started

if TYPE_CHECKING:
    from gateway.decision import Examples, Meter
    from routers.policy import RouteDecision


@dataclass(frozen=True)
class Confidence:
    """Summary of an answer's token log-probabilities (natural log)."""

    mean_logprob: float
    min_logprob: float
    num_tokens: int

    @classmethod
    def from_logprobs(cls, logprobs: Sequence[float]) -> Confidence:
        """Empty answers have ``num_tokens = 0`` and mean/min of ``-inf`` (they always escalate).
        Float noise just above 0 (<= 0.01) counts as 0; NaN counts as ``-inf`` (an upstream that sends
        garbage escalates rather than failing the request); larger positive values raise ValueError."""
        vals = []
        for x in logprobs:
            if x is None:
                continue
            v = float(x)
            if math.isnan(v):
                v = -math.inf
            elif v > 0.01:
                raise ValueError(f"log-probabilities must be <= 0, got {v}")
            vals.append(min(v, 0.0))
        if not vals:
            return cls(mean_logprob=-math.inf, min_logprob=-math.inf, num_tokens=0)
        return cls(mean_logprob=sum(vals) / len(vals), min_logprob=min(vals), num_tokens=len(vals))


@dataclass(frozen=True)
class CascadeRule:
    """Escalate when the mean token log-prob is below ``min_mean_logprob`` or any token's log-prob is
    below ``min_token_logprob`` (either threshold may be None = not checked)."""

    min_mean_logprob: float | None = None
    min_token_logprob: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_mean_logprob", "min_token_logprob"):
            v = getattr(self, name)
            if v is not None and (math.isnan(v) or v > 0):
                raise ValueError(f"{name} must be <= 0, got {v}")

    def should_escalate(self, conf: Confidence) -> bool:
        if conf.num_tokens == 0:
            return True
        if self.min_mean_logprob is not None and conf.mean_logprob < self.min_mean_logprob:
            return True
        if self.min_token_logprob is not None and conf.min_logprob < self.min_token_logprob:
            return True
        return False

    def judge(self, deltas: Sequence[Any], tools: list[dict[str, Any]] | None = None) -> str | None:
        """The reason to escalate a whole answer (Deltas of every choice), or None to keep it. Any choice with a
        tool call that does not parse, names a tool not in ``tools`` or fails the tool's schema escalates with
        ``invalid_tool_call``; otherwise any choice whose token log-probabilities (those of its call's tokens
        too) fail the rule escalates. A valid call from a backend that sends no log-probabilities for call
        tokens is kept: its validity is all there is to judge."""
        from backends.tool_calls import invalid_call_reason, tools_of
        from gateway.streaming import ToolCalls

        declared = tools_of(tools)
        for index in sorted({d.index for d in deltas}):
            merged = ToolCalls()
            for d in deltas:
                if d.index == index and d.tool_calls:
                    merged.add(d.tool_calls)
            for call in merged.whole():
                problem = invalid_call_reason(call, declared)
                if problem is not None:
                    return f"invalid_tool_call: {problem}"
            values = [lp.logprob for d in deltas if d.index == index for lp in d.logprobs]
            if merged.calls and not values:
                continue
            if self.should_escalate(Confidence.from_logprobs(values)):
                return "SLM answer unsure (low token log-probabilities)"
        return None

    def as_dict(self) -> dict[str, float | None]:
        return {"min_mean_logprob": self.min_mean_logprob, "min_token_logprob": self.min_token_logprob}


# Uncalibrated fallback: a mean token probability below ~0.45 or a token below ~0.1% probability.
DEFAULT_RULE = CascadeRule(min_mean_logprob=-0.8, min_token_logprob=-7.0)


def resolve_rule(
    settings_mean: float | None,
    settings_token: float | None,
    artifact_cascade: dict | None,
) -> CascadeRule:
    """Settings override the artifact's calibrated thresholds; with neither, ``DEFAULT_RULE``."""
    art = artifact_cascade or {}
    if settings_mean is None and settings_token is None and not art:
        return DEFAULT_RULE
    return CascadeRule(
        min_mean_logprob=settings_mean if settings_mean is not None else art.get("min_mean_logprob"),
        min_token_logprob=settings_token if settings_token is not None else art.get("min_token_logprob"),
    )


async def replay(deltas: Sequence[Delta]) -> AsyncIterator[Delta]:
    """Deltas already in hand as a stream (a judged SLM answer, a refusal's further choices)."""
    for d in deltas:
        yield d


async def start(deltas: AsyncIterator[Delta], pool: str, **cascade: Any) -> Started:
    """Wait for the first Delta of ``pool``'s answer, so failures before it become HTTP errors (the stream is
    closed when waiting fails). ``cascade``: ``Started``'s escalated / judged / reason."""
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await deltas.aclose()
        raise
    return Started(first, deltas, pool, **cascade)


# (pool alias, request, stream) → the pool's timed Delta stream (the pipeline's, with its meter and spans)
Generate = Callable[[str, Any, bool], AsyncIterator[Delta]]


class Cascade:
    """The cascade's mechanics for one gateway: which requests it applies to and how one is answered.
    ``pool_cfg``: alias → PoolConfig (prices of the SLM's answer on escalation)."""

    def __init__(self, routing: Any, metrics: Any, pool_cfg: Callable[[str], Any]) -> None:
        self.slm, self.llm = routing.slm_pool, routing.llm_pool
        self._buffer_slm = routing.cascade.stream_mode == "buffer"
        self.metrics = metrics
        self._pool_cfg = pool_cfg

    def applies(self, route: RouteDecision, examples: Examples, rule: CascadeRule | None) -> bool:
        """Whether ``route``'s SLM answer is judged before it is returned: a rule is serving, the SLM answers,
        its examples did not settle it (``keeps_on_slm``), and the route asks for it."""
        if rule is None or route.pool != self.slm or examples.keeps_on_slm:
            return False
        return route.route == "slm_then_escalate" or (route.route == "slm" and self._buffer_slm)

    async def run(self, rule: CascadeRule, request: Any, generate: Generate, *, tools: list[dict[str, Any]] | None,
                  stream: bool, meter: Meter, llm_request: Callable[[], Any],
                  feedback: Callable[[bool], bool]) -> Started:
        """Produce the SLM answer of ``request`` in full (token logprobs asked for), judge it, then replay it
        (logprobs stripped unless the caller asked) or start the LLM's answer: ``llm_request()`` builds that
        request (and raises 400 when the LLM cannot serve it). An SLM that fails with a 5xx or without a healthy
        replica escalates; other SLM errors raise. ``feedback(escalated)`` tells the example cache whether its
        examples helped and returns whether there were any (they count as judged)."""
        judged_request = replace(request, sampling=replace(request.sampling, logprobs=request.sampling.logprobs or 0))
        escalate, reason, judged = False, "", False
        try:
            deltas = [d async for d in generate(self.slm, judged_request, False)]
        except BackendError as e:
            if e.status_code < 500 and e.code != "no_healthy_replica":
                raise
            escalate, reason, deltas = True, f"SLM failed ({e.code or e.status_code})", []
        if not escalate:
            judged = True
            self.metrics.cascade_judged.inc()
            unsure = rule.judge(deltas, tools)
            escalate, reason = unsure is not None, unsure or ""
        if feedback(escalate):
            judged = True
        if not escalate:
            if request.sampling.logprobs is None:
                deltas = [replace(d, logprobs=()) if d.logprobs else d for d in deltas]
            return await start(replay(deltas), self.slm, judged=judged)
        usage = next((d.usage for d in reversed(deltas) if d.usage is not None), None)
        if usage is not None:
            meter.cost_usd += self._pool_cfg(self.slm).price.cost_usd(usage.prompt_tokens, usage.completion_tokens)
        self.metrics.escalations.inc()
        escalated = llm_request()
        escalated.deadline = request.deadline
        return await start(generate(self.llm, escalated, stream), self.llm, escalated=True, judged=judged,
                           reason=reason)
