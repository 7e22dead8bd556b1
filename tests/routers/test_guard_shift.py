"""The guard under domain shift: centroid and vocabulary evidence, the OOD-anchored threshold, and
examples a deployment adds to an artifact without retraining (``Guard.add_examples``)."""

import numpy as np
import pytest

from routers.guard import Guard, OODRule
from routers.guard.knn import centroid_similarity, domain_centroids, normalize_rows
from tests.routers.test_guard import FOREIGN, VOCAB, make_rows
from training.guard_data import GuardRow
from training.guard_fit import FitConfig, fit_guard

# in-domain finance text in another style than the training rows' questions: support-ticket notes about the
# same finance terms (the words are the domain's, the phrasing is new)
TICKETS = ["ticket {n} customer reports {a} issue escalation pending agent notes attached re {b}",
           "case {n} caller wants {a} info transferred to {b} desk callback requested",
           "chat log {n} user asks about {a} then {b} resolved by tier two"]


def ticket_texts(n: int, seed: int) -> list[str]:
    rng = np.random.RandomState(seed)
    return [TICKETS[rng.randint(len(TICKETS))].format(n=rng.randint(1000), a=a, b=b)
            for a, b in (rng.choice(VOCAB["finance"], 2, replace=False) for _ in range(n))]


TINY = dict(kind="widemlp", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3)


@pytest.fixture(scope="module")
def guard() -> Guard:
    return fit_guard(make_rows(60, 0), make_rows(20, 1), FitConfig(**TINY, id_recall=0.95))


def test_domain_centroids_are_unit_and_per_domain():
    rng = np.random.RandomState(0)
    rows = normalize_rows(np.r_[rng.randn(50, 8) + 4 * np.eye(8)[0], rng.randn(30, 8) + 4 * np.eye(8)[1]])
    labels = np.r_[np.zeros(50, int), np.ones(30, int)]
    c = domain_centroids(rows, labels, 3)
    assert c.shape == (6, 8) and np.allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    one = domain_centroids(rows, labels, 1)
    assert one.shape == (2, 8) and one[0].argmax() == 0 and one[1].argmax() == 1
    sims = centroid_similarity(rows, one)
    assert sims.shape == (80,) and np.all(sims <= 1.0 + 1e-6)
    assert sims.mean() > 0.6 and centroid_similarity(np.eye(8, dtype=np.float32)[5:6], one)[0] < 0.3


def test_centroid_and_vocab_evidence_serve_and_round_trip(tmp_path):
    cfg = FitConfig(**TINY, centroids_per_domain=2, ood_components=("knn", "tfknn", "centroid", "vocab"))
    g = fit_guard(make_rows(40, 0), make_rows(15, 1), cfg)
    w = g.members["widemlp"]
    assert w.centroids.shape == (6, 32)
    assert set(g.rule.dev_scores) == {"widemlp.knn", "widemlp.tfknn", "widemlp.centroid", "widemlp.vocab"}
    texts = [r.text for r in make_rows(3, 2)]
    _, comps = w.evidence(texts + FOREIGN, {"vocab", "centroid"})
    # in-domain text carries its weight on the training n-grams, foreign text far less
    assert comps["vocab"][: len(texts)].min() > comps["vocab"][len(texts):].max()
    again = Guard.load(g.save(tmp_path / "g"))
    assert np.allclose(again.members["widemlp"].centroids, w.centroids)
    assert [v.domain or v.label for v in map(again.classify, texts + FOREIGN)] == g.score_batch(texts + FOREIGN).labels


def test_ood_anchor_lowers_the_threshold_to_just_above_the_ood_rows():
    """calibrate(ood_components, ood_reject): the threshold rejects ``ood_reject`` of the OOD rows and is
    never above the dev threshold of id_recall."""
    rng = np.random.RandomState(0)
    dev = {"a.knn": rng.rand(1000) + 1.0, "a.tfknn": rng.rand(1000) + 1.0}
    far = {"a.knn": rng.rand(200) * 0.5, "a.tfknn": rng.rand(200) * 0.5}  # below every dev row
    near = {"a.knn": rng.rand(200) + 1.0, "a.tfknn": rng.rand(200) + 1.0}  # like the dev rows
    floor = OODRule.calibrate(dev, 0.9)
    anchored = OODRule.calibrate(dev, 0.9, ood_components=far, ood_reject=0.95)
    assert anchored.threshold < floor.threshold
    assert np.mean(anchored.percentile(far) < anchored.threshold) >= 0.95
    assert np.mean(anchored.percentile(dev) >= anchored.threshold) > 0.99  # looser than the dev quantile
    assert OODRule.calibrate(dev, 0.9, ood_components=near, ood_reject=0.95).threshold == floor.threshold
    meta, arrays = anchored.state("rule.")
    again = OODRule.from_state(meta, arrays, "rule.", 0)
    assert again.threshold == anchored.threshold and again.ood_reject == 0.95
    assert np.array_equal(again.ood_combined, anchored.ood_combined)
    # OOD examples added later raise it, never above the floor
    again.add_ood({"a.knn": np.array([1.05]), "a.tfknn": np.array([1.05])})
    assert anchored.threshold < again.threshold <= floor.threshold
    with pytest.raises(ValueError, match="ood_reject"):
        OODRule.calibrate(dev, 0.9, ood_components=far, ood_reject=1.5)


def test_fit_guard_anchors_on_ood_calibration_rows():
    train, dev = make_rows(40, 0), make_rows(15, 1)
    cal = [GuardRow(t, "ood", "foreign") for t in FOREIGN]
    plain = fit_guard(train, dev, FitConfig(**TINY, id_recall=0.9))
    anchored = fit_guard(train, dev, FitConfig(**TINY, id_recall=0.9, ood_reject=1.0), ood_calibration=cal)
    assert anchored.rule.ood_reject == 1.0 and len(anchored.rule.ood_combined) == len(FOREIGN)
    assert anchored.rule.threshold <= plain.rule.threshold
    assert all(v.label == "ood" for v in map(anchored.classify, FOREIGN))


def test_add_examples_teaches_a_new_style_without_retraining(guard, tmp_path):
    """A finance guard trained on questions rejects support-ticket notes about finance; after
    ``add_examples`` with some of them, other notes of that style are accepted as finance, foreign text is
    still rejected, and the original artifact is unchanged."""
    path = guard.save(tmp_path / "orig")
    shifted = ticket_texts(40, 7)
    before = [v.label for v in map(guard.classify, shifted)]
    assert before.count("ood") >= 25, before
    g = Guard.load(path)
    n_ref, n_tf = len(g.members["widemlp"].reference), g.members["widemlp"].ref_tf.shape[1]
    added = g.add_examples(ticket_texts(20, 3), ["finance"] * 20)
    assert added == {"finance": 20} and n_ref + 15 <= len(g.members["widemlp"].reference) <= n_ref + 20
    assert g.members["widemlp"].ref_tf.shape[1] == n_tf + 20
    after = Guard.load(g.save(tmp_path / "added"))
    verdicts = list(map(after.classify, shifted))
    assert sum(v.domain == "finance" for v in verdicts) >= 36, [v.domain or v.label for v in verdicts]
    assert after.meta["added_examples"] == {"finance": 20}
    assert all(v.label == "ood" for v in map(after.classify, FOREIGN))
    assert [v.label for v in map(Guard.load(path).classify, shifted)] == before
    assert [v.domain or v.label for v in map(after.classify, shifted)] == after.score_batch(shifted).labels


def test_examples_of_unknown_words_do_not_join_the_hidden_references(guard):
    """Text whose n-grams widemlp never kept collapses in its hidden space: such examples join the TF-IDF
    references only, so foreign text does not ride on them into the domain."""
    import copy

    g = copy.deepcopy(guard)
    n_ref, n_tf = len(g.members["widemlp"].reference), g.members["widemlp"].ref_tf.shape[1]
    unknown = ["Why was my chargeback blocked by the teller today", "Please unlock the contactless pin for me"]
    g.add_examples(unknown, ["finance", "finance"])
    assert len(g.members["widemlp"].reference) == n_ref and g.members["widemlp"].ref_tf.shape[1] == n_tf + 2
    assert all(v.label == "ood" for v in map(g.classify, FOREIGN))


def test_add_examples_ood_rows_and_bad_labels(guard):
    import copy

    g = copy.deepcopy(guard)
    before = g.rule.threshold
    g.add_examples(FOREIGN[:2], ["ood", "ood"])
    assert len(g.rule.ood_examples) == 2  # an unanchored rule sits at the dev threshold already: unchanged
    assert g.rule.threshold == before == g.rule.threshold_for(g.rule.id_recall)
    with pytest.raises(ValueError, match="unknown label 'sports'"):
        g.add_examples(["football scores"], ["sports"])
    with pytest.raises(ValueError, match="labels"):
        g.add_examples(["a", "b"], ["finance"])


def test_semantic_accept_keeps_what_its_own_evidence_vouches_for():
    """SemanticAccept: a row the main rule rejects is kept when its own rule puts it at or above the
    percentile; ``could_accept`` bounds a row whose evidence is known in part (unknown = most in-domain)."""
    from routers.guard import SemanticAccept

    rng = np.random.RandomState(0)
    dev = {"e.centroid": rng.rand(500), "w.tfknn": rng.rand(500)}
    sem = SemanticAccept(OODRule.calibrate(dev, 0.9), 0.25)
    kept = sem.accepts(dev)
    assert 0.7 <= kept.mean() <= 0.8  # 75 % of the dev rows reach their own 0.25 percentile
    assert sem.could_accept({"w.tfknn": np.array([0.5])})  # centroid unknown: could still get in
    assert not sem.could_accept({"w.tfknn": np.array([-1.0]), "e.centroid": np.array([-1.0])})
    assert sem.accepts({"e.centroid": np.array([2.0]), "w.tfknn": np.array([2.0])})[0]


def test_ensemble_semantic_accept_is_exact_in_classify_and_round_trips(tmp_path):
    """The ensemble's semantic accept (MiniLM domain centroids + TF-IDF kNN): classify's early exits stay
    exact (its labels are score_batch's), foreign text is still rejected, and the artifact (format 5)
    round-trips the centroids and the accept."""
    cfg = FitConfig.for_kind("ensemble", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3,
                             hidden_knn_dims=0, embedding_knn_dims=0)
    assert cfg.semantic_accept == 0.25 and cfg.centroids_per_domain == 1
    g = fit_guard(make_rows(20, 0), make_rows(8, 1), cfg)
    assert g.semantic_accept is not None and set(g.semantic_accept.rule.dev_scores) == {"embedding.centroid",
                                                                                          "widemlp.tfknn"}
    assert g.members["embedding"].centroids.shape == (3, 384) and g.members["widemlp"].centroids is None
    assert "centroid" in g.evidence_wanted("embedding")
    texts = [r.text for r in make_rows(2, 2)] + ticket_texts(4, 5) + FOREIGN[:3]
    again = Guard.load(g.save(tmp_path / "ens"))
    assert again.meta["guard_format"] == 5 and again.semantic_accept.percentile == 0.25
    single = [again.classify(t) for t in texts]
    assert [v.domain or v.label for v in single] == g.score_batch(texts).labels
    assert [v.domain or v.label for v in again.classify_batch(texts)] == [v.domain or v.label for v in single]
    assert all(v.label == "ood" for v in single[-3:])
    off = Guard.load(tmp_path / "ens")
    off.semantic_accept = None
    assert sum(v.label == "domain" for v in map(off.classify, texts)) <= sum(v.label == "domain" for v in single)
