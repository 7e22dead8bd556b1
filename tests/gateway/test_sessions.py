"""Agent sessions in the live gateway: identity, replica affinity, a tier that holds (in process and across
two gateway replicas on one redis-server), examples kept so turns extend each other, remote forwarding."""

from __future__ import annotations

import collections
import json

import openai
import pytest

from gateway.sessions import MemorySessionStore, SessionKey, SessionState, session_of
from tests.gateway.fakes import FakeFactory, fake_app, fake_settings, wait_until

SYSTEM = "You are a careful agent. " * 40  # ~1 kB shared by every session


def _client(server, **headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, default_headers=headers)


def _info(resp) -> dict:
    return resp.model_extra["switchyard"]


def test_session_identity_precedence():
    headers = {"x-session-id": "h", "x-program-id": "p"}
    assert session_of(headers, "body", "cache-key", "user") == ("h", "p")
    assert session_of({}, "body", "cache-key", "user") == ("body", "body")
    assert session_of({}, None, "cache-key", "user") == ("cache-key", "cache-key")
    assert session_of({}, None, None, "user") == ("user", "user")
    assert session_of({}, None, None, None) == (None, None)
    assert len(session_of({"x-session-id": "s" * 1000}, None, None, None)[0]) == 256


async def test_memory_store_expires_and_is_bounded():
    now = [0.0]
    store = MemorySessionStore(ttl_s=10, max_entries=2, clock=lambda: now[0])
    a, b, c = (SessionKey("ns", x) for x in "abc")
    await store.put(a, SessionState(tier="llm"))
    assert (await store.get(a)).holds_llm
    assert await store.get(SessionKey("other-ns", "a")) is None  # scoped by namespace
    now[0] = 11
    assert await store.get(a) is None
    await store.put(a, SessionState(tier="llm"))
    await store.put(b, SessionState(tier="llm"))
    await store.put(c, SessionState(tier="llm"))
    assert await store.get(a) is None and await store.get(c) is not None


def test_every_turn_of_a_session_lands_on_its_replica_and_load_stays_balanced(live_server):
    """3 replicas, 20 sessions x 6 turns sharing one 1 kB system prompt: one replica per session, and the
    shared system prompt does not pull every session onto one replica (max/min load <= 2)."""
    settings = fake_settings(pools=[{"name": "slm", "model": "fake-slm", "replicas": 3},
                                    {"name": "llm", "model": "fake-llm"}])
    factory = FakeFactory()
    server = live_server(fake_app(settings, factory))
    for turn in range(6):
        for s in range(20):
            _client(server, **{"x-session-id": f"agent-{s}"}).chat.completions.create(
                model="slm", messages=[{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": f"task {s} step {turn}"}])
    replica_of: dict[str, set[str]] = collections.defaultdict(set)
    load = collections.Counter()
    for backend in factory.backends["slm"]:
        for r in backend.requests:
            replica_of[r.session_id].add(backend.name)
            load[backend.name] += 1
    assert len(replica_of) == 20 and all(len(names) == 1 for names in replica_of.values())
    assert len(load) == 3 and max(load.values()) <= 2 * min(load.values())
    # without a session: the prefix after the shared system prompt decides, so they spread too
    for s in range(30):
        _client(server).chat.completions.create(model="slm", messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": f"question number {s}"}])
    no_session = collections.Counter(b.name for b in factory.backends["slm"] for r in b.requests
                                     if r.session_id is None)
    assert len(no_session) == 3


def test_the_tier_holds_after_an_escalation_and_never_bounces(live_server):
    factory = FakeFactory()
    server = live_server(fake_app(fake_settings(), factory))
    agent = _client(server, **{"x-session-id": "agent-1"})
    first = agent.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "i am unsure"}])
    assert first.headers["x-switchyard-model"] == "llm" and _info(first.parse())["escalated"]
    for turn in range(4):  # confident turns the router alone would keep on the SLM
        raw = agent.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"i am certain {turn}"}])
        assert raw.headers["x-switchyard-route"] == "session" and raw.headers["x-switchyard-model"] == "llm"
    other = _client(server, **{"x-session-id": "agent-2"}).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "i am certain"}])
    assert other.headers["x-switchyard-model"] == "slm"  # another session is not held
    explicit = agent.chat.completions.create(model="slm", messages=[{"role": "user", "content": "i am certain"}])
    assert explicit.model == "fake-slm"  # a pool named in the request is served as named


def test_hold_turns_bounds_the_tier(live_server):
    server = live_server(fake_app(fake_settings(sessions={"hold_turns": 2}), FakeFactory()))
    agent = _client(server, **{"x-session-id": "s"})
    agent.chat.completions.create(model="auto", messages=[{"role": "user", "content": "i am unsure"}])
    models = [agent.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "i am certain"}]).headers["x-switchyard-model"]
        for _ in range(4)]
    assert models == ["llm", "llm", "slm", "slm"]


def test_two_gateway_replicas_share_the_tier_through_redis(live_server, redis_url):
    servers = [live_server(fake_app(fake_settings(redis_url=redis_url), FakeFactory())) for _ in range(2)]
    a, b = (_client(s, **{"x-session-id": "shared-agent"}) for s in servers)
    a.chat.completions.create(model="auto", messages=[{"role": "user", "content": "i am unsure"}])

    def held_on_b():
        raw = b.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "i am certain"}])
        return raw.headers["x-switchyard-route"] == "session"

    wait_until(held_on_b, "the tier set on replica A to hold on replica B")  # the write is in the background


def test_a_session_keeps_its_first_examples_so_turns_extend_each_other(live_server, tiny_model_dir):
    """Turn 2's prompt, rendered through a chat template, starts with turn 1's prompt + answer token ids."""
    from transformers import AutoTokenizer

    settings = fake_settings(example_cache={"enabled": True, "backend": "memory", "top_k": 2,
                                            "min_similarity": 0.3})
    factory = FakeFactory()
    server = live_server(fake_app(settings, factory))
    plain = _client(server)
    plain.chat.completions.create(model="llm", messages=[{"role": "user", "content": "how do tides work on earth"}])
    plain.chat.completions.create(model="llm", messages=[{"role": "user", "content": "why do tides rise twice"}])
    agent = _client(server, **{"x-session-id": "tides"})
    history = [{"role": "user", "content": "how do tides work today"}]

    def first_turn_with_examples():
        resp = agent.chat.completions.create(model="auto", messages=history)
        return resp if _info(resp)["num_examples"] else None

    first = wait_until(first_turn_with_examples, "a first turn with examples")
    turn1 = factory.requests("slm")[-1].messages
    # a new example the cache would rank first for turn 2 must not change the session's examples
    plain.chat.completions.create(model="llm", messages=[{"role": "user", "content": "and what about moon tides"}])
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "and what about moon tides"}]
    wait_until(lambda: agent.chat.completions.create(model="auto", messages=history), "turn 2")
    turn2 = factory.requests("slm")[-1].messages
    assert turn2[:len(turn1)] == turn1  # the same examples, in the same place
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    ids1 = tok.apply_chat_template([*turn1, history[1]], tokenize=True)
    ids2 = tok.apply_chat_template(turn2, tokenize=True, add_generation_prompt=True)
    ids1, ids2 = (list(getattr(x, "input_ids", x)) for x in (ids1, ids2))
    assert ids2[:len(ids1)] == ids1 and len(ids2) > len(ids1)


def test_remote_pools_get_the_session(live_server):
    from bench.fake_upstream import FakeUpstream
    from tests.gateway.fakes import remote_cloud_app

    upstream = FakeUpstream()
    server = live_server(remote_cloud_app(live_server(upstream).base_url))
    _client(server, **{"x-session-id": "agent-7"}).chat.completions.create(
        model="cloud", messages=[{"role": "user", "content": "hi"}])
    assert upstream.last_headers["x-session-id"] == "agent-7"
    assert upstream.last_bodies[-1]["prompt_cache_key"] == "agent-7"
    _client(server).chat.completions.create(model="cloud", messages=[{"role": "user", "content": "hi"}],
                                            extra_body={"prompt_cache_key": "from-body"})
    assert upstream.last_bodies[-1]["prompt_cache_key"] == "from-body"
    assert json.dumps(upstream.last_bodies[-1]).count("from-body") == 1


@pytest.mark.parametrize("body", [{"switchyard": {"session_id": ""}}, {"prompt_cache_key": 5}])
def test_bad_session_fields_are_400(live_server, body):
    server = live_server(fake_app(fake_settings(), FakeFactory()))
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                                extra_body=body)


def test_the_keys_namespace_reaches_the_pool(live_server):
    """Each request carries its API key's namespace to the backend (a local engine shares speculative drafts
    within it); an open gateway's requests carry the default namespace."""
    from gateway.admission import OPEN_NAMESPACE
    from gateway.settings import hash_api_key

    keys = [{"name": "a", "sha256": hash_api_key("sk-a"), "namespace": "team-a"},
            {"name": "b", "sha256": hash_api_key("sk-b")}]
    factory = FakeFactory()
    server = live_server(fake_app(fake_settings(api_keys=keys), factory))
    for key in ("sk-a", "sk-b"):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0).chat.completions.create(
            model="slm", messages=[{"role": "user", "content": "hi"}])
    assert [r.namespace for b in factory.backends["slm"] for r in b.requests] == ["team-a", "b"]
    open_factory = FakeFactory()
    _client(live_server(fake_app(fake_settings(), open_factory))).chat.completions.create(
        model="slm", messages=[{"role": "user", "content": "hi"}])
    assert [r.namespace for b in open_factory.backends["slm"] for r in b.requests] == [OPEN_NAMESPACE]
