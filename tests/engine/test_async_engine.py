"""AsyncEngine: streams, abort frees blocks at once, 64 concurrent requests, event loop stays free."""

from __future__ import annotations

import asyncio
import time

import pytest

from backends.engine.async_engine import AsyncEngine
from backends.engine.llm_engine import ContextLengthError
from backends.engine.sampling_params import SamplingParams
from tests.engine.helpers import prompts, tiny_engine


@pytest.fixture(scope="module")
def llama_engine(tiny_model_dir):
    return tiny_engine(tiny_model_dir("llama"), num_kv_blocks=256, max_num_seqs=64, max_num_batched_tokens=256)


async def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_64_concurrent_requests_match_sequential_and_leak_nothing(llama_engine):
    batch = prompts(64, [3, 8, 17, 30, 5], seed=21)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [r.token_ids for r in llama_engine.generate(batch, params)]
    engine = AsyncEngine(llama_engine)
    engine.start()
    try:
        async def one(i):
            tokens, reasons = [], []
            async for out in engine.stream(f"c{i}", batch[i], params):
                tokens += out.new_token_ids
                reasons.append(out.finish_reason)
            return tokens, reasons

        results = await asyncio.gather(*(one(i) for i in range(64)))
        for (tokens, reasons), exp in zip(results, expected, strict=True):
            assert tokens == exp
            assert [r for r in reasons if r] == ["length"]
        assert llama_engine.block_manager.num_used_blocks == 0
        stats = engine.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.num_generation_tokens_total >= 64 * 8
    finally:
        await engine.shutdown()


async def test_abort_mid_stream_returns_all_blocks(llama_engine):
    engine = AsyncEngine(llama_engine)
    engine.start()
    try:
        [prompt] = prompts(1, [40], seed=22)
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        gen = engine.stream("abort-me", prompt, params)
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                assert llama_engine.block_manager.num_used_blocks > 0
                break
        await gen.aclose()
        await _wait_for(lambda: llama_engine.block_manager.num_used_blocks == 0)
        assert "abort-me" not in llama_engine.requests

        # cancelling the consuming task (client disconnect) aborts too
        async def consume():
            async for _ in engine.stream("cancel-me", prompt, params):
                pass

        task = asyncio.create_task(consume())
        await _wait_for(lambda: llama_engine.block_manager.num_used_blocks > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_for(lambda: llama_engine.block_manager.num_used_blocks == 0 and not llama_engine.requests)
    finally:
        await engine.shutdown()


async def test_event_loop_not_blocked_and_errors_before_queueing(llama_engine):
    engine = AsyncEngine(llama_engine)
    engine.start()
    try:
        with pytest.raises(ContextLengthError):
            async for _ in engine.stream("too-long", [5] * 300, SamplingParams()):
                pass
        [prompt] = prompts(1, [20], seed=23)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        n = 0
        async for out in engine.stream("x", prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                                   n=2)):
            n += len(out.new_token_ids)
        t.cancel()
        assert n == 60
        assert ticks > 5  # the loop kept running while the engine thread computed
    finally:
        await engine.shutdown()


async def test_shutdown_ends_open_streams_with_abort(llama_engine):
    engine = AsyncEngine(llama_engine)
    engine.start()
    [prompt] = prompts(1, [10], seed=24)
    reasons = []

    async def consume():
        async for out in engine.stream("s", prompt, SamplingParams(max_tokens=250, ignore_eos=True)):
            if out.finished:
                reasons.append(out.finish_reason)

    task = asyncio.create_task(consume())
    await _wait_for(lambda: llama_engine.block_manager.num_used_blocks > 0)
    await engine.shutdown()
    await asyncio.wait_for(task, 10)
    assert reasons == ["abort"]
    assert llama_engine.block_manager.num_used_blocks == 0
