"""LocalBackend: the Backend contract over the embedded engine."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import Backend, BackendError, GenerationRequest, SamplingParams
from backends.engine.args import EngineArgs
from backends.local import LocalBackend, gemma_plain_prompt

OPTIONS = EngineArgs(num_kv_blocks=64, block_size=4, max_model_len=64, max_num_batched_tokens=64, num_threads=1,
                     device="cpu")


@pytest.fixture
async def backend(tiny_model_dir):
    b = LocalBackend("slm/0", str(tiny_model_dir("llama")), OPTIONS)
    await b.load()
    yield b
    await b.close()


def req(**kw) -> GenerationRequest:
    kw.setdefault("sampling", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    kw.setdefault("messages", [{"role": "user", "content": "Hello world!"}])
    return GenerationRequest(request_id="r1", model="slm", **kw)


async def test_contract_final_delta_usage_finish_once(backend):
    assert isinstance(backend, Backend)
    assert await backend.health()
    sampling = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2, n=2)
    deltas = [d async for d in backend.generate(req(sampling=sampling))]
    assert sum(1 for d in deltas if d.is_final) == 1 and deltas[-1].is_final
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1]
    usage = deltas[-1].usage
    assert usage.completion_tokens == 10
    assert usage.prompt_tokens == backend.num_prompt_tokens(req())
    lps = [lp for d in deltas if d.index == 0 for lp in d.logprobs]
    assert len(lps) == 5 and all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in lps)
    text0 = "".join(d.text for d in deltas if d.index == 0)
    ids0 = [t for d in deltas if d.index == 0 for t in d.token_ids]
    assert text0 == backend.tokenizer.decode(ids0, skip_special_tokens=True)


async def test_errors(backend):
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(BackendError) as info:  # the gateway refuses this first; the backend still says which field
        [d async for d in backend.generate(req(tools=tools, tool_choice={"type": "function",
                                                                          "function": {"name": "g"}}))]
    assert (info.value.status_code, info.value.code, info.value.param) == (400, "invalid_tool_choice", "tool_choice")
    assert not info.value.retryable
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/none"}}}}}
    with pytest.raises(BackendError) as info:
        [d async for d in backend.generate(req(response_format=bad))]
    assert (info.value.status_code, info.value.code, info.value.param) == (400, "invalid_schema", "response_format")
    with pytest.raises(BackendError) as info:
        [d async for d in backend.generate(req(messages=[{"role": "user", "content": "hello " * 100}]))]
    assert info.value.code == "context_length_exceeded" and info.value.status_code == 400
    with pytest.raises(BackendError) as info:  # a token id outside the vocabulary
        [d async for d in backend.generate(req(messages=None, prompt=[1, 10**6]))]
    assert info.value.status_code == 400 and info.value.code == "invalid_parameter"


async def test_aclose_aborts_and_frees_blocks(backend):
    gen = backend.generate(req(sampling=SamplingParams(max_tokens=50, ignore_eos=True)))
    await anext(gen)
    engine = backend.llm_engine
    assert engine.block_manager.num_used_blocks > 0
    await gen.aclose()
    for _ in range(500):
        if engine.block_manager.num_used_blocks == 0 and not engine.requests:
            break
        await asyncio.sleep(0.01)
    assert engine.block_manager.num_used_blocks == 0


async def test_completion_prompt_string_and_ids(backend):
    text = [d async for d in backend.generate(req(messages=None, prompt="The quick brown"))]
    ids = backend.tokenizer("The quick brown")["input_ids"]
    by_ids = [d async for d in backend.generate(req(messages=None, prompt=ids))]
    assert "".join(d.text for d in text) == "".join(d.text for d in by_ids)


def test_gemma_plain_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert gemma_plain_prompt(msgs) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


async def test_gemma_plain_backend_runs(tiny_model_dir):
    b = LocalBackend("llm/0", str(tiny_model_dir("gemma3")), OPTIONS, chat_template="gemma_plain")
    await b.load()
    try:
        deltas = [d async for d in b.generate(req())]
        assert deltas[-1].is_final and deltas[-1].finish_reason in ("stop", "length")
        assert b.num_prompt_tokens(req()) > 5
    finally:
        await b.close()
    assert not await b.health()


def test_plain_turns_prompt_and_stops():
    from backends.local import PLAIN_TURNS_STOPS, builtin_prompt, builtin_stops, plain_turns_prompt

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert plain_turns_prompt(msgs) == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"
    assert builtin_prompt("plain_turns", msgs) == plain_turns_prompt(msgs)
    assert builtin_prompt("{{ jinja }}", msgs) is None
    assert builtin_stops("plain_turns") == PLAIN_TURNS_STOPS and builtin_stops(None) == ()


async def test_plain_turns_backend_stops_at_next_turn(tiny_model_dir):
    b = LocalBackend("llm/0", str(tiny_model_dir("llama")), OPTIONS, chat_template="plain_turns")
    await b.load()
    try:
        req = GenerationRequest(request_id="p", model="m", messages=[{"role": "user", "content": "Hi"}],
                                sampling=SamplingParams(temperature=0.0, max_tokens=8))
        assert b.sampling_params(req).stop[-2:] == ("\nUser:", "\nAssistant:")
        completion = GenerationRequest(request_id="c", model="m", prompt="Hi", sampling=req.sampling)
        assert b.sampling_params(completion) is req.sampling  # passed on as it is
        text = "".join([d.text async for d in b.generate(req)])
        assert "\nUser:" not in text
    finally:
        await b.close()
