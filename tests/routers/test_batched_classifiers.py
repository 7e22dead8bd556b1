"""Batched classifiers decide exactly as the one-request path: ``Guard.classify_batch`` against
``Guard.classify`` and the router's ``score_batch`` against ``score``, over thousands of varied texts cut
into batches of every size the gateway's batcher forms, and through the ``Batcher`` itself from many
threads at once."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from routers.batcher import Batcher
from routers.guard import Guard
from routers.policy import RoutePolicy
from tests.routers.conftest import routing_rows
from tests.routers.test_guard import FOREIGN, VOCAB, make_rows
from training.guard_fit import FitConfig, fit_guard

HANG = 60.0
FILLER = ["please", "quick", "question", "about", "my", "the", "a", "is", "it", "ok", "I", "think", "today",
          "und", "der", "el", "la", "det", "er", "lol", "!!!", "???", "1999", "$400", "http://x.y/z"]


def varied_texts(n: int, seed: int) -> list[str]:
    """In-domain questions, foreign sentences, mixtures of both, word salad over every domain, noise,
    repeats, long texts past the guard's character budget, empty and whitespace-only texts."""
    rng = np.random.RandomState(seed)
    words = [w for ws in VOCAB.values() for w in ws] + FILLER
    rows = [r.text for r in make_rows(n // 12 + 1, seed)]
    out: list[str] = []
    while len(out) < n:
        kind = rng.randint(8)
        if kind == 0:
            out.append(rows[rng.randint(len(rows))])
        elif kind == 1:
            out.append(FOREIGN[rng.randint(len(FOREIGN))])
        elif kind == 2:
            out.append(f"{rows[rng.randint(len(rows))]} {FOREIGN[rng.randint(len(FOREIGN))]}")
        elif kind == 3:
            out.append(" ".join(rng.choice(words, size=rng.randint(1, 30))))
        elif kind == 4:
            out.append("".join(rng.choice(list("abcdefghij klmnopqrs,.?"), size=rng.randint(0, 80))))
        elif kind == 5:
            out.append(" ".join(rows[rng.randint(len(rows))] for _ in range(rng.randint(15, 40))))  # long
        elif kind == 6:
            out.append(out[rng.randint(len(out))] if out else "")  # a repeat
        else:
            out.append(["", " ", "\n\t", "?", "1234 5678", "ünïcödé ✓ 漢字"][rng.randint(6)])
    return out[:n]


def in_batches(texts: list[str], seed: int, max_batch: int = 32) -> list[list[int]]:
    """Positions of ``texts`` cut into consecutive batches of random sizes 1..max_batch."""
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(texts))
    out, i = [], 0
    while i < len(order):
        k = int(rng.randint(1, max_batch + 1))
        out.append([int(x) for x in order[i:i + k]])
        i += k
    return out


def assert_same_verdict(g: Guard, single, batched, text: str) -> None:
    """Same label, domain and exit; probabilities within float rounding. The in-domain percentile is a
    rank among the dev rows: a text equal to a dev row ties with it, and float rounding (one text's kNN
    product against a batch's) may put it on either side, so it (and an ``ood`` confidence, made of it)
    may move by two dev rows' share; the real test files show no such move (BENCHMARKS.md)."""
    assert (batched.label, batched.domain) == (single.label, single.domain), text
    assert bool(batched.scores.get("early_exit")) == bool(single.scores.get("early_exit")), text
    assert set(batched.scores) == set(single.scores), text
    rank = 2.0 / len(g.rule.dev_combined) + 1e-9
    ood_conf_rank = rank / max(g.rule.threshold, 1e-9)
    assert abs(batched.confidence - single.confidence) <= (ood_conf_rank if single.label == "ood" else 1e-4), text
    for k, v in single.scores.items():
        assert abs(batched.scores[k] - v) <= (rank if k == "id_percentile" else 1e-4), (text, k)


def unique_rows(n_per_class: int, seed: int):
    """``make_rows`` without repeated texts: repeated dev rows tie in every evidence score, and a tie group
    turns a float-rounding difference into a jump of the rank-based in-domain percentile."""
    seen: set[str] = set()
    return [r for r in make_rows(n_per_class, seed) if not (r.text in seen or seen.add(r.text))]


@pytest.fixture(scope="module")
def widemlp_guard() -> Guard:
    cfg = FitConfig(kind="widemlp", epochs=10, lr=1e-2, hidden=32, max_features=4096, id_recall=0.95, knn_k=3)
    return fit_guard(make_rows(60, 0), unique_rows(40, 1), cfg)


@pytest.fixture(scope="module")
def ensemble_guard() -> Guard:
    """The README's recommended kind (widemlp + the fast int8 MiniLM, two-stage kNN, early accept)."""
    cfg = FitConfig(kind="ensemble", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3, early_accept=0.4,
                    hidden_knn_dims=8, embedding_knn_dims=8, knn_candidates=16)
    return fit_guard(make_rows(60, 0), unique_rows(40, 1), cfg)


@pytest.mark.parametrize("which", ["widemlp_guard", "ensemble_guard"])
def test_classify_batch_gives_classify_verdicts_on_thousands_of_texts(which, request):
    g: Guard = request.getfixturevalue(which)
    texts = varied_texts(2000 if which == "widemlp_guard" else 1200, seed=11)
    single = [g.classify(t) for t in texts]
    labels = {v.label for v in single}
    assert {"domain", "ood"} <= labels, labels  # both sides of the threshold are exercised
    if which == "ensemble_guard":  # every exit is exercised: early ood, early accept, full path
        kinds = {(v.label, bool(v.scores.get("early_exit"))) for v in single}
        assert {("ood", True), ("domain", True), ("domain", False)} <= kinds, kinds
    for batch in in_batches(texts, seed=3):
        got = g.classify_batch([texts[i] for i in batch])
        assert len(got) == len(batch)
        for i, v in zip(batch, got, strict=True):
            assert_same_verdict(g, single[i], v, texts[i])
    assert g.classify_batch([]) == []
    with pytest.raises(ValueError, match="str texts"):
        g.classify_batch(["ok", None])  # type: ignore[list-item]


def test_guard_through_the_batcher_from_many_threads(ensemble_guard):
    g = ensemble_guard
    texts = varied_texts(600, seed=5)
    single = [g.classify(t) for t in texts]
    b = Batcher(g.classify_batch, name="guard", max_batch=32, max_wait_s=0.0002)
    got: dict[int, object] = {}

    def caller(part: list[int]) -> None:
        futs = [(i, b.submit(texts[i])) for i in part]
        for i, f in futs:
            got[i] = f.result(HANG)

    threads = [threading.Thread(target=caller, args=(list(range(k, len(texts), 8)),)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(HANG)
    b.close(HANG)
    assert sorted(got) == list(range(len(texts)))
    for i, t in enumerate(texts):
        assert_same_verdict(g, single[i], got[i], t)
    assert b.num_batches < len(texts)  # requests were batched together


@pytest.fixture(scope="module")
def source_router():
    """The README's default router kind (per-source heads) on synthetic rows with three sources."""
    from dataclasses import replace

    from training.fit import TrainConfig, fit_router

    rows = [replace(r, source=("alpha", "beta", "gamma")[i % 3]) for i, r in enumerate(routing_rows(1500, seed=4))]
    return fit_router(rows, TrainConfig(kind="tfidf_source_ridge", eval_fraction=0.2, strong_share=0.4))


@pytest.mark.parametrize("which", ["trained", "source_router"])
def test_router_score_batch_gives_score_and_the_same_routes(which, request):
    router = request.getfixturevalue(which)
    router = router[0] if isinstance(router, tuple) else router
    rows = routing_rows(400, seed=9)
    texts = [r.prompt for r in rows] + varied_texts(1600, seed=12)
    single = np.asarray([router.score(t) for t in texts])
    from gateway.settings import RoutingSettings

    policy = RoutePolicy(RoutingSettings(router_artifact="x"), router)
    assert policy.needs_score() and not policy.needs_score(_hint("low"))
    routes = [policy.decide(t, score=float(s)).route for t, s in zip(texts, single, strict=True)]
    assert [policy.decide(t).route for t in texts[:50]] == routes[:50]  # decide scores alone just the same
    assert {"slm", "llm"} <= set(routes)
    for batch in in_batches(texts, seed=4):
        scores = router.score_batch([texts[i] for i in batch])
        assert np.allclose(scores, single[batch], rtol=0, atol=1e-5)
        for i, s in zip(batch, scores, strict=True):
            decided = policy.decide(texts[i], score=float(s))
            assert decided.route == routes[i], texts[i]


def _hint(quality: str):
    from routers.policy import RouteHint

    return RouteHint(quality=quality)
