import json
import threading

import numpy as np
import pytest

from routers.artifact import ArtifactError
from routers.guard import Guard, GuardVerdict, OODRule
from training.guard_data import GuardRow
from training.guard_fit import FitConfig, fit_guard

VOCAB = {
    "law": ["lawyer", "court", "contract", "tenant", "landlord", "sue", "lawsuit", "judge", "attorney",
            "custody", "lease", "eviction", "statute", "liability", "plaintiff"],
    "finance": ["invest", "stock", "tax", "loan", "budget", "mortgage", "savings", "retirement", "credit",
                "interest", "dividend", "portfolio", "bond", "income", "debt"],
    "healthcare": ["doctor", "symptom", "pain", "medicine", "fever", "diagnosis", "treatment", "dose",
                   "infection", "allergy", "blood", "pressure", "surgery", "vaccine", "headache"],
}
TEMPLATES = ["How do I handle {a} and {b}?", "My {a} has a problem with the {b}, what should I do?",
             "Is it normal that the {a} affects my {b}?", "Can you explain {a} versus {b} for me?",
             "What happens with {a} when {b} changes?"]
FOREIGN = ["Der Hund schläft unter dem großen Baum im Garten.", "Wir fahren morgen früh mit dem Zug nach Berlin.",
           "El gato negro duerme tranquilamente en la ventana.", "Mañana vamos a la playa con mis amigos.",
           "Jeg tror ikke på det, for det bringer skam over familien.", "Det regner hele dagen i København."]


def make_rows(n_per_class: int, seed: int) -> list[GuardRow]:
    rng = np.random.RandomState(seed)
    rows = []
    for label, words in VOCAB.items():
        for _ in range(n_per_class):
            a, b = rng.choice(words, 2, replace=False)
            rows.append(GuardRow(TEMPLATES[rng.randint(len(TEMPLATES))].format(a=a, b=b), label, "synthetic"))
    return rows


@pytest.fixture(scope="module")
def guard() -> Guard:
    cfg = FitConfig(kind="widemlp", epochs=10, lr=1e-2, hidden=32, max_features=4096, id_recall=0.95, knn_k=3)
    return fit_guard(make_rows(60, 0), make_rows(20, 1), cfg)


def test_classifies_domains(guard):
    test = make_rows(10, 2)
    batch = guard.score_batch([r.text for r in test], id_recall=1.0)
    acc = np.mean([p == r.label for p, r in zip(batch.labels, test, strict=True)])
    assert acc >= 0.9
    v = guard.classify("My landlord has a problem with the lawyer, what should I do?")
    assert isinstance(v, GuardVerdict)
    assert (v.label, v.domain) == ("domain", "law")
    assert 0 < v.confidence <= 1 and set(v.scores) >= {"law", "finance", "healthcare", "id_percentile"}


def test_foreign_text_is_ood(guard):
    verdicts = [guard.classify(t) for t in FOREIGN]
    assert all(v.label == "ood" and v.domain is None for v in verdicts), verdicts
    assert all(0 <= v.confidence <= 1 for v in verdicts)


def test_save_load_same_predictions(guard, tmp_path):
    texts = [r.text for r in make_rows(5, 3)] + FOREIGN
    path = guard.save(tmp_path / "g")
    again = Guard.load(path)
    a, b = guard.score_batch(texts), again.score_batch(texts)
    assert a.labels == b.labels
    assert np.allclose(a.probs, b.probs, atol=1e-3)
    assert [guard.classify(t).label for t in texts] == [again.classify(t).label for t in texts]
    assert again.meta["thresholds"]["id_recall"] == 0.95


def _many_texts(n: int, seed: int) -> list[str]:
    """In-domain rows, foreign sentences, their mixtures and noise: texts on both sides of the threshold."""
    rng = np.random.RandomState(seed)
    rows = [r.text for r in make_rows(n, seed)]
    mixed = [f"{a} {b}" for a, b in zip(rows, rng.permutation(FOREIGN * n), strict=False)]
    noise = ["".join(rng.choice(list("abcdefghij klmnop"), size=rng.randint(0, 40))) for _ in range(n)]
    return rows + mixed + noise + FOREIGN + ["", "1234 5678"]


@pytest.fixture(scope="module")
def early_ensemble() -> Guard:
    cfg = FitConfig(kind="ensemble", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3, early_accept=0.4)
    return fit_guard(make_rows(30, 0), make_rows(40, 1), cfg)


@pytest.mark.parametrize("which", ["guard", "early_ensemble"])
def test_classify_is_score_batch_on_one_row(which, request):
    """``classify`` = ``score_batch`` of one row + the early-exit stage: on many texts the labels are equal
    and the scores agree within float rounding (an early verdict's id_percentile is an upper bound)."""
    g = request.getfixturevalue(which)
    texts = _many_texts(30, 9)
    batch = g.score_batch(texts)
    single = [g.classify(t) for t in texts]
    assert len(texts) > 100 and [v.domain or v.label for v in single] == batch.labels
    for v, pct, probs in zip(single, batch.id_percentile, batch.probs, strict=True):
        if v.scores.get("early_exit"):
            assert v.label == "domain" or v.scores["id_percentile"] >= pct - 1e-9
            continue
        assert abs(v.scores["id_percentile"] - pct) < 1e-3
        assert np.allclose([v.scores[c] for c in g.classes], probs, atol=1e-5)


def test_thresholds_are_monotone(guard):
    recalls = [0.5, 0.8, 0.9, 0.95, 0.99, 1.0]
    ths = [guard.rule.threshold_for(r) for r in recalls]
    assert all(a >= b for a, b in zip(ths, ths[1:], strict=False))
    texts = [r.text for r in make_rows(10, 5)] + FOREIGN
    rejected = [sum(lab == "ood" for lab in guard.score_batch(texts, id_recall=r).labels) for r in recalls]
    assert all(a >= b for a, b in zip(rejected, rejected[1:], strict=False))
    with pytest.raises(ValueError):
        guard.rule.threshold_for(0.0)


def test_rule_keeps_requested_dev_recall():
    rng = np.random.RandomState(0)
    dev = {"a.msp": rng.rand(1000), "a.knn": rng.rand(1000)}
    rule = OODRule.calibrate(dev, 0.9)
    kept = np.mean(rule.percentile(dev) >= rule.threshold)
    assert 0.89 <= kept <= 0.91


def test_a_chat_is_judged_on_its_request_text(guard):
    from routers.text import request_text

    msgs = [{"role": "system", "content": "Der Hund schläft unter dem Baum."},
            {"role": "user", "content": "Is it normal that the fever affects my headache?"}]
    v = guard.classify(request_text(msgs))
    assert (v.label, v.domain) == ("domain", "healthcare")
    assert guard.classify("Is it normal that the fever affects my headache?" + "x" * 5000) == guard.classify(
        ("Is it normal that the fever affects my headache?" + "x" * 5000)[: guard.max_chars])  # its own limit


def test_thread_safe(guard):
    texts = [r.text for r in make_rows(4, 6)] + FOREIGN
    expected = [guard.classify(t) for t in texts]
    results: list[list[GuardVerdict]] = []

    def work():
        results.append([guard.classify(t) for t in texts])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


def test_unsafe_class_and_bad_labels():
    unsafe = [GuardRow(t, "unsafe", "toxic") for t in
              ["you are a stupid idiot", "i hate you all you morons", "shut up you worthless idiot",
               "go die you stupid moron", "idiot idiot idiot you are worthless"] * 6]
    cfg = FitConfig(kind="widemlp", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3)
    g = fit_guard(make_rows(40, 0), make_rows(10, 1), cfg, unsafe=unsafe)
    assert g.classes[-1] == "unsafe"
    assert g.classify("you stupid worthless idiot moron").label == "unsafe"
    with pytest.raises(ValueError, match="ood"):
        fit_guard(make_rows(5, 0) + [GuardRow("x", "ood", "s")], make_rows(2, 1), cfg)


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError):
        Guard.load(tmp_path / "missing")


def test_malformed_tfidf_references_are_an_artifact_error(guard, tmp_path):
    """The TF-IDF kNN runs scipy's unchecked C loops over the stored references, so an index out of range
    (a corrupt or hand-edited arrays.npz) must be refused at load with one line, never reach them."""
    path = guard.save(tmp_path / "g")
    with np.load(path / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files}
    key = "widemlp.ref_tf.indices"
    n_ref = guard.members["widemlp"].ref_tf.shape[1]
    assert key in arrays and arrays[key].max() < n_ref
    arrays[key] = arrays[key].copy()
    arrays[key][0] = n_ref + 1000
    np.savez(path / "arrays.npz", **arrays)
    with pytest.raises(ArtifactError, match="malformed.*TF-IDF kNN references") as e:
        Guard.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_ensemble_with_minilm_round_trips(tmp_path, bundled_model_dir):
    from routers.embeddings import MiniLMEmbedder

    embedder = MiniLMEmbedder(bundled_model_dir("minilm"), backend="torch")
    cfg = FitConfig(kind="ensemble", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3)
    g = fit_guard(make_rows(20, 0), make_rows(8, 1), cfg, embedder=embedder)
    assert set(g.members) == {"widemlp", "embedding"}
    assert set(g.rule.dev_scores) == {"embedding.knn", "widemlp.knn", "widemlp.tfknn"}
    texts = [r.text for r in make_rows(2, 2)] + FOREIGN[:2]
    again = Guard.load(g.save(tmp_path / "e"), embedder=embedder)
    assert again.kind == "ensemble"
    assert [v.label for v in map(g.classify, texts)] == [v.label for v in map(again.classify, texts)]
    assert all(again.classify(t).label == "ood" for t in FOREIGN[:2])


@pytest.mark.slow
def test_ensemble_default_encoder_is_the_fast_minilm_and_round_trips(tmp_path):
    """Without an embedder the ensemble uses FitConfig's encoder (3 layers, int8, 32 word pieces); the
    artifact records it, and Guard.load rebuilds exactly that encoder."""
    cfg = FitConfig(kind="ensemble", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3)
    g = fit_guard(make_rows(20, 0), make_rows(8, 1), cfg)
    g.save(tmp_path / "fast")
    meta = json.loads((tmp_path / "fast" / "manifest.json").read_text())["meta"]["members"]["embedding"]
    assert (meta["num_layers"], meta["int8"], meta["max_length"]) == (3, True, 32)
    again = Guard.load(tmp_path / "fast")
    assert again.members["embedding"].embedder.spec() == {"max_length": 32, "num_layers": 3, "int8": True,
                                                          "graph": "single"}
    texts = [r.text for r in make_rows(2, 2)] + FOREIGN[:2]
    assert [v.label for v in map(g.classify, texts)] == [v.label for v in map(again.classify, texts)]
    for a, b in zip(map(g.classify, texts), map(again.classify, texts), strict=True):  # float16 references
        assert all(abs(a.scores[k] - b.scores[k]) < 1e-3 for k in g.classes if k in a.scores)
    # the artifact ships the exact graph it was trained with (and serving never exports one)
    manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"embedding.minilm.onnx", "embedding.tokenizer.json"}
    assert again.members["embedding"].embedder.graph_file() == tmp_path / "fast" / "embedding.minilm.onnx"
    # an artifact written before artifacts shipped their encoder: one line naming the command that adds it
    del manifest["files"]
    (tmp_path / "fast" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="switchyard artifact add-encoder") as e:
        Guard.load(tmp_path / "fast")
    assert "\n" not in str(e.value)


def test_unknown_guard_kind_lists_the_valid_ones(guard, tmp_path):
    from routers.guard import guard_kind

    with pytest.raises(ValueError, match="valid kinds: widemlp, embedding, ensemble"):
        guard_kind("forest")
    path = guard.save(tmp_path / "k")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["meta"]["guard_kind"] = "forest"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unknown guard kind 'forest'; valid kinds"):
        Guard.load(path)


def test_per_class_rule_keeps_recall_in_every_domain():
    rng = np.random.RandomState(0)
    pred = np.repeat([0, 1, 2], 400)
    shift = np.array([0.0, 1.0, 3.0])[pred]  # domain 0 has much weaker evidence than domain 2
    dev = {"a.knn": rng.rand(1200) + shift, "a.tfknn": rng.rand(1200) + shift}
    glob = OODRule.calibrate(dev, 0.9)
    per = OODRule.calibrate(dev, 0.9, pred, 3)
    kept_glob = glob.percentile(dev) >= glob.threshold
    kept_per = per.percentile(dev, pred) >= per.threshold
    assert kept_glob[pred == 0].mean() < 0.8  # the global rule rejects the weak domain most
    for c in range(3):
        assert 0.89 <= kept_per[pred == c].mean() <= 0.91
    with pytest.raises(ValueError, match="predicted domain"):
        per.percentile(dev)
    ths = [per.threshold_for(r) for r in (0.5, 0.9, 0.99, 1.0)]
    assert all(a >= b for a, b in zip(ths, ths[1:], strict=False))


@pytest.fixture(scope="module")
def seeded_guard() -> Guard:
    cfg = FitConfig(kind="widemlp", epochs=10, lr=1e-2, hidden=32, max_features=4096, id_recall=0.9, knn_k=3,
                    num_seeds=2, per_class_threshold=True, mahalanobis=True)
    return fit_guard(make_rows(60, 0), make_rows(20, 1), cfg)


@pytest.mark.slow
def test_seeds_and_per_class_round_trip(seeded_guard, tmp_path):
    g = seeded_guard
    assert set(g.members) == {"widemlp", "widemlp_1"}
    assert g.rule.class_combined is not None and len(g.rule.class_combined) == 3
    assert set(g.rule.dev_scores) == {"widemlp.knn", "widemlp.tfknn"}
    texts = [r.text for r in make_rows(5, 3)] + FOREIGN
    again = Guard.load(g.save(tmp_path / "s"))
    assert again.meta["guard_format"] == 5 and again.meta["thresholds"]["per_class"] is True
    assert g.score_batch(texts).labels == again.score_batch(texts).labels
    assert [g.classify(t).label for t in texts] == [again.classify(t).label for t in texts]
    assert all(again.classify(t).label == "ood" for t in FOREIGN)
    batch = again.score_batch(texts)
    assert np.allclose([again.classify(t).scores["id_percentile"] for t in texts], batch.id_percentile, atol=1e-3)


def test_evidence_components(seeded_guard):
    """Serving computes the evidence its rule combines; the experiments' ``energy`` and ``maha`` live in
    training (``experiment_evidence``) and never run in serving."""
    from training.guard_select import experiment_evidence

    texts = ["How do I sue my landlord?", "Det regner."]
    wide = seeded_guard.members["widemlp"]
    probs, comps = wide.evidence(texts)
    assert set(comps) == {"knn", "tfknn", "vocab"}  # "centroid" only for a member fitted with centroids
    assert probs.shape == (2, 3) and all(v.shape == (2,) for v in comps.values())
    assert seeded_guard.evidence_wanted("widemlp") == {"knn", "tfknn"}
    _, served = wide.evidence(texts, {"tfknn"})
    assert set(served) == {"tfknn"} and np.array_equal(served["tfknn"], comps["tfknn"])
    extra = experiment_evidence(wide, texts)
    assert set(extra) == {"energy", "maha"} and all(v.shape == (2,) for v in extra.values())


def test_guard_format_versions(guard, tmp_path):
    import json

    path = guard.save(tmp_path / "f")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["meta"].pop("guard_format")  # an artifact written before guard formats existed
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert Guard.load(path).classify(FOREIGN[0]).label == "ood"
    manifest["meta"]["guard_format"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="newer"):
        Guard.load(path)


def test_seeds_share_one_featurizer(seeded_guard, tmp_path):
    again = Guard.load(seeded_guard.save(tmp_path / "share"))
    assert again.members["widemlp"].featurizer is again.members["widemlp_1"].featurizer


class _FakeEmbedder:
    """Deterministic 'sentence embeddings' (unit vectors from a hash of the words) for distillation tests."""

    def encode(self, texts, batch_size=64):
        out = np.zeros((len(texts), 8), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % 8] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_distilled_widemlp_serves_like_a_plain_one(tmp_path):
    cfg = FitConfig(kind="widemlp", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3, distill_weight=1.0)
    g = fit_guard(make_rows(40, 0), make_rows(10, 1), cfg, embedder=_FakeEmbedder())
    assert set(g.members) == {"widemlp"}  # the auxiliary head is not part of the artifact
    again = Guard.load(g.save(tmp_path / "d"))
    texts = [r.text for r in make_rows(3, 2)] + FOREIGN
    assert [v.label for v in map(g.classify, texts)] == [v.label for v in map(again.classify, texts)]
    assert all(again.classify(t).label == "ood" for t in FOREIGN)


def test_top_terms_keeps_the_heaviest_ngrams_in_column_order():
    from routers.guard.sparse import top_terms

    cols, vals = np.array([3, 7, 9, 12, 40]), np.array([0.1, 0.5, 0.2, 0.9, 0.3], dtype=np.float32)
    c, v = top_terms(cols, vals, 3)
    assert c.tolist() == [7, 12, 40] and np.allclose(v, [0.5, 0.9, 0.3])
    assert top_terms(cols, vals, 0)[0] is cols and top_terms(cols, vals, 5)[0] is cols


def test_sparse_rows_dot_c_loops_equal_the_public_product():
    """scipy's private C loops give exactly the float32 sums of the public ``q @ ref`` (the fallback)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse import random as sparse_random

    from routers.guard.sparse import _sparsetools, sparse_rows_dot

    assert _sparsetools() is not None  # the fast path is what serving runs with pinned scipy
    rng = np.random.default_rng(0)
    ref = csr_matrix(sparse_random(500, 300, density=0.05, random_state=1, dtype=np.float32))
    for n in (0, 1, 37, 200):
        rows = np.sort(rng.choice(500, n, replace=False))
        w = rng.random(n).astype(np.float32)
        fast, public = sparse_rows_dot(ref, rows, w), sparse_rows_dot(ref, rows, w, c_loops=False)
        assert fast.dtype == np.float32 and fast.shape == (300,)
        assert np.array_equal(fast, public) and (np.count_nonzero(fast) > 0 or n == 0)


def test_one_rows_hidden_layer_is_its_row_of_the_batch_product(guard):
    """The serving path's hidden layer of one text (``sparse_row_times``: scipy's loop for that row alone)
    is bit for bit its row of the batch's sparse product, and the fallback (no private C loops) agrees."""
    from routers.guard.sparse import sparse_row_times

    wide = guard.members["widemlp"]
    texts = [row.text for row in make_rows(8, 3)] + FOREIGN + ["", "zzzz qqqq"]
    batch = wide.hidden_of(wide.rows(texts))
    single = np.concatenate([wide.hidden_of(wide.rows([t])) for t in texts])
    assert single.dtype == np.float32 and np.array_equal(single, batch) and np.count_nonzero(single) > 0
    rng = np.random.default_rng(0)
    dense = rng.random((50, 7), dtype=np.float32)
    cols, vals = np.array([2, 9, 31]), rng.random(3, dtype=np.float32)
    fast, fallback = sparse_row_times(cols, vals, dense), sparse_row_times(cols, vals, np.asfortranarray(dense))
    assert np.allclose(fast, vals @ dense[cols], atol=1e-6) and np.allclose(fallback, fast, atol=1e-6)


@pytest.fixture(scope="module")
def capped_guard() -> Guard:
    cfg = FitConfig(kind="widemlp", epochs=10, lr=1e-2, hidden=32, max_features=4096, id_recall=0.9, knn_k=3,
                    tfknn_terms=12)
    return fit_guard(make_rows(60, 0), make_rows(20, 1), cfg)


def test_capped_tfknn_is_the_same_rule_in_batch_and_single(capped_guard, guard, tmp_path):
    """``tfknn_terms`` caps the n-grams "tfknn" reads; the batch (calibration) and single (serving) paths
    must apply the same cap, and the cap must actually change the evidence of a long text."""
    w = capped_guard.members["widemlp"]
    texts = [r.text for r in make_rows(3, 4)] + FOREIGN
    _, batch = w.evidence(texts)
    single = [w.evidence([t])[1]["tfknn"][0] for t in texts]
    assert np.allclose(batch["tfknn"], single, atol=1e-5)
    assert all(len(w.featurizer.transform_one(t)[0]) > 12 for t in texts)  # the cap applies to every text
    uncapped = w.tfknn_terms
    w.tfknn_terms = 0
    try:
        assert not np.allclose(w.evidence(texts)[1]["tfknn"], batch["tfknn"])
    finally:
        w.tfknn_terms = uncapped
    again = Guard.load(capped_guard.save(tmp_path / "capped"))
    assert again.members["widemlp"].tfknn_terms == 12
    assert [capped_guard.classify(t).label for t in texts] == [again.classify(t).label for t in texts]
    assert all(capped_guard.classify(t).label == "ood" for t in FOREIGN)


@pytest.mark.slow
def test_ensemble_with_two_stage_knn_and_chosen_evidence(tmp_path):
    """The ensemble's embedding kNN ranked in a PCA space of ``embedding_knn_dims`` dimensions and exact
    on the best candidates, and an OOD rule without widemlp's hidden-space kNN: serving computes only the
    evidence the rule combines (widemlp's hidden reference is never read), agrees with batch scoring,
    and round-trips."""
    cfg = FitConfig(kind="ensemble", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3,
                    hidden_knn_dims=8, embedding_knn_dims=16, knn_candidates=10, tfknn_terms=12,
                    per_class_threshold=True,
                    ood_components=("msp", "embedding.knn", "widemlp.tfknn"))
    g = fit_guard(make_rows(20, 0), make_rows(8, 1), cfg)
    e = g.members["embedding"]
    w = g.members["widemlp"]
    assert e.coarse.proj.shape == (384, 16) and e.reference.shape == (60, 384) and e.coarse.reference_low.shape == (60, 16)
    assert w.coarse.proj.shape == (32, 8) and w.coarse.candidates == 10
    texts = [r.text for r in make_rows(2, 2)] + FOREIGN[:3]
    emb = e.embedder.encode(texts)
    hid = _unit(w.hidden(texts))
    for member, q in ((e, emb), (w, hid)):
        two_stage, exact = member.coarse.knn(q, member.reference, 3), _exact_knn(q, member.reference, 3)
        assert np.all(two_stage <= exact + 1e-5)  # it can miss neighbours, never invent them
        assert np.allclose(two_stage, exact, atol=0.05)  # ... and finds them in this easy setup
    assert set(g.rule.dev_scores) == {"embedding.knn", "embedding.msp", "widemlp.tfknn", "widemlp.msp"}
    assert g.evidence_wanted("widemlp") == {"tfknn", "msp"} and g.evidence_wanted("embedding") == {"knn", "msp"}
    again = Guard.load(g.save(tmp_path / "ens"))
    again.members["widemlp"].reference = None  # not needed by this rule: classify must not touch it
    single = [again.classify(t) for t in texts]
    batch = g.score_batch(texts)
    assert [v.domain or v.label for v in single] == batch.labels
    assert np.allclose([v.scores["id_percentile"] for v in single], batch.id_percentile, atol=0.02)
    assert all(v.label == "ood" for v in single[-3:])
    loaded = again.members["embedding"]
    assert loaded.coarse.candidates == 10 and np.allclose(loaded.coarse.proj, e.coarse.proj)
    two_stage = e.coarse.knn(emb, e.reference, 3)
    assert np.allclose(loaded.coarse.knn(emb, loaded.reference, 3), two_stage, atol=2e-3)  # float16 on disk
    assert again.members["widemlp"].coarse.proj.shape == (32, 8)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _exact_knn(emb: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    sims = emb @ ref.T
    return np.sort(sims, axis=1)[:, -k:].mean(axis=1)


@pytest.mark.slow
def test_rejects_for_sure_is_an_exact_bound():
    """``rejects_for_sure`` says True only when every value of the unknown components still ends in a
    rejection, global and per-class, checked by brute force over the dev values themselves."""
    rng = np.random.RandomState(3)
    dev = {"w.tfknn": rng.rand(300), "w.knn": rng.rand(300), "e.knn": rng.rand(300)}
    pred = rng.randint(0, 3, 300)
    for rule in (OODRule.calibrate(dev, 0.9), OODRule.calibrate(dev, 0.9, pred, 3)):
        grid = np.linspace(-0.1, 1.1, 25)
        sure_seen = unsure_seen = 0
        for tf in grid:
            sure, pct = rule.rejects_for_sure({"w.tfknn": np.array([tf])})
            worst = max(float(rule.percentile({"w.tfknn": [tf], "w.knn": [a], "e.knn": [b]}, np.array([c]))[0])
                        for a in grid for b in grid for c in range(3))
            assert worst <= pct + 1e-12  # the bound is an upper bound of every completion
            if sure:
                sure_seen += 1
                assert worst < rule.threshold  # ... so a sure rejection is a rejection whatever follows
            else:
                unsure_seen += 1
        assert sure_seen and unsure_seen


@pytest.mark.slow
def test_classify_exits_early_on_foreign_text_with_the_batch_labels():
    """The early exit changes how much is computed, never the label: classify == score_batch on in-domain and
    foreign text, and clearly foreign text is rejected on TF-IDF kNN evidence alone (with 300 dev rows the
    smallest p-value, 0.5 / 301, is far enough below the 5 % threshold of the Fisher sum)."""
    cfg = FitConfig(kind="widemlp", epochs=10, lr=1e-2, hidden=32, max_features=4096, id_recall=0.95, knn_k=3)
    guard = fit_guard(make_rows(60, 0), make_rows(100, 1), cfg)
    assert guard.can_exit_early
    texts = [r.text for r in make_rows(8, 5)] + FOREIGN + ["zzzz qqqq xxxx", "1234 5678", ""]
    verdicts = [guard.classify(t) for t in texts]
    labels = [v.domain if v.label == "domain" else v.label for v in verdicts]
    assert labels == guard.score_batch(texts).labels
    early = [v for v in verdicts if v.scores.get("early_exit")]
    assert early and all(v.label == "ood" and 0 <= v.confidence <= 1 for v in early)
    assert sum(bool(v.scores.get("early_exit")) for v in verdicts[len(texts) - 9:]) >= 3
    assert not any(v.scores.get("early_exit") for v in verdicts[:24] if v.label == "domain")


@pytest.mark.slow
def test_ensemble_early_accept_matches_the_batch_and_round_trips(tmp_path):
    """EarlyAccept: texts widemlp alone rates clearly in-domain stop before MiniLM with widemlp's domain;
    score_batch applies the same rule, so labels agree; the artifact keeps it (guard format >= 3)."""
    cfg = FitConfig(kind="ensemble", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3, early_accept=0.4)
    g = fit_guard(make_rows(30, 0), make_rows(40, 1), cfg)
    assert g.early_accept is not None and g.early_accept.percentile == 0.4
    assert set(g.early_accept.rule.dev_scores) == {"widemlp.knn", "widemlp.tfknn"}
    texts = [r.text for r in make_rows(6, 2)] + FOREIGN
    verdicts = [g.classify(t) for t in texts]
    labels = [v.domain if v.label == "domain" else v.label for v in verdicts]
    assert labels == g.score_batch(texts).labels
    accepted = [v for v in verdicts if v.label == "domain" and v.scores.get("early_exit")]
    assert accepted, "some in-domain texts stop after widemlp"
    assert all(v.domain in g.domains and 0 < v.confidence <= 1 for v in accepted)
    assert all(v.label == "ood" for v in verdicts[-len(FOREIGN):])
    again = Guard.load(g.save(tmp_path / "ea"))
    assert again.meta["guard_format"] == 5 and again.early_accept.percentile == 0.4
    assert list(again.members) == ["embedding", "widemlp"]  # the manifest sorts them: classify must not care
    loaded = list(map(again.classify, texts))
    assert [v.label for v in loaded] == [v.label for v in verdicts]
    assert [bool(v.scores.get("early_exit")) for v in loaded] == [bool(v.scores.get("early_exit")) for v in verdicts]
    g.early_accept = None  # without it every text runs MiniLM: no early domain verdicts
    assert not any(v.scores.get("early_exit") and v.label == "domain" for v in map(g.classify, texts))
