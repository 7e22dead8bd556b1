"""The ``Batcher`` under concurrency: each caller gets its own result, a failed batch answers each of its
requests and the next batch runs, a request cancelled while it waits is never scored, close() drains.
Time enters only as a bound on waiting for a hung thread (never as an assertion on speed)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import CancelledError

import pytest

from routers.batcher import Batcher, BatchError, batch_sizes, per_owner

HANG = 30.0  # seconds before a test gives up on a thread that never answers


class Recorder:
    """A batch function that records its batches and can hold the worker (``gate``) inside a batch."""

    def __init__(self, fn=lambda x: x * 2) -> None:
        self.fn = fn
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a batch starts (with the gate closed: the worker is held)

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(HANG), "the test never opened the gate"
        return [self.fn(x) for x in items]

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()


def held_batcher(rec: Recorder, **kw) -> tuple[Batcher, object]:
    """A batcher whose worker is inside a first batch (item -1) and held there until ``rec.gate`` opens."""
    b = Batcher(rec, name="test", **kw)
    rec.hold()
    first = b.submit(-1)
    assert rec.entered.wait(HANG)
    return b, first


def test_a_lone_request_runs_alone_and_at_once():
    """An idle worker runs a request immediately, even with a long max wait: a lone request never waits
    for company (the hour-long max_wait would otherwise hang this test)."""
    rec = Recorder()
    b = Batcher(rec, name="lone", max_batch=32, max_wait_s=3600.0)
    assert b.submit(21).result(HANG) == 42
    assert b.submit(5).result(HANG) == 10
    assert rec.batches == [[21], [5]]
    b.close(HANG)


def test_requests_that_wait_run_together_in_arrival_order_and_within_max_batch():
    rec = Recorder()
    b, first = held_batcher(rec, max_batch=4, max_wait_s=0.0)
    futs = [b.submit(i) for i in range(10)]
    rec.gate.set()
    assert first.result(HANG) == -2
    assert [f.result(HANG) for f in futs] == [2 * i for i in range(10)]
    assert rec.batches == [[-1], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batch_sizes(b) == {"batches": 4, "items": 11, "mean_batch": 2.75}
    b.close(HANG)


def test_each_caller_gets_its_own_result_under_concurrency():
    """32 threads x 50 requests each, distinct items: every future holds f(its own item), whatever batch it
    ran in; the batches really mixed callers."""
    rec = Recorder(fn=lambda x: (x, x[0] * 1000 + x[1]))
    b = Batcher(rec, name="mix", max_batch=16, max_wait_s=0.0002)
    results: dict[int, list] = {}
    start = threading.Barrier(32)

    def caller(t: int) -> None:
        start.wait(HANG)
        futs = [b.submit((t, i)) for i in range(50)]
        results[t] = [f.result(HANG) for f in futs]

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(32)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(HANG)
    assert all(results[t] == [((t, i), t * 1000 + i) for i in range(50)] for t in range(32))
    assert sum(len(x) for x in rec.batches) == 32 * 50
    assert max(len(x) for x in rec.batches) <= 16
    b.close(HANG)


def test_a_failed_batch_answers_each_of_its_requests_and_the_next_batch_runs():
    def fn(x):
        if x == "boom":
            raise KeyError("bad row")
        return x.upper()

    rec = Recorder(fn=fn)
    b, first = held_batcher(rec, max_batch=8, max_wait_s=0.0)
    failing = [b.submit(x) for x in ("a", "boom", "c")]
    rec.gate.set()
    first_err = None
    try:
        first.result(HANG)
    except BatchError as e:  # -1.upper() fails too: int has no upper
        first_err = e
    assert first_err is not None
    for f in failing:
        with pytest.raises(BatchError, match=r"test: scoring a batch of 3 failed: KeyError: 'bad row'") as e:
            f.result(HANG)
        assert isinstance(e.value.__cause__, KeyError)
    assert rec.batches[1] == ["a", "boom", "c"]
    # the worker lives on: the next batch is scored as usual
    assert [b.submit(x).result(HANG) for x in ("d", "e")] == ["D", "E"]
    b.close(HANG)


def test_a_wrong_number_of_results_is_a_batch_error():
    b = Batcher(lambda items: items[:-1], name="short")
    with pytest.raises(BatchError, match="short: scoring a batch of 1 failed: ValueError: returned 0 results for 1"):
        b.submit("x").result(HANG)
    b.close(HANG)


def test_a_request_cancelled_while_waiting_is_never_scored():
    rec = Recorder()
    b, first = held_batcher(rec, max_batch=8, max_wait_s=0.0)
    keep, drop, keep2 = b.submit(1), b.submit(2), b.submit(3)
    assert drop.cancel()
    rec.gate.set()
    assert (first.result(HANG), keep.result(HANG), keep2.result(HANG)) == (-2, 2, 6)
    with pytest.raises(CancelledError):
        drop.result(HANG)
    assert rec.batches == [[-1], [1, 3]]
    b.close(HANG)


def test_asyncio_callers_and_cancelling_an_await():
    """``run`` from many coroutines: each gets its own result; a task cancelled while its request waits
    for the worker cancels the request (never scored), the loop kept running meanwhile."""
    rec = Recorder()

    async def main() -> None:
        b, first = held_batcher(rec, max_batch=64, max_wait_s=0.0)
        tasks = [asyncio.ensure_future(b.run(i)) for i in range(20)]
        victim = asyncio.ensure_future(b.run(999))
        await asyncio.sleep(0)  # every request is queued; the worker is still held in the first batch
        ticks = 0
        while ticks < 3:  # the loop is free while the worker is busy
            await asyncio.sleep(0)
            ticks += 1
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        rec.gate.set()
        assert await asyncio.gather(*tasks) == [2 * i for i in range(20)]
        assert await asyncio.wrap_future(first) == -2
        await asyncio.to_thread(b.close, HANG)

    asyncio.run(main())
    assert 999 not in [x for batch in rec.batches for x in batch]
    assert sorted(x for batch in rec.batches[1:] for x in batch) == list(range(20))


def test_close_answers_what_is_queued_then_refuses_new_requests():
    rec = Recorder()
    b, first = held_batcher(rec, max_batch=2, max_wait_s=0.0)
    queued = [b.submit(i) for i in range(5)]
    closer = threading.Thread(target=b.close, args=(HANG,))
    closer.start()
    while not b.is_closed:  # close() marks the batcher closed before it waits for the worker
        threading.Event().wait(0.001)
    with pytest.raises(RuntimeError, match="batcher 'test' is closed"):
        b.submit(7)
    rec.gate.set()
    closer.join(HANG)
    assert not closer.is_alive()
    assert [f.result(0) for f in queued] == [0, 2, 4, 6, 8]
    assert first.result(0) == -2


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(lambda x: x, name="x", max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(lambda x: x, name="x", max_wait_s=-1)


def test_per_owner_scores_each_owners_items_with_it_in_place():
    """Items of two artifacts (a reload between requests) in one batch: each owner's batch method sees only
    its own items, once, and every result lands at its item's position."""
    class Owner:
        def __init__(self, tag: str) -> None:
            self.tag, self.calls = tag, []

        def score_batch(self, texts):
            self.calls.append(list(texts))
            return [f"{self.tag}:{t}" for t in texts]

    old, new = Owner("old"), Owner("new")
    fn = per_owner("score_batch")
    assert fn([(old, "a"), (new, "b"), (old, "c"), (new, "d")]) == ["old:a", "new:b", "old:c", "new:d"]
    assert old.calls == [["a", "c"]] and new.calls == [["b", "d"]]
    b = Batcher(fn, name="owners")
    assert b.submit((new, "x")).result(HANG) == "new:x"
    b.close(HANG)
