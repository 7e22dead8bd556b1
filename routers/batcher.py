"""The ``Batcher``: one classifier artifact's batch entry point run in one worker thread, over whatever
concurrent requests are waiting.

Contract:
- ``submit(item)`` returns a ``concurrent.futures.Future`` at once; ``await run(item)`` is the same for an
  asyncio caller (cancelling the await cancels the request). Each future gets the result for its own item:
  ``score_batch(items)[i]`` for the i-th item of the batch it ran in.
- A lone request never waits for company: when the worker is idle it runs the request at once, alone.
  Requests that arrive while a batch runs wait for it and then run together (at most ``max_batch``);
  only then, with requests already waiting, the worker may wait up to ``max_wait_s`` for the batch to
  fill.
- ``score_batch`` runs in the worker thread, never in the caller's: an event loop keeps serving while it
  runs (numpy, scipy and ONNX Runtime release the GIL in their kernels).
- A batch whose ``score_batch`` raises (or returns the wrong number of results) answers each of its
  requests with a ``BatchError`` naming the batcher, the batch size and the cause; the next batch runs
  as usual.
- A request cancelled before its batch starts is dropped from it (never scored); one cancelled later
  runs, and its result is discarded.
- ``close()`` refuses new requests (``RuntimeError``), lets the worker answer what is queued, and joins it.

Pure threading and asyncio; it knows nothing of what it batches (``routers/guard``, ``routers/router``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatchError(RuntimeError):
    """A batch's scoring failed; every request of that batch gets one (the cause is chained)."""


class Batcher(Generic[T, R]):
    """Micro-batches concurrent calls of one batch function in one worker thread (see the module docstring)."""

    def __init__(self, score_batch: Callable[[list[T]], Sequence[R]], *, name: str, max_batch: int = 32,
                 max_wait_s: float = 0.0002) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.name = name
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self._score_batch = score_batch
        self._queue: deque[tuple[T, Future]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._running = False  # a batch is being scored
        self.num_batches = 0  # batches run (read without the lock: a statistic)
        self.num_items = 0  # requests scored in them
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # -- callers ----------------------------------------------------------------------------------------
    def submit(self, item: T) -> Future:
        """Queue one request; the future holds its result (or a ``BatchError``). ``RuntimeError`` after
        ``close``."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher {self.name!r} is closed")
            self._queue.append((item, fut))
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                self._cond.notify()  # an idle worker wakes at once; a filling one when the batch is full
        return fut

    async def run(self, item: T) -> R:
        """``submit`` for an asyncio caller: awaits the result without blocking the loop."""
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new requests, answer the queued ones, stop the worker (waits up to ``timeout_s``)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def is_idle(self) -> bool:
        """Nothing queued and no batch running (read without the lock: a hint, stale by the time it is used)."""
        return not self._queue and not self._running

    # -- the worker -------------------------------------------------------------------------------------
    def _take(self, under_load: bool) -> list[tuple[T, Future]] | None:
        """The next batch (None: closed and drained). Waits for company only ``under_load``."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                under_load = False
                self._cond.wait()
            if under_load and self.max_wait_s > 0 and len(self._queue) < self.max_batch and not self._closed:
                deadline = time.monotonic() + self.max_wait_s
                while len(self._queue) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _work(self) -> None:
        under_load = False
        while True:
            taken = self._take(under_load)
            if taken is None:
                return
            batch = [(item, fut) for item, fut in taken if fut.set_running_or_notify_cancel()]
            if batch:
                self._running = True
                try:
                    self._run(batch)
                finally:
                    self._running = False
            under_load = True  # requests that came while this batch ran may wait a little for company

    def _run(self, batch: list[tuple[T, Future]]) -> None:
        try:
            results = self._score_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise ValueError(f"returned {len(results)} results for {len(batch)} items")
        except BaseException as e:  # noqa: BLE001 - every request of the batch is answered, the worker lives on
            err = BatchError(f"{self.name}: scoring a batch of {len(batch)} failed: {type(e).__name__}: {e}")
            err.__cause__ = e
            for _, fut in batch:
                fut.set_exception(err)
            if not isinstance(e, Exception):
                raise
            return
        self.num_batches += 1
        self.num_items += len(batch)
        for (_, fut), result in zip(batch, results, strict=True):
            fut.set_result(result)


def per_owner(method: str) -> Callable[[list[tuple[Any, Any]]], list[Any]]:
    """A batch function over (owner, item) pairs: ``owner.<method>(items)`` once per distinct owner (by
    identity, in order of first appearance), each result back in its pair's position. The gateway's items
    are (the request's guard or router, its text): requests that started before and after an artifact
    reload share one batcher, and each artifact scores its own."""

    def run(pairs: list[tuple[Any, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(pairs)
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i, (owner, _) in enumerate(pairs):
            groups.setdefault(id(owner), (owner, []))[1].append(i)
        for owner, positions in groups.values():
            results = getattr(owner, method)([pairs[i][1] for i in positions])
            if len(results) != len(positions):
                raise ValueError(f"{method} returned {len(results)} results for {len(positions)} items")
            for i, result in zip(positions, results, strict=True):
                out[i] = result
        return out

    return run


def batch_sizes(batcher: Batcher) -> dict[str, Any]:
    """{"batches", "items", "mean_batch"}: how much batching happened (for logs and benchmarks)."""
    n = batcher.num_batches
    return {"batches": n, "items": batcher.num_items, "mean_batch": round(batcher.num_items / n, 3) if n else 0.0}
