"""Three pools routed by an N-model router artifact trained and calibrated in the test (the training CLI), through
the live gateway and the official openai client."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import openai
import pytest

from gateway.app import create_app
from gateway.protocol import SwitchyardInfo
from tests.gateway.fakes import FakeFactory, fake_settings
from training.cli import main

# What each model scores on prompts about each topic: "tiny" is enough for small talk, "mid" for writing
# tasks, only "big" for maths.
TOPICS = {
    "chat": (["hello", "thanks", "weather", "greeting", "coffee", "friend"], {"tiny": 0.9, "mid": 0.92, "big": 0.95}),
    "write": (["recipe", "summary", "translate", "letter", "email", "poem"], {"tiny": 0.2, "mid": 0.9, "big": 0.92}),
    "maths": (["integral", "theorem", "eigenvalue", "proof", "lemma", "topology"], {"tiny": 0.1, "mid": 0.3, "big": 0.9}),
}
PRICES = {"tiny": 1.0, "mid": 5.0, "big": 20.0}  # USD per 1k requests, for calibration; the pools' price ranks alike
POOLS = [
    {"name": "small", "model": "fake-tiny", "price": {"input_per_1m": 1.0, "output_per_1m": 1.0}},
    {"name": "medium", "model": "mid", "price": {"input_per_1m": 5.0, "output_per_1m": 5.0}},
    {"name": "large", "model": "fake-big", "price": {"input_per_1m": 20.0, "output_per_1m": 20.0}},
]


def prompt(topic: str, rng: random.Random) -> str:
    return f"please {' '.join(rng.sample(TOPICS[topic][0], 3))} now"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(router calibrated to a tight budget, the same router calibrated to a generous one)."""
    tmp = tmp_path_factory.mktemp("nmodel")
    rng = random.Random(0)
    rows = []
    for i in range(600):
        topic = list(TOPICS)[i % 3]
        rows.append({"id": str(i), "prompt": prompt(topic, rng), "model_scores": dict(TOPICS[topic][1])})
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prices = [a for m, usd in PRICES.items() for a in ("--price", f"{m}={usd}")]
    assert main(["train", "router", "--kind", "nmodel", "--data", str(data), "--out", str(tmp / "tight"),
                 "--alpha", "0.3", *prices]) == 0
    shutil.copytree(tmp / "tight", tmp / "generous")
    for name, budget in (("tight", "4"), ("generous", "12")):
        assert main(["calibrate", "--model", str(tmp / name), "--data", str(data), "--max-cost", budget]) == 0
    return tmp / "tight", tmp / "generous"


def gateway(live_server, artifact, **routing):
    """A gateway over fake replicas of POOLS; model "tiny" maps to "small" and "big" to "large" in routing.pools,
    "mid" is the model the "medium" pool serves."""
    factory = FakeFactory()
    routing = {"router_artifact": str(artifact), "slm_pool": "small", "llm_pool": "large",
               "pools": {"tiny": "small", "big": "large"}, **routing}
    server = live_server(create_app(fake_settings(pools=POOLS, routing=routing), backend_factory=factory))
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0), factory


def ask(client, text, **kwargs):
    return client.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": text}],
                                                           **kwargs)


def test_three_pools_by_the_nmodel_router(live_server, artifacts):
    """Each topic lands on the pool the router learned for it; headers and body show pool and scores."""
    tight, generous = artifacts
    client, factory = gateway(live_server, generous, quality_tolerance=0.1)
    rng = random.Random(1)
    expected = {"chat": "small", "write": "medium", "maths": "large"}
    for topic, pool in expected.items():
        text = prompt(topic, rng)
        raw = ask(client, text)
        assert (raw.headers["x-switchyard-route"], raw.headers["x-switchyard-model"]) == ("pool", pool), text
        scores = dict(kv.split("=") for kv in raw.headers["x-switchyard-scores"].split(","))
        assert set(scores) == {"small", "medium", "large"}
        info = raw.parse().model_extra["switchyard"]
        assert set(info) == set(SwitchyardInfo.model_fields)  # the documented object, no more, no less
        SwitchyardInfo.model_validate(info)
        assert info["model"] == pool and info["tolerance"] == 0.1 and info["score"] is None
        assert info["scores"] == pytest.approx({k: float(v) for k, v in scores.items()}, abs=1e-4)
        assert max(info["scores"].values()) - info["scores"][pool] <= 0.1
        assert info["scores"]["large"] == pytest.approx(TOPICS[topic][1]["big"], abs=0.05)
        assert [r.messages[-1]["content"] for r in factory.requests(pool)][-1] == text
    chunks = list(client.chat.completions.create(model="auto", stream=True,
                                                 messages=[{"role": "user", "content": prompt("maths", rng)}]))
    assert chunks[-1].model_extra["switchyard"]["model"] == "large"
    assert set(chunks[-1].model_extra["switchyard"]["scores"]) == {"small", "medium", "large"}
    # hints keep their meaning; a named pool bypasses the router
    low = ask(client, prompt("maths", rng), extra_body={"switchyard": {"quality": "low"}})
    assert low.headers["x-switchyard-model"] == "small" and "x-switchyard-scores" not in low.headers
    named = client.chat.completions.with_raw_response.create(
        model="medium", messages=[{"role": "user", "content": prompt("maths", rng)}])
    assert named.headers["x-switchyard-route"] == "explicit" and named.headers["x-switchyard-model"] == "medium"


def mix(client, n=30) -> Counter:
    rng = random.Random(2)
    return Counter(ask(client, prompt(list(TOPICS)[i % 3], rng)).headers["x-switchyard-model"] for i in range(n))


def test_the_cost_budget_and_the_tolerance_move_the_mix(live_server, artifacts):
    """A tighter budget (calibrated tolerance) and a larger tolerance (the setting) both move traffic to
    cheaper pools; the artifact's calibrated tolerance serves when the setting is unset."""
    tight, generous = artifacts
    from routers.router import Router

    t_tight, t_generous = Router.load(tight).tolerance, Router.load(generous).tolerance
    assert t_tight > t_generous
    cost = {"small": 1.0, "medium": 5.0, "large": 20.0}
    spent = {}
    for name, artifact in (("tight", tight), ("generous", generous)):
        client, _ = gateway(live_server, artifact)
        counts = mix(client)
        spent[name] = sum(cost[p] * n for p, n in counts.items()) / sum(counts.values())
        info = ask(client, "please hello coffee friend now").parse().model_extra["switchyard"]
        assert info["tolerance"] == pytest.approx(t_tight if name == "tight" else t_generous, abs=1e-4)
        if name == "tight":
            assert counts["large"] < 5, counts  # the maths third moved off the large pool
        else:
            assert counts["large"] >= 10, counts
    # the budgets are met on average over new prompts, not exactly: calibration's rows are not these
    assert spent["tight"] < 4.0 * 1.25 and spent["tight"] < spent["generous"] < 12.0 * 1.25, spent
    strict, _ = gateway(live_server, tight, quality_tolerance=0.0)
    loose, _ = gateway(live_server, tight, quality_tolerance=5.0)
    assert mix(strict)["large"] == 30 and mix(loose) == Counter({"small": 30})


def test_unmapped_models_fail_start_up_with_one_line(artifacts):
    from gateway.settings import ConfigError
    from gateway.wiring import build_pipeline

    settings = fake_settings(pools=POOLS, routing={"router_artifact": str(artifacts[0]), "slm_pool": "small",
                                                   "llm_pool": "large"})
    with pytest.raises(ConfigError, match=r"match no generate pool: \['big', 'tiny'\]") as e:
        build_pipeline(settings, backend_factory=FakeFactory())
    assert "\n" not in str(e.value)
