import json
from dataclasses import replace

import numpy as np
import pytest

from tests.routers.test_guard import make_rows
from tests.training.test_guard_cli import rows_of, write_jsonl
from training.guard_fit import FitConfig
from training.guard_select import (
    RULES,
    VARIANTS,
    evaluate_rule,
    fit_fold,
    foreign_texts,
    main,
    make_folds,
    select,
)

TINY = FitConfig(epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3)


def test_foreign_texts_are_deterministic_and_foreign():
    texts = ["How do I sue my landlord?", "What is a good index fund?"]
    a, b = foreign_texts(texts, seed=0), foreign_texts(texts, seed=0)
    assert a == b and set(a) == {"synthetic_cipher", "synthetic_shuffle"}
    for out in a.values():
        assert len(out) == 2 and out != texts
        assert [len(t) for t in out] == [len(t) for t in texts]
    assert sorted(a["synthetic_shuffle"][0]) == sorted(texts[0])


def test_folds_leave_one_domain_out():
    train, dev = make_rows(10, 0), make_rows(5, 1)
    folds = make_folds(train, dev, num_foreign=6)
    assert [f.name for f in folds] == ["without-finance", "without-healthcare", "without-law", "full"]
    for f in folds[:3]:
        held = f.name.removeprefix("without-")
        assert held not in {r.label for r in f.train} | {r.label for r in f.dev}
        assert f"{held}/synthetic" in f.ood and len(f.ood[f"{held}/synthetic"]) == 15
        assert len(f.ood["synthetic_cipher"]) == 6
    assert set(folds[3].ood) == {"synthetic_cipher", "synthetic_shuffle"}


@pytest.mark.slow
def test_select_scores_rules_without_test_data():
    train, dev = make_rows(40, 0), make_rows(20, 1)
    results = select(train, dev, [VARIANTS["base"]], [RULES["knn+tfknn"], RULES["msp"]], base=TINY)
    assert len(results) == 2 and results[0]["score"] >= results[1]["score"]
    top = results[0]
    assert set(top["folds"]) == {"without-finance", "without-healthcare", "without-law", "full"}
    # the held-out domain's texts share the templates, but foreign text is rejected
    assert top["folds"]["full"]["per_source"]["synthetic_cipher"] > 50
    assert 0 <= top["id_acc"] <= 100


def test_per_class_rule_and_cache(tmp_path):
    train, dev = make_rows(30, 0), make_rows(20, 1)
    fold = make_folds(train, dev, num_foreign=10)[-1]
    fs = fit_fold(fold, TINY, tmp_path, "tiny")
    assert (tmp_path / "tiny" / "full.pkl").exists()
    again = fit_fold(fold, TINY, tmp_path, "tiny")
    assert np.allclose(fs.dev_probs, again.dev_probs)
    from dataclasses import replace

    r = evaluate_rule(fs, replace(RULES["knn+tfknn"], per_class=True))
    assert 0 <= r["gqr"] <= 100 and set(r["per_source"]) == {"synthetic_cipher", "synthetic_shuffle"}


def test_cli_prints_table_and_json(tmp_path, capsys):
    tr = write_jsonl(tmp_path / "train.jsonl", rows_of(20, 0))
    dv = write_jsonl(tmp_path / "dev.jsonl", rows_of(10, 1))
    assert main(["--train", str(tr), "--dev", str(dv), "--rule", "knn+tfknn", "--no-full", "--json",
                 "--epochs", "5", "--hidden", "16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("variant") and "without-law" in out[0]
    assert json.loads(out[-1])["results"][0]["rule"] == "knn+tfknn"


def test_cached_embedder_embeds_each_text_once(tmp_path, monkeypatch):
    from routers.embeddings import MiniLMEmbedder
    from training.guard_select import CachedEmbedder

    calls = []

    def fake_encode(self, texts, batch_size=64):
        calls.append(list(texts))
        return np.stack([np.full(384, len(t), np.float32) for t in texts])

    monkeypatch.setattr(MiniLMEmbedder, "encode", fake_encode)
    path = tmp_path / "emb.npz"
    e = CachedEmbedder(path)
    a = e.encode(["aa", "b", "aa"])
    assert a.shape == (3, 384) and a[0, 0] == 2 and a[1, 0] == 1 and calls == [["b", "aa"]]
    again = CachedEmbedder(path)  # from disk: no new call
    assert np.array_equal(again.encode(["b", "aa"]), a[[1, 0]]) and len(calls) == 1
    assert again.spec() == {"max_length": 32, "num_layers": 3, "int8": True, "graph": "single"}  # train guard's
    from training.guard_fit import FitConfig

    other = CachedEmbedder(path, FitConfig(encoder_layers=6, encoder_int8=False, encoder_max_length=256))
    other.encode(["b"])  # the file holds another encoder's vectors: embedded anew
    assert len(calls) == 2


def test_rules_name_components_in_full_or_by_suffix():
    from training.guard_select import _pick

    comps = {"widemlp.knn": np.zeros(2), "widemlp.tfknn": np.ones(2), "embedding.knn": np.full(2, 2.0)}
    assert set(_pick(comps, ("knn",))) == {"widemlp.knn", "embedding.knn"}
    assert set(_pick(comps, RULES["eknn+tfknn"].components)) == {"embedding.knn", "widemlp.tfknn"}
    with pytest.raises(ValueError, match="not computed"):
        _pick({"widemlp.knn": np.zeros(2), "widemlp.tfknn": np.ones(2)}, RULES["eknn+tfknn"].components)


@pytest.mark.slow
def test_variants_differing_in_search_options_share_one_fit(monkeypatch):
    import training.guard_select as gs

    calls = []
    real = gs.fit_uncalibrated
    monkeypatch.setattr(gs, "fit_uncalibrated", lambda *a, **k: calls.append(1) or real(*a, **k))
    fold = make_folds(make_rows(30, 0), make_rows(20, 1), num_foreign=10)[-1]
    fitted: dict = {}
    plain = fit_fold(fold, TINY, None, "a", fitted=fitted)
    capped = fit_fold(fold, replace(TINY, tfknn_terms=5), None, "b", fitted=fitted)
    assert len(calls) == 1
    assert not np.allclose(plain.dev_comps["widemlp.tfknn"], capped.dev_comps["widemlp.tfknn"])
    assert np.allclose(plain.dev_comps["widemlp.knn"], capped.dev_comps["widemlp.knn"])
    again = fit_fold(fold, TINY, None, "a", fitted=fitted)  # the options are reset, not inherited
    assert np.allclose(again.dev_comps["widemlp.tfknn"], plain.dev_comps["widemlp.tfknn"])
    fit_fold(fold, replace(TINY, hidden=8), None, "c", fitted=fitted)
    assert len(calls) == 2


def test_ood_val_fold_ranks_by_real_ood_sources():
    """--ood-val: a fold trained on every domain that must reject real OOD rows per source; with it the
    results are ordered by that fold's GQR-score, and --only-ood-val skips the protocol's folds."""
    from training.guard_data import GuardRow
    from training.guard_select import OOD_VAL

    train, dev = make_rows(40, 0), make_rows(20, 1)
    ood = [GuardRow(t, "ood", "german") for t in ["Der Hund schläft im Garten.", "Wir fahren morgen nach Berlin."]]
    ood += [GuardRow(t, "ood", "spanish") for t in ["El gato duerme en la ventana.", "Vamos a la playa mañana."]]
    folds = make_folds(train, dev, num_foreign=6, ood_val=ood)
    assert folds[-1].name == OOD_VAL and folds[-1].ood == {"german": [r.text for r in ood[:2]],
                                                           "spanish": [r.text for r in ood[2:]]}
    assert len(folds[-1].train) == len(train) and len(folds[-1].dev) == len(dev)
    results = select(train, dev, [VARIANTS["base"]], [RULES["knn+tfknn"], RULES["msp"]], base=TINY, ood_val=ood,
                     only_ood_val=True)
    assert [set(r["folds"]) for r in results] == [{OOD_VAL}, {OOD_VAL}]
    assert results[0]["ood_val"] >= results[1]["ood_val"] and results[0]["ood_val"] == results[0]["folds"][OOD_VAL]["gqr"]
    assert set(results[0]["folds"][OOD_VAL]["per_source"]) == {"german", "spanish"}


def test_rule_with_early_accept_trades_rejection_for_skipped_work(tmp_path):
    """RuleSpec.early_accept: rows widemlp alone puts at or above the percentile are kept; a percentile
    above every row changes nothing, a tiny one keeps (almost) everything."""
    train, dev = make_rows(30, 0), make_rows(20, 1)
    fs = fit_fold(make_folds(train, dev, num_foreign=10)[-1], TINY, tmp_path, "tiny")
    base = evaluate_rule(fs, RULES["knn+tfknn"])
    assert evaluate_rule(fs, replace(RULES["knn+tfknn"], early_accept=1.01)) == base
    loose = evaluate_rule(fs, replace(RULES["knn+tfknn"], early_accept=1e-6))
    assert loose["id_acc"] > base["id_acc"] and loose["ood_acc"] <= base["ood_acc"]


def _sourced(rows):
    """Two sources per domain: half the rows of each label in source ``<label>_a``, half in ``<label>_b``."""
    from training.guard_data import GuardRow

    return [GuardRow(r.text, r.label, f"{r.label}_{'ab'[i % 2]}") for i, r in enumerate(rows)]


def test_loso_folds_hold_out_one_source_at_a_time():
    """One fold per source of a domain that keeps another source: its rows are neither trained on nor
    calibrated with, they are the fold's shifted in-domain rows; OOD = the --ood-val sources."""
    from training.guard_data import GuardRow
    from training.guard_select import make_loso_folds

    train, dev = _sourced(make_rows(10, 0)), _sourced(make_rows(4, 1))
    lone = GuardRow("a question of the only source of its domain", "sports", "only")
    ood = [GuardRow("Der Hund schläft im Garten.", "ood", "german")]
    folds = make_loso_folds([*train, lone], dev, ood_val=ood)
    assert [f.name for f in folds] == [f"loso-{d}_{s}" for d in ("finance", "healthcare", "law") for s in "ab"]
    for f in folds:
        held = f.name.removeprefix("loso-")
        assert held not in {r.source for r in f.train} | {r.source for r in f.dev}
        assert {r.source for r in f.shifted} == {held} and len(f.shifted) == 7  # 5 train + 2 dev rows
        assert f.ood == {"german": ["Der Hund schläft im Garten."]}
    assert make_loso_folds(train, dev)[0].ood.keys() == {"synthetic_cipher", "synthetic_shuffle"}
    with pytest.raises(ValueError, match="two sources"):
        make_loso_folds(make_rows(5, 0), make_rows(2, 1))


@pytest.mark.slow
def test_loso_scores_shifted_rows_and_the_ood_anchor_keeps_more_of_them(tmp_path):
    """select(loso=True): the protocol's score is the mean over held-out sources of the GQR formula on
    (shifted rows accepted with their domain, OOD rejected); an OOD-anchored threshold (calibrated on one
    hash half of the OOD rows, scored on the other) keeps at least as many shifted rows as the dev quantile
    when the OOD text is far from every domain."""
    from tests.routers.test_guard import FOREIGN
    from training.guard_data import GuardRow

    train, dev = _sourced(make_rows(30, 0)), _sourced(make_rows(12, 1))
    ood = [GuardRow(t, "ood", "foreign") for t in FOREIGN * 4]
    rules = [RULES["knn+tfknn"], replace(RULES["knn+tfknn"], ood_reject=0.9)]
    res = select(train, dev, [VARIANTS["base"]], rules, base=TINY, ood_val=ood, loso=True, cache=tmp_path)
    by_rule = {r["rule"]: r for r in res}
    assert set(by_rule) == {"knn+tfknn", "knn+tfknn/ood0.9"}
    plain, anchored = by_rule["knn+tfknn"], by_rule["knn+tfknn/ood0.9"]
    assert len([f for f in plain["folds"] if f.startswith("loso-")]) == 6 and plain["ood_val"] is not None
    fold = plain["folds"]["loso-finance_a"]
    assert 0 <= fold["shift_acc"] <= fold["shift_kept"] <= 100
    assert plain["score"] == pytest.approx(np.mean([f["gqr"] for n, f in plain["folds"].items() if n != "ood-val"]))
    assert anchored["shift_kept"] >= plain["shift_kept"]
    assert anchored["folds"]["loso-law_b"]["per_source"]["foreign"] >= 90
