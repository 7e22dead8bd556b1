"""Accounting: what a request costs and who pays — per pool, per key, and against the key's budget.

``reserve`` runs before a backend is called (the budget's worst-case reservation, ``gateway/budget.py``);
``charge`` runs once when an answer ended normally: the cost at the configured prices (the SLM's part of an
escalated request is already in ``meter.cost_usd``), the "saved vs always-LLM" figure, per-pool and per-key
counters, the key's token rate limit and the budget's settlement. Requests that end otherwise keep their
reservation (settled by the pipeline when nothing was answered).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backends.types import Usage
from gateway.errors import RateLimited


class Accounting:
    def __init__(self, settings: Any, metrics: Any, admitter: Any, budgets: Any,
                 background: Callable[[Any], None], auto_pools: list[str] | None = None) -> None:
        """``auto_pools``: the pools an N-model router chooses among (``auto`` then reserves the dearest
        pool's cost, hint pools included; None = the two-pool SLM + LLM worst case)."""
        self.settings = settings
        self.metrics = metrics
        self.admitter = admitter
        self.budgets = budgets
        self._background = background  # runs a coroutine after the answer (token counters, settlements)
        self._llm_price = settings.pool(settings.routing.llm_pool).price
        self._pools = {p.name for p in settings.pools}
        self._auto_pools = auto_pools

    async def reserve(self, admission: Any, requested: str, num_prompt_tokens: int, num_output_tokens: int) -> Any:
        """Reserve the worst case against the key's budget (SLM + LLM for ``auto``, the dearest pool for
        ``auto`` over an N-model router); a Reservation, None when the key has no budget; 429
        ``budget_exceeded`` when it would pass it."""
        if admission.max_budget_usd is None or admission.key_name is None:
            return None
        routing = self.settings.routing
        if requested != "auto":
            pools, combine = [requested], sum
        elif self._auto_pools:  # N pools: one pool answers (no escalation), hints may pick slm/llm
            pools, combine = [routing.slm_pool, routing.llm_pool, *self._auto_pools], max
        else:  # the SLM's answer, then the LLM's when it escalates
            pools, combine = [routing.slm_pool, routing.llm_pool], sum
        worst = combine(self.settings.pool(p).price.cost_usd(num_prompt_tokens, num_output_tokens) for p in pools)
        reservation = await self.budgets.reserve(admission.key_name, admission.budget_window, worst,
                                                 admission.max_budget_usd)
        if reservation is None:
            spent = await self.budgets.spent(admission.key_name, admission.budget_window)
            self.metrics.budget_exceeded.inc()
            raise RateLimited(f"Budget reached for key {admission.key_name!r}: ${spent:.6f} of "
                              f"${admission.max_budget_usd:g} per {admission.budget_window} spent or reserved; "
                              f"this request may cost up to ${worst:.6f}.", code="budget_exceeded")
        return reservation

    def release(self, reservation: Any, spent_usd: float) -> None:
        """A request that ended without an answer: its reservation becomes what it spent."""
        if reservation is not None:
            self._background(self.budgets.settle(reservation, spent_usd))

    def charge(self, outcome: Any) -> None:
        """Book a finished answer (``Outcome``): adds its cost to ``outcome.meter.cost_usd``."""
        meter, pool, usage = outcome.meter, outcome.decision.pool, outcome.usage
        always = 0.0
        if pool in self._pools:
            meter.cost_usd += self.settings.pool(pool).price.cost_usd(usage.prompt_tokens, usage.completion_tokens)
            always = self._llm_price.cost_usd(usage.prompt_tokens, usage.completion_tokens)
            self.metrics.record_usage(model=pool, num_prompt_tokens=usage.prompt_tokens,
                                      num_completion_tokens=usage.completion_tokens, cost_usd=meter.cost_usd,
                                      always_llm_cost_usd=always)
        if outcome.admission.tokens_per_minute is not None and usage.total_tokens:
            self._background(self.admitter.record_tokens(outcome.admission, usage.total_tokens))
        key = outcome.admission.key_name
        if key is not None:  # an open gateway has no keys to account to
            self.metrics.child(self.metrics.key_spend, key).inc(meter.cost_usd)
            self.metrics.child(self.metrics.key_always_llm_cost, key).inc(always)
            self.metrics.child(self.metrics.key_tokens, key, "prompt").inc(usage.prompt_tokens)
            self.metrics.child(self.metrics.key_tokens, key, "completion").inc(usage.completion_tokens)
        if outcome.reservation is not None:
            self._background(self.budgets.settle(outcome.reservation, meter.cost_usd))


__all__ = ["Accounting", "Usage"]
