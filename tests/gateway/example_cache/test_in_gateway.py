"""The example cache inside the live gateway: per-namespace examples in the SLM's prompt (in-memory store,
and two gateway replicas on one real redis-server), requests that still succeed while Redis is down, the
admit metric, one embedding per request, and good examples keeping a request on the SLM."""

from __future__ import annotations

import openai
import pytest

from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, bow_embed, fake_app, fake_settings, wait_until

KEYS = [{"name": "team-a", "sha256": hash_api_key("sk-a")}, {"name": "team-b", "sha256": hash_api_key("sk-b")}]


def _gateway(live_server, redis_url: str):
    settings = fake_settings(api_keys=KEYS, example_cache={
        "enabled": True, "backend": "redis", "redis_url": redis_url, "top_k": 2, "min_similarity": 0.5,
        "deadline_ms": 500})
    factory = FakeFactory()
    return factory, live_server(fake_app(settings, factory))


def _client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def _ask_until_examples(client: openai.OpenAI, text: str):
    """Ask until an answer used examples (the admission runs after the response) and return it."""
    def ask():
        resp = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": text}])
        return resp if resp.model_extra["switchyard"]["num_examples"] else None

    return wait_until(ask, f"an answer to {text!r} with examples")


def test_memory_store_feeds_llm_answers_to_the_slm_per_namespace(live_server):
    settings = fake_settings(api_keys=KEYS, example_cache={"enabled": True, "backend": "memory", "top_k": 2,
                                                           "min_similarity": 0.5})
    factory = FakeFactory()
    server = live_server(fake_app(settings, factory))
    a, b = _client(server, "sk-a"), _client(server, "sk-b")
    question = "how do tides work on earth"
    a.chat.completions.create(model="llm", messages=[{"role": "user", "content": question}])
    resp = _ask_until_examples(a, question + " today")  # admission runs in the background after the response
    slm_messages = factory.requests("slm")[-1].messages
    assert resp.model_extra["switchyard"]["num_examples"] == 1
    assert slm_messages[0] == {"role": "user", "content": question}
    assert slm_messages[1]["role"] == "assistant" and slm_messages[1]["content"].startswith("llm: echo how do tides")
    assert slm_messages[-1]["content"] == question + " today"
    other = b.chat.completions.create(model="auto", messages=[{"role": "user", "content": question + " today"}])
    assert other.model_extra["switchyard"]["num_examples"] == 0
    assert len(factory.requests("slm")[-1].messages) == 1


def test_two_gateway_replicas_share_examples_per_namespace(live_server, redis_url):
    f1, g1 = _gateway(live_server, redis_url)
    f2, g2 = _gateway(live_server, redis_url)
    question = "how do tides work on earth"
    _client(g1, "sk-a").chat.completions.create(model="llm", messages=[{"role": "user", "content": question}])
    _client(g1, "sk-b").chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "best pasta sauce recipe"}])

    # replica 2 never saw the LLM answer; it finds it through Redis
    resp = _ask_until_examples(_client(g2, "sk-a"), question + " today")
    assert resp.model_extra["switchyard"]["num_examples"] == 1
    slm_messages = f2.requests("slm")[-1].messages
    assert slm_messages[0] == {"role": "user", "content": question}
    assert slm_messages[1]["role"] == "assistant"
    assert slm_messages[1]["content"].startswith("llm: echo how do tides")
    assert slm_messages[-1] == {"role": "user", "content": question + " today"}
    assert not any("pasta" in m["content"] for m in slm_messages)  # team-b's example stays with team-b

    other = _client(g2, "sk-b").chat.completions.create(
        model="auto", messages=[{"role": "user", "content": question + " today"}])
    assert other.model_extra["switchyard"]["num_examples"] == 0
    assert len(f2.requests("slm")[-1].messages) == 1
    pasta = _ask_until_examples(_client(g2, "sk-b"), "best pasta sauce recipe please")
    assert pasta.model_extra["switchyard"]["num_examples"] == 1
    assert f2.requests("slm")[-1].messages[0]["content"] == "best pasta sauce recipe"


def test_requests_succeed_while_redis_is_down(live_server, redis_server, redis_url):
    import httpx

    factory, server = _gateway(live_server, redis_url)
    client = _client(server, "sk-a")
    question = "why is the sky blue at noon"
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": question}])
    assert _ask_until_examples(client, question).model_extra["switchyard"]["num_examples"] == 1
    assert httpx.get(server.base_url + "/readyz").json()["redis"] is True
    redis_server.stop()
    try:
        for i in range(5):
            resp = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": question}])
            assert resp.choices[0].message.content.startswith("slm: echo")
            assert resp.model_extra["switchyard"]["num_examples"] == 0
            llm = client.chat.completions.create(model="llm", messages=[{"role": "user", "content": f"q {i}"}])
            assert llm.choices[0].finish_reason == "stop"  # the failed admit never reaches the client
        ready = httpx.get(server.base_url + "/readyz")  # the cache fails open: degraded, still ready
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        metrics = httpx.get(server.base_url + "/metrics").text
        assert 'switchyard_example_cache_lookups_total{result="miss"}' in metrics
        assert "switchyard_example_cache_events_total" in metrics
    finally:
        redis_server.start()  # back, empty: the store reconnects by itself after its short back-off

    def examples_again() -> bool:  # each LLM answer offers itself again until one is admitted
        client.chat.completions.create(model="llm", messages=[{"role": "user", "content": question}])
        resp = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": question}])
        return resp.model_extra["switchyard"]["num_examples"] == 1

    wait_until(examples_again, "examples after Redis came back")


def test_admit_metric_counts_only_kept_answers(live_server, redis_url):
    import httpx

    _, gateway = _gateway(live_server, redis_url)
    client = _client(gateway, "sk-a")

    def metric(name: str) -> float:
        for line in httpx.get(gateway.base_url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "how do tides work"}])
    wait_until(lambda: metric("switchyard_example_cache_admits_total") >= 1, "the admit metric")
    # the same question again: a near-duplicate, refused by the store, so the admit metric stays at 1
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "how do tides work"}])
    duplicates = 'switchyard_example_cache_events_total{event="rejected_duplicate"}'
    wait_until(lambda: metric(duplicates) >= 1, "the duplicate metric")
    assert metric(duplicates) == 1.0
    assert metric("switchyard_example_cache_admits_total") == 1.0


def test_an_escalated_request_embeds_its_text_once(live_server):
    calls: list[list[str]] = []

    def counting_embed(texts):
        calls.append(list(texts))
        return bow_embed(texts)

    settings = fake_settings(example_cache={"enabled": True, "backend": "memory", "top_k": 2, "min_similarity": 0.5})
    factory = FakeFactory()
    app = fake_app(settings, factory, counting_embed)
    server = live_server(app)
    client = _client(server, "none")
    store = app.state.pipeline.store

    def wait_admitted(n: int) -> None:
        wait_until(lambda: store.stats["admitted"] >= n, f"{n} admitted")
        assert store.stats["admitted"] == n

    # "unsure": the SLM answer is escalated; the LLM answer is admitted with the lookup's vector
    resp = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "unsure tides work"}])
    assert resp.model_extra["switchyard"]["escalated"] is True
    wait_admitted(1)
    assert calls == [["unsure tides work"]]
    assert store.stats["num_embeds"] == 1 and store.stats["lookups"] == 1
    # a request that names the LLM has no lookup: its admission embeds (once)
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "pasta sauce recipe"}])
    wait_admitted(2)
    assert calls == [["unsure tides work"], ["pasta sauce recipe"]]


def test_good_examples_keep_an_slm_then_escalate_request_on_the_slm(live_server):
    settings = fake_settings(example_cache={"enabled": True, "backend": "memory", "top_k": 2, "min_similarity": 0.5,
                                            "keep_on_slm_similarity": 0.9})
    factory = FakeFactory()
    app = fake_app(settings, factory)
    client = _client(live_server(app), "none")
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "unsure tides work"}])
    store = app.state.pipeline.store
    wait_until(lambda: store.stats["admitted"] >= 1, "the LLM answer admitted")

    # an example at similarity 1.0 >= 0.9: the unsure SLM answer is kept (no cascade)
    kept = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "unsure tides work"}])
    info = kept.parse().model_extra["switchyard"]
    assert kept.headers["x-switchyard-route"] == "slm" and info["model"] == "slm" and not info["escalated"]
    assert info["example_similarity"] == pytest.approx(1.0) and info["reason"].startswith("good examples found")
    assert kept.parse().choices[0].message.content.startswith("slm: echo")
    # a weaker example (0.5 <= similarity < 0.9) is shown to the SLM, but the cascade still judges
    weaker = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "unsure tides work on mars"}]).model_extra["switchyard"]
    assert weaker["num_examples"] == 1 and 0.5 <= weaker["example_similarity"] < 0.9
    assert weaker["route"] == "slm_then_escalate" and weaker["escalated"] is True


def test_keep_on_slm_is_off_by_default(live_server):
    settings = fake_settings(example_cache={"enabled": True, "backend": "memory", "top_k": 2, "min_similarity": 0.5})
    assert settings.example_cache.keep_on_slm_similarity is None
    factory = FakeFactory()
    app = fake_app(settings, factory)
    client = _client(live_server(app), "none")
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "unsure tides work"}])
    wait_until(lambda: app.state.pipeline.store.stats["admitted"] >= 1, "the LLM answer admitted")
    info = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "unsure tides work"}]).model_extra["switchyard"]
    assert info["example_similarity"] == pytest.approx(1.0) and info["escalated"] is True
