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


class _GatedGuard:
    """The real guard behind a gate: its batch entry point waits until the test opens it, and records
    every batch it scored."""

    def __init__(self, guard) -> None:
        import threading

        self.guard = guard
        self.max_chars = guard.max_chars
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[str]] = []

    def classify(self, text):
        return self.guard.classify(text)

    def classify_batch(self, texts):
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.batches.append(list(texts))
        return self.guard.classify_batch(texts)


def _pipeline_with(factory, **swap):
    from gateway.wiring import build_pipeline

    def build(settings):
        pipeline = build_pipeline(settings, backend_factory=factory)
        for name, wrap in swap.items():
            setattr(pipeline, name, wrap(getattr(pipeline, name)))
        return pipeline

    return build


def test_the_event_loop_serves_while_the_guard_runs(live_server, guard_dir, router_dir):
    """With classifiers.batching (the default) the guard runs in its batcher's thread (here for a lone
    request too: inline_when_alone off): while it is held inside a batch, the gateway still answers
    /healthz and an exempt key's request, then the held request completes with its own verdict and route."""
    import threading

    import httpx

    keys = [{"name": "app", "sha256": hash_api_key("sk-app")},
            {"name": "ops", "sha256": hash_api_key("sk-ops"), "guard_exempt": True}]
    settings = fake_settings(api_keys=keys, guard={"artifact": str(guard_dir), "ood": {"action": "allow"}},
                             routing=_routing(router_dir), classifiers={"inline_when_alone": False})
    gated: list[_GatedGuard] = []
    wrap = {"guard": lambda g: gated.append(_GatedGuard(g)) or gated[-1]}
    server = live_server(create_app(settings, pipeline_factory=_pipeline_with(FakeFactory(), **wrap)))
    app = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-app", max_retries=0)
    ops = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-ops", max_retries=0)
    held: dict = {}

    def ask() -> None:
        held["r"] = app.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "please integral theorem proof now"}])

    t = threading.Thread(target=ask)
    t.start()
    assert gated[0].entered.wait(30)  # the request is inside the guard, which is held
    assert httpx.get(server.base_url + "/healthz").status_code == 200
    other = ops.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "please hello coffee friend now"}])
    assert other.headers["x-switchyard-guard"] == "exempt" and other.headers["x-switchyard-route"] == "slm"
    assert "r" not in held and t.is_alive()
    gated[0].gate.set()
    t.join(30)
    r = held["r"]
    assert r.headers["x-switchyard-route"] == "llm" and r.headers["x-switchyard-guard"] in ("domain", "ood")
    assert gated[0].batches[0] == ["please integral theorem proof now"]
    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'switchyard_classifier_requests_total{classifier="guard"} 1.0' in metrics  # the exempt one skipped it
    assert 'switchyard_classifier_requests_total{classifier="router"} 2.0' in metrics
    assert 'switchyard_classifier_batches_total{classifier="router"}' in metrics


def test_batched_and_unbatched_gateways_answer_alike_and_the_router_skips_refused_requests(
        live_server, guard_dir, router_dir):
    """The same requests through a gateway with classifiers.batching on (every request through the
    batchers) and one with it off: the same verdict, route and pool, scores within float rounding; the router scores only requests the guard let through (a refused
    one never reaches it)."""
    texts = ["My landlord has a problem with the lease, what should I do?", "please integral theorem proof now",
             "Der Hund schläft unter dem großen Baum im Garten.", "How do I handle tax and loan?",
             "please hello coffee friend now", "Mañana vamos a la playa con mis amigos."]
    seen: list[str] = []

    class CountingRouter:
        def __init__(self, router) -> None:
            self.router = router

        def __getattr__(self, name):
            return getattr(self.router, name)

        def score_batch(self, batch):
            seen.extend(batch)
            return self.router.score_batch(batch)

    def counted(policy):
        policy.router = CountingRouter(policy.router)
        return policy

    answers = {}
    for batching in (True, False):
        settings = fake_settings(guard={"artifact": str(guard_dir), "ood": {"action": "refuse"}},
                                 routing=_routing(router_dir),
                                 classifiers={"batching": batching, "inline_when_alone": False})
        wrap = {"policy": counted} if batching else {}
        server = live_server(create_app(settings, pipeline_factory=_pipeline_with(FakeFactory(), **wrap)))
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        answers[batching] = []
        for text in texts:
            r = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": text}])
            info = r.parse().model_extra["switchyard"]
            answers[batching].append((r.headers["x-switchyard-guard"], r.headers["x-switchyard-route"],
                                      r.headers["x-switchyard-model"], info["score"], info["threshold"]))
    assert [a[:3] for a in answers[True]] == [a[:3] for a in answers[False]]
    for (*_, score, threshold), (*_, score0, threshold0) in zip(answers[True], answers[False], strict=True):
        assert threshold == threshold0 and (score is None) == (score0 is None)
        assert score is None or abs(score - score0) < 1e-6  # the batch path's float rounding
    refused = [t for t, a in zip(texts, answers[True], strict=True) if a[1] == "policy"]
    assert refused, "some texts are refused by the guard"
    assert sorted(seen) == sorted(t for t in texts if t not in refused)


def test_a_lone_request_classifies_on_the_loop_and_company_goes_to_the_batcher(live_server, guard_dir, router_dir):
    """classifiers.inline_when_alone (default): a request alone between admission and its first token,
    with its classifier idle, runs guard and router on the loop (no thread hop: the batchers score
    nothing); with another request deciding, or a batch running, it goes to the batcher."""
    import httpx

    from gateway.wiring import build_pipeline

    settings = fake_settings(guard={"artifact": str(guard_dir), "ood": {"action": "allow"}}, routing=_routing(router_dir))
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    for text in ("please integral theorem proof now", "My landlord has a problem with the lease, what should I do?"):
        r = client.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": text}])
        assert r.headers["x-switchyard-route"] in ("slm", "llm")
    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'switchyard_classifier_requests_total{classifier="guard"} 0.0' in metrics
    assert 'switchyard_classifier_requests_total{classifier="router"} 0.0' in metrics

    class Stub:
        is_idle = True

    pipeline = build_pipeline(settings, backend_factory=FakeFactory())
    stub = Stub()
    assert pipeline._on_loop(None)  # batching off
    pipeline.num_deciding = 1
    assert pipeline._on_loop(stub)
    stub.is_idle = False  # a batch is running or queued: join it
    assert not pipeline._on_loop(stub)
    stub.is_idle, pipeline.num_deciding = True, 2  # another request is deciding: batch with it
    assert not pipeline._on_loop(stub)
    off = build_pipeline(fake_settings(classifiers={"inline_when_alone": False}), backend_factory=FakeFactory())
    off.num_deciding = 1
    assert not off._on_loop(stub)
