"""Constrained decoding in the engine: JSON Schema / JSON object / structural-tag grammars (xgrammar)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from backends.engine.args import EngineArgs
from backends.engine.layers.sampler import apply_token_bitmask
from backends.engine.llm_engine import LLMEngine
from backends.engine.sampling_params import SamplingParams
from backends.engine.structured_output import GrammarError, StructuredOutput

# nested objects, enums, arrays, bounded numbers and strings: every sample ends well inside max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "kind": {"enum": ["person", "company"]},
        "active": {"type": "boolean"},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "tags", "kind", "active", "address"],
}


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def engine(request, tiny_model_dir):
    return LLMEngine(tiny_model_dir(request.param), EngineArgs(num_kv_blocks=256, block_size=16, device="cpu",
                                                               num_threads=1))


def test_bitmask_masks_exactly_the_cleared_bits():
    logits = torch.zeros(2, 70)
    bitmask = torch.full((2, 3), -1, dtype=torch.int32)
    bitmask[0, 0] = 0b1010  # row 0: of tokens 0..31 only 1 and 3 allowed
    bitmask[1, 2] = 0  # row 1: tokens 64..69 refused
    out = apply_token_bitmask(logits, bitmask)
    allowed0 = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert allowed0 == [1, 3, *range(32, 70)]
    assert torch.isfinite(out[1, :64]).all() and torch.isinf(out[1, 64:]).all()


def test_json_schema_samples_parse_and_validate(engine):
    """Random weights at temperature 1: 50 of 50 samples (10 prompts x n=5, own matcher per choice)."""
    spec = StructuredOutput.json_schema(SCHEMA)
    params = [SamplingParams(temperature=1.0, max_tokens=256, seed=10 * i, n=5, structured=spec) for i in range(10)]
    prompts = [[5 + i, 17, 42 + i, 9] for i in range(10)]
    outputs = [o for r in engine.generate(prompts, params) for o in r.outputs]
    assert len(outputs) == 50
    for o in outputs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outputs}) > 40  # sampled, not one forced string


def test_json_object_and_length_cut(engine):
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=1.0, seed=1, max_tokens=256,
                                                      structured=StructuredOutput("json_object")))[0].outputs[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)
    cut = engine.generate([[5, 6, 7]], SamplingParams(temperature=1.0, seed=1, max_tokens=4,
                                                      structured=StructuredOutput.json_schema(SCHEMA)))[0].outputs[0]
    assert cut.finish_reason == "length"  # cut mid-JSON: never reported as a finished (valid) answer
    with pytest.raises(ValueError):
        json.loads(cut.text)


def test_greedy_output_unchanged_when_it_already_conforms(engine):
    """A grammar that admits the unconstrained answer (free text; only a trigger the model never writes
    would open a constrained region) must not change a single greedy token."""
    real = len(engine.tokenizer)  # the fixture's config has unused ids past its BPE vocabulary (no text: never
    free = None                    # allowed by a grammar), so pick a prompt whose free answer uses real tokens
    for start in range(10, 200, 7):
        prompt = [[start, start + 1, start + 2, 14]]
        free = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        if max(free.token_ids) < real:
            break
    assert max(free.token_ids) < real and "<tool_call>" not in free.text
    tag = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<tool_call>"], "at_least_one": False, "stop_after_first": False,
        "tags": [{"type": "tag", "begin": "<tool_call>", "content": {"type": "json_schema", "json_schema": SCHEMA},
                  "end": "</tool_call>"}]}}
    constrained = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                         structured=StructuredOutput.structural_tag(tag)))[0]
    assert constrained.token_ids == free.token_ids


def test_constrained_output_same_under_chunked_prefill_prefix_hits_and_preemption(tiny_model_dir):
    """The matcher follows committed tokens only: a prefix-cache hit, chunked prefill and recompute
    preemption give the same greedy constrained tokens as one roomy engine."""
    folder = tiny_model_dir("qwen2")
    spec = StructuredOutput.json_schema(SCHEMA)
    params = SamplingParams(temperature=0, max_tokens=200, structured=spec)
    prompts = [list(range(5, 5 + 40)) + [100 + i] for i in range(6)]  # a shared 40-token prefix
    roomy = LLMEngine(folder, EngineArgs(num_kv_blocks=512, block_size=4, device="cpu", num_threads=1,
                                         enable_prefix_caching=False))
    expected = [r.token_ids for r in roomy.generate(prompts, params)]
    tight = LLMEngine(folder, EngineArgs(num_kv_blocks=48, block_size=4, max_num_batched_tokens=16, max_model_len=192,
                                         device="cpu",
                                         num_threads=1))
    tight.generate(prompts[:1], params)  # warm the prefix cache
    got = tight.generate(prompts, params)
    stats = tight.stats()
    assert stats.num_preemptions > 0 and stats.prefix_hit_rate > 0
    assert [r.token_ids for r in got] == expected
    for r in got:
        jsonschema.validate(json.loads(r.text), SCHEMA)


def test_bad_schema_is_a_grammar_error_and_specs_compile_once(engine):
    with pytest.raises(GrammarError) as info:
        engine.compile_grammar(StructuredOutput.json_schema({"type": "object", "properties": {
            "a": {"$ref": "#/$defs/missing"}}}))
    assert "missing" in str(info.value) or "ref" in str(info.value).lower()
    before = engine.grammar_compiler.num_compiled
    spec = StructuredOutput.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    first = engine.compile_grammar(spec)
    again = engine.compile_grammar(StructuredOutput.json_schema({"type": "object", "properties": {
        "x": {"type": "integer"}}}))
    assert again is first and engine.grammar_compiler.num_compiled == before + 1
    with pytest.raises(GrammarError):
        engine.add_request([1, 2, 3], SamplingParams(structured=StructuredOutput.json_schema('{"type": 3}')))
    assert not engine.has_unfinished_requests()
