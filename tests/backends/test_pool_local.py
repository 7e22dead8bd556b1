"""Pool over the embedded engine: a real LocalBackend replica (tiny random llama) behind Pool."""

from __future__ import annotations

import pytest

from backends.base import BackendError, GenerationRequest, SamplingParams
from backends.pool import PoolSet
from gateway.settings import settings_from_dict


async def test_pool_streams_from_a_local_replica(tiny_model_dir):
    settings = settings_from_dict({
        "pools": [{"name": "slm", "kind": "local", "model": str(tiny_model_dir("llama")),
                   "engine": {"max_num_seqs": 4, "max_model_len": 256, "num_kv_blocks": 64}}],
        "routing": {"slm_pool": "slm", "llm_pool": "slm"},
    })
    pools = PoolSet.from_settings(settings, health_interval_s=0)
    await pools.start()
    try:
        pool = pools.get("slm")
        request = GenerationRequest(request_id="r", model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                    sampling=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        exact = pool.replicas[0].backend.num_prompt_tokens(request)
        assert exact is None or pool.estimate_tokens(request, pool.replicas[0]) == exact + 5
        streamed = [d async for d in pool.generate(request)]
        buffered = [d async for d in pool.generate(request, stream=False)]
        assert "".join(d.text for d in streamed) == "".join(d.text for d in buffered)
        assert streamed[-1].is_final and streamed[-1].usage.completion_tokens == 5
        assert pools.health() == {"slm": {"slm/0": True}} and sum(r.num_outstanding_tokens for r in pool.replicas) == 0
        with pytest.raises(BackendError) as err:  # local pools cannot do tools
            tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
            [d async for d in pool.generate(GenerationRequest(request_id="t", model="tiny", tools=tools,
                                                              messages=[{"role": "user", "content": "x"}]))]
        assert err.value.status_code == 400 and not err.value.retryable
    finally:
        await pools.close()
