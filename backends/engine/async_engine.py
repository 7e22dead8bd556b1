"""AsyncEngine: an LLMEngine driven by a background thread, with one asyncio stream per request.

Usage::

    from backends.engine.async_engine import AsyncEngine

    engine = AsyncEngine(LLMEngine("/path/to/hf-folder", EngineArgs()))   # or: await AsyncEngine.create(...)
    engine.start()
    async for out in engine.stream("req-1", prompt_token_ids, SamplingParams(max_tokens=32)):
        out.new_text, out.new_token_ids, out.finished       # RequestOutput deltas (all n choices)
    await engine.shutdown()

The step loop runs in its own thread, so the event loop never waits on a forward pass. Requests and
aborts cross into that thread through a queue and are applied before the next step; leaving the ``async
for`` early (break, ``aclose()``, task cancellation, e.g. a client disconnect) aborts the request, which
frees its KV blocks before the next step. ``stream`` raises ContextLengthError / ValueError for bad input
before anything is queued.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path

from backends.engine.args import EngineArgs
from backends.engine.llm_engine import ContextLengthError, EngineStats, LLMEngine, RequestOutput
from backends.engine.sampling_params import SamplingParams
from backends.engine.stats import StatLogger


class EngineDeadError(RuntimeError):
    """The step loop crashed; the message carries the cause. Every open stream receives it."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    session_id: str | None = None
    program_id: str | None = None
    namespace: str | None = None


@dataclass
class _Abort:
    request_id: str


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, num_choices: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.num_open = num_choices

    def put(self, item: RequestOutput | BaseException) -> bool:
        """False when the consumer's event loop is gone (the request should be aborted)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # event loop closed
            return False
        return True


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[_Add | _Abort | None] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    @classmethod
    async def create(cls, model: str | Path, args: EngineArgs | None = None, device=None,
                     stat_loggers: SequenceOf[StatLogger] = ()) -> AsyncEngine:
        """Load the model (a local HF folder) in a worker thread (the event loop stays responsive) and start
        the loop. ``stat_loggers`` are called on the engine thread after every step (stats.py)."""
        engine = await asyncio.to_thread(LLMEngine, model, args, device=device, stat_loggers=stat_loggers)
        self = cls(engine)
        self.start()
        return self

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Stop the loop; open streams end with finish_reason 'abort'."""
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats()

    # ------------------------------------------------------------------ requests
    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     priority: int = 0, session_id: str | None = None,
                     program_id: str | None = None, namespace: str | None = None) -> AsyncIterator[RequestOutput]:
        """Deltas for every choice until all ``params.n`` choices finished. ``session_id`` / ``program_id`` /
        ``namespace``: as ``LLMEngine.add_request`` (KV retention, program-aware scheduling, shared drafts)."""
        if self.error is not None or self._thread is None:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        if len(prompt_token_ids) >= self.engine.max_model_len:
            raise ContextLengthError(
                f"prompt has {len(prompt_token_ids)} tokens; the model's context is "
                f"{self.engine.max_model_len} tokens (prompt plus at least 1 output token)"
            )
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        stream = _Stream(asyncio.get_running_loop(), params.n)
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, priority, session_id, program_id,
                                 namespace))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    stream.num_open -= 1
                    if stream.num_open == 0:
                        finished = True
                        return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        """Abort from any thread; blocks are freed before the next step."""
        self._commands.put(_Abort(request_id))

    # ------------------------------------------------------------------ the loop (engine thread)
    def _apply(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.prompt_token_ids, cmd.params, cmd.request_id, cmd.priority,
                                        session_id=cmd.session_id, program_id=cmd.program_id,
                                        namespace=cmd.namespace)
            except Exception as exc:  # bad input found by the engine: the caller sees it
                stream = self._streams.get(cmd.request_id)
                if stream is not None:
                    stream.put(exc)
        else:
            self.engine.abort_request(cmd.request_id)

    def _run(self) -> None:
        try:
            while not self._stopping:
                idle = not self.engine.has_unfinished_requests()
                stalled = not idle and self.engine.last_step_num_tokens == 0  # defensive: never spin hot
                timeout = 0.01 if stalled else None
                expiry = self.engine.block_manager.next_expiry()
                if idle and expiry is not None:  # wake up to let retained KV expire (the step releases it)
                    timeout = min(max(expiry - self.engine.clock(), 0.01), 1.0)
                try:
                    cmd = self._commands.get(block=idle or stalled, timeout=timeout)
                    while True:
                        if cmd is None:
                            break
                        with self._lock:
                            self._apply(cmd)
                        cmd = self._commands.get_nowait()
                except queue.Empty:
                    pass
                if self._stopping:
                    break
                with self._lock:
                    outputs = self.engine.step()
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None and not stream.put(out):
                        self._streams.pop(out.request_id, None)
                        with self._lock:
                            self.engine.abort_request(out.request_id)
        except BaseException as exc:  # a crash must reach every waiting stream, never hang it
            self.error = exc
            dead = EngineDeadError(f"engine step failed: {exc!r}")
            for stream in list(self._streams.values()):
                stream.put(dead)
            return
        self._finish_open_streams()

    def _finish_open_streams(self) -> None:
        with self._lock:
            for request_id, stream in list(self._streams.items()):
                open_seqs = [s for s in self.engine.requests.get(request_id, []) if not s.is_finished]
                self.engine.abort_request(request_id)
                indices = [s.index for s in open_seqs] or list(range(stream.num_open))
                for index in indices:
                    stream.put(RequestOutput(
                        request_id=request_id, index=index, new_token_ids=[], new_text="", new_logprobs=[],
                        finished=True, finish_reason="abort", num_prompt_tokens=0, num_cached_tokens=0,
                        num_output_tokens=0,
                    ))
