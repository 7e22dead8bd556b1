"""Routing through the live gateway with artifacts trained in the test, and the example cache in the path."""

from __future__ import annotations

import hashlib
import random
import time

import numpy as np
import openai
import pytest

from gateway.app import create_app
from gateway.pipeline import Pipeline
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, fake_settings

HARD = ["integral", "theorem", "derivative", "eigenvalue", "proof", "lemma", "topology", "manifold"]
EASY = ["hello", "thanks", "weather", "greeting", "hi", "morning", "friend", "coffee"]


def _rows(n: int = 300):
    from training.data import RoutingRow

    rng = random.Random(0)
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        words = rng.sample(HARD if hard else EASY, 3)
        prompt = f"please {' '.join(words)} now"
        rows.append(RoutingRow(prompt=prompt, source="synthetic", row_id=str(i),
                               strong_score=1.0, weak_score=0.0 if hard else 1.0))
    return rows


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory):
    from training.fit import TrainConfig, fit_router

    out = tmp_path_factory.mktemp("router") / "router"
    fit_router(_rows(), TrainConfig(kind="tfidf_lr", strong_share=0.5)).save(out)
    return out


def _routing(router_dir, **cascade):
    return {"router_artifact": str(router_dir), "escalate_band": 0.0,
            "cascade": {"mode": "slm_then_escalate", "stream_mode": "stream_when_confident",
                        "min_mean_logprob": -1.0, **cascade}}


def test_router_artifact_decides_and_headers_show_it(live_server, router_dir):
    factory = FakeFactory()
    server = live_server(create_app(fake_settings(routing=_routing(router_dir)), backend_factory=factory))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    hard = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "please integral theorem proof now"}])
    assert hard.headers["x-switchyard-route"] == "llm" and hard.headers["x-switchyard-model"] == "llm"
    info = hard.parse().model_extra["switchyard"]
    assert info["score"] < info["threshold"]
    easy = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "please hello coffee friend now"}])
    assert easy.headers["x-switchyard-route"] == "slm" and easy.headers["x-switchyard-model"] == "slm"
    assert easy.parse().model_extra["switchyard"]["score"] >= info["threshold"]
    # route "slm" with stream_when_confident streams the SLM directly (no judge: even an unsure answer stays)
    chunks = list(client.chat.completions.create(
        model="auto", stream=True, messages=[{"role": "user", "content": "please hello coffee unsure now"}]))
    assert chunks[-1].model_extra["switchyard"]["model"] == "slm"
    # an explicit model bypasses the router
    explicit = client.chat.completions.with_raw_response.create(
        model="slm", messages=[{"role": "user", "content": "please integral theorem proof now"}])
    assert explicit.headers["x-switchyard-route"] == "explicit" and explicit.headers["x-switchyard-model"] == "slm"
    assert [r.messages[-1]["content"] for r in factory.requests("llm")] == ["please integral theorem proof now"]


def _embed(texts):
    """Deterministic bag-of-words embedding (unit vectors) standing in for MiniLM."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-9)


def test_example_cache_feeds_llm_answers_to_the_slm_per_namespace(live_server):
    keys = [{"name": "team-a", "sha256": hash_api_key("sk-a")}, {"name": "team-b", "sha256": hash_api_key("sk-b")}]
    settings = fake_settings(api_keys=keys, example_cache={"enabled": True, "backend": "memory", "top_k": 2,
                                                           "min_similarity": 0.5})
    factory = FakeFactory()
    app = create_app(settings, pipeline_factory=lambda s: Pipeline.build(s, backend_factory=factory, embed=_embed))
    server = live_server(app)
    a = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-a", max_retries=0)
    b = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-b", max_retries=0)
    question = "how do tides work on earth"
    a.chat.completions.create(model="llm", messages=[{"role": "user", "content": question}])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # admission runs in the background after the response
        resp = a.chat.completions.create(model="auto", messages=[{"role": "user", "content": question + " today"}])
        if resp.model_extra["switchyard"]["num_examples"]:
            break
        time.sleep(0.05)
    slm_messages = factory.requests("slm")[-1].messages
    assert resp.model_extra["switchyard"]["num_examples"] == 1
    assert slm_messages[0] == {"role": "user", "content": question}
    assert slm_messages[1]["role"] == "assistant" and slm_messages[1]["content"].startswith("llm: echo how do tides")
    assert slm_messages[-1]["content"] == question + " today"
    other = b.chat.completions.create(model="auto", messages=[{"role": "user", "content": question + " today"}])
    assert other.model_extra["switchyard"]["num_examples"] == 0
    assert len(factory.requests("slm")[-1].messages) == 1
