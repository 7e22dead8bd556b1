"""gateway/pipeline.py through its constructor: the components a deployment gets from gateway/wiring.py are
replaced by fakes of the Protocols the Pipeline types them with (pools, guard, policy), and the request path's
outcome is read where clients and operators read it: the x-switchyard-* headers, the ``switchyard`` field,
the decision log."""

from __future__ import annotations

from typing import Any

import pytest

from backends.base import SamplingParams
from gateway.admission import Admitter, InProcessRateLimiter
from gateway.artifacts import ServingArtifacts
from gateway.decision_log import DecisionLog
from gateway.errors import PolicyRejection
from gateway.metrics import Metrics
from gateway.pipeline import Job, Pipeline
from gateway.sessions import MemorySessionStore
from routers.policy import RouteDecision
from tests.gateway.fakes import FakeBackend, FakeGuard, fake_settings


class FakePools:
    """A PoolsComponent: one FakeBackend per alias."""

    def __init__(self, aliases: list[str]) -> None:
        self.backends = {alias: FakeBackend(f"{alias}/0", alias) for alias in aliases}

    def get(self, alias: str) -> FakeBackend:
        return self.backends[alias]

    def health(self) -> dict[str, dict[str, bool]]:
        return {alias: {b.name: True} for alias, b in self.backends.items()}

    def stats(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class FakePolicy:
    """A PolicyComponent that sends everything to the SLM with a fixed score."""

    router = None

    def needs_score(self, hint: Any = None) -> bool:
        return False

    def decide(self, text: str, hint: Any = None, score: float | None = None) -> RouteDecision:
        return RouteDecision("slm", "slm", 0.75, 0.5, "fake policy")


def _pipeline(**settings: Any) -> Pipeline:
    s = fake_settings(routing={"cascade": {"mode": "off"}}, **settings)
    return Pipeline(s, pools=FakePools(["slm", "llm", "cloud"]), admitter=Admitter(s, InProcessRateLimiter()),
                    metrics=Metrics(), artifacts=ServingArtifacts(guard=FakeGuard(), policy=FakePolicy()),
                    sessions=MemorySessionStore(60.0, 100), decision_log=DecisionLog(None))


def _job(text: str, model: str = "auto") -> Job:
    return Job(kind="chat", model=model, messages=[{"role": "user", "content": text}], prompt=None,
               sampling=SamplingParams(max_tokens=8), state={"request_id": "r1"})


async def _answer(pipeline: Pipeline, job: Job) -> tuple[Any, str]:
    execution = await pipeline.run(job, None)
    text = "".join([d.text async for d in execution.deltas()])
    pipeline.record(route=execution.decision.route, model=execution.decision.pool, status=200, t_start=job.t_start,
                    overhead_s=execution.overhead_s, execution=execution, scope={"state": job.state})
    return execution, text


async def test_an_auto_request_carries_the_policys_decision_to_headers_body_and_log():
    pipeline = _pipeline()
    execution, text = await _answer(pipeline, _job("what is a contract?"))
    assert text
    headers = execution.headers(with_cost=True)
    assert (headers["x-switchyard-route"], headers["x-switchyard-model"], headers["x-switchyard-guard"]) == \
        ("slm", "slm", "domain")
    assert float(headers["x-switchyard-cost-usd"]) > 0  # booked by finish(): the SLM's prices
    info = execution.info()
    assert (info["score"], info["threshold"], info["reason"], info["escalated"]) == (0.75, 0.5, "fake policy", False)
    record = pipeline.decision_log.latest(1)[0]
    assert (record["route"], record["pool"], record["guard"], record["score"]) == ("slm", "slm", "domain", 0.75)
    assert record["cost_usd"] == info["cost_usd"]


async def test_a_named_pool_is_explicit_and_the_router_is_not_asked():
    execution, _ = await _answer(_pipeline(), _job("what is a contract?", model="llm"))
    assert execution.decision.route == "explicit" and execution.decision.pool == "llm"
    assert execution.info()["score"] is None


async def test_guard_refuse_answers_with_the_policy_message():
    pipeline = _pipeline(guard={"unsafe": {"action": "refuse", "message": "not here"}})
    execution, text = await _answer(pipeline, _job("how to build a bomb"))
    assert text == "not here"
    assert execution.headers(with_cost=True)["x-switchyard-route"] == "policy"
    assert execution.info()["reason"] == "guard verdict unsafe: refused"


async def test_a_rejected_request_is_logged_with_the_verdict_it_got():
    pipeline = _pipeline(guard={"unsafe": {"action": "reject"}})
    job = _job("how to build a bomb")
    with pytest.raises(PolicyRejection):
        await pipeline.run(job, None)
    pipeline.record(route="error", model="-", status=400, t_start=job.t_start, overhead_s=None,
                    scope={"state": job.state})
    record = pipeline.decision_log.latest(1)[0]
    assert (record["status"], record["guard"]) == (400, "unsafe") and "score" not in record
