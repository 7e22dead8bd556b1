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


def test_single_and_batch_agree(guard):
    texts = [r.text for r in make_rows(3, 4)] + FOREIGN
    batch = guard.score_batch(texts)
    single = [guard.classify(t) for t in texts]
    assert [v.domain or v.label for v in single] == batch.labels
    assert np.allclose([v.scores["id_percentile"] for v in single], batch.id_percentile, atol=1e-3)


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


def test_classify_messages_uses_last_user_turn(guard):
    msgs = [{"role": "system", "content": "Der Hund schläft unter dem Baum."},
            {"role": "user", "content": "Is it normal that the fever affects my headache?"}]
    v = guard.classify_messages(msgs)
    assert (v.label, v.domain) == ("domain", "healthcare")


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


@pytest.mark.slow
def test_ensemble_with_minilm_round_trips(tmp_path, bundled_model_dir):
    from routers.features import MiniLMEmbedder

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
