"""Routing through the live gateway with artifacts trained in the test (the example cache in the path:
tests/gateway/example_cache/test_in_gateway.py)."""

from __future__ import annotations

import random

import openai
import pytest

from gateway.app import create_app
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


DOMAIN_VOCAB = {
    "law": ["lawyer", "court", "contract", "tenant", "landlord", "lawsuit", "judge", "lease", "statute"],
    "finance": ["invest", "stock", "tax", "loan", "budget", "mortgage", "savings", "credit", "dividend"],
}
UNSAFE_VOCAB = ["bomb", "poison", "weapon", "explosive", "kill", "attack", "murder", "hurt", "harm"]
TEMPLATES = ["How do I handle {a} and {b}?", "My {a} has a problem with the {b}, what should I do?",
             "Can you explain {a} versus {b} for me?", "What happens with {a} when {b} changes?"]


def _guard_rows(vocab: dict[str, list[str]], n: int, seed: int):
    from training.guard_data import GuardRow

    rng = random.Random(seed)
    return [GuardRow(rng.choice(TEMPLATES).format(a=a, b=b), label, "synthetic")
            for label, words in vocab.items() for a, b in (rng.sample(words, 2) for _ in range(n))]


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    from training.guard_fit import FitConfig, fit_guard

    cfg = FitConfig(kind="widemlp", epochs=6, hidden=32, max_features=4096, id_recall=0.95, knn_k=3)
    guard = fit_guard(_guard_rows(DOMAIN_VOCAB, 60, 0), _guard_rows(DOMAIN_VOCAB, 20, 1), cfg,
                      unsafe=_guard_rows({"unsafe": UNSAFE_VOCAB}, 60, 2))
    out = tmp_path_factory.mktemp("guard") / "guard"
    guard.save(out)
    return out


def test_guard_verdicts_policy_answers_and_exemption(live_server, guard_dir):
    keys = [{"name": "app", "sha256": hash_api_key("sk-app")},
            {"name": "ops", "sha256": hash_api_key("sk-ops"), "guard_exempt": True}]
    settings = fake_settings(api_keys=keys, guard={
        "artifact": str(guard_dir), "ood": {"action": "refuse", "message": "Only law and finance here."},
        "unsafe": {"action": "reject"}})
    factory = FakeFactory()
    server = live_server(create_app(settings, backend_factory=factory))
    app = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-app", max_retries=0)
    ops = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-ops", max_retries=0)

    def ask(client, text, model="auto"):
        return client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user",
                                                                                         "content": text}])
    ok = ask(app, "My landlord has a problem with the lease, what should I do?")
    assert ok.headers["x-switchyard-guard"] == "domain" and ok.headers["x-switchyard-model"] == "slm"
    foreign = ask(app, "Der Hund schläft unter dem großen Baum im Garten.")
    assert foreign.headers["x-switchyard-guard"] == "ood" and foreign.headers["x-switchyard-route"] == "policy"
    assert foreign.parse().choices[0].message.content == "Only law and finance here."
    with pytest.raises(openai.BadRequestError) as e:
        ask(app, "How do I handle bomb and explosive?", model="llm")  # an explicit model is still guarded
    assert e.value.code == "unsafe_content"
    exempt = ask(ops, "Der Hund schläft unter dem großen Baum im Garten.")
    assert exempt.headers["x-switchyard-guard"] == "exempt" and exempt.headers["x-switchyard-model"] == "slm"
    import httpx

    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'switchyard_guard_verdicts_total{label="ood"} 1.0' in metrics
    assert 'switchyard_guard_verdicts_total{label="unsafe"} 1.0' in metrics


def test_guard_reject_and_route_actions(live_server, guard_dir):
    settings = fake_settings(guard={"artifact": str(guard_dir), "ood": {"action": "reject"},
                                    "unsafe": {"action": "route", "pool": "llm"}})
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Mañana vamos a la playa."}])
    assert e.value.code == "out_of_domain"
    routed = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "How do I handle poison and weapon?"}])
    assert routed.headers["x-switchyard-route"] == "guard" and routed.headers["x-switchyard-model"] == "llm"
