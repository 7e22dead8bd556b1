"""gateway/lifecycle.py: start-up, readiness, reload and shutdown of a pipeline built from fakes, and the
background work a pipeline hands over (failures logged, cancelled at close)."""

from __future__ import annotations

import asyncio
import logging

from gateway.lifecycle import Background, Lifecycle
from tests.gateway.test_pipeline import FakePools, _pipeline


class HalfDownPools(FakePools):
    """Pool ``llm`` has no available replica."""

    def health(self) -> dict[str, dict[str, bool]]:
        return {alias: {b.name: alias != "llm"} for alias, b in self.backends.items()}


def test_background_logs_a_failure_and_cancel_stops_what_is_pending(caplog):
    async def scenario() -> tuple[int, bool]:
        background = Background()

        async def fails() -> None:
            raise RuntimeError("boom")

        forever = asyncio.Event()
        background(fails())
        background(forever.wait())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        pending = len(background)  # the failed one is gone, the waiting one is held
        background.cancel()
        for _ in range(3):  # the task sees its cancellation, then its done callback runs
            await asyncio.sleep(0)
        return pending, len(background) == 0

    with caplog.at_level(logging.WARNING, logger="switchyard.lifecycle"):
        pending, emptied = asyncio.run(scenario())
    assert pending == 1 and emptied
    assert any("background task failed" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)


def test_readiness_start_reload_and_close():
    async def scenario() -> tuple[dict, dict, dict]:
        pipeline = _pipeline()
        lifecycle = Lifecycle(pipeline)
        await lifecycle.start()
        ready = await lifecycle.readiness()
        pipeline.pools = HalfDownPools(["slm", "llm", "cloud"])
        down = await lifecycle.readiness()
        reload = await lifecycle.reload()  # no artifacts configured: loads (nothing), swaps, says so
        await lifecycle.close()
        return ready, down, reload

    ready, down, reload = asyncio.run(scenario())
    assert ready["ready"] and ready["status"] == "ok" and ready["redis"] is None
    assert not down["ready"] and down["status"] == "unavailable" and down["pools"]["llm"] == {"llm/0": False}
    assert reload["reloaded"] is True and set(reload["serving"]) >= {"guard", "router"}
