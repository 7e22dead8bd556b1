import json

import pytest

from tests.routers.test_guard import FOREIGN, make_rows
from training.cli import main

TOXIC = ["you are a stupid idiot", "shut up moron nobody cares", "what a worthless loser you are"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(n, seed):
    return [{"text": r.text, "label": r.label, "source": r.source} for r in make_rows(n, seed)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard-data")
    ood = [{"text": t, "label": "ood", "source": "foreign"} for t in FOREIGN] + \
          [{"text": t, "label": "ood", "source": "toxic"} for t in TOXIC]
    return {
        "dir": d,
        "train": write_jsonl(d / "train.jsonl", rows_of(50, 0)),
        "dev": write_jsonl(d / "dev.jsonl", rows_of(15, 1)),
        "test_id": write_jsonl(d / "test_id.jsonl", rows_of(8, 2)),
        "test_ood": write_jsonl(d / "test_ood.jsonl", ood),
    }


@pytest.fixture(scope="module")
def model(files):
    out = files["dir"] / "guard"
    code = main(["train", "guard", "--train", str(files["train"]), "--dev", str(files["dev"]), "--out", str(out),
                 "--kind", "widemlp", "--epochs", "10", "--lr", "0.01", "--hidden", "32"])
    assert code == 0
    return out


@pytest.mark.slow
def test_train_writes_artifact_and_summary(model, capsys):
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["kind"] == "guard"
    assert manifest["meta"]["labels"] == ["finance", "healthcare", "law"]
    assert manifest["meta"]["training_data"]["train"]["rows"] == 150
    assert (model / "MODEL_CARD.md").is_file()


@pytest.mark.slow
def test_eval_json_with_baselines(files, model, capsys, tmp_path):
    plot = tmp_path / "curve.png"
    code = main(["eval", "guard", "--model", str(model), "--test-id", str(files["test_id"]),
                 "--test-ood", str(files["test_ood"]), "--train", str(files["train"]), "--dev", str(files["dev"]),
                 "--max-latency-queries", "60", "--plot", str(plot), "--json"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    for key in ("gqr_score", "id_accuracy", "id_macro_f1", "ood_accuracy", "auroc", "latency_ms_p50",
                "latency_ms_p99", "confusion"):
        assert key in res
    assert set(res["ood_accuracy_per_source"]) == {"foreign", "toxic"}
    assert res["ood_accuracy_per_source"]["foreign"] == 100.0
    assert res["id_accuracy"] > 70
    assert set(res["baselines"]) == {"tfidf_lr", "fasttext"}
    assert plot.is_file() and plot.stat().st_size > 1000
    assert any(line.startswith("guard") for line in out)
    vs = [line for line in out if line.startswith("guard vs tfidf_lr (same run): GQR ")]
    assert len(vs) == 1 and vs[0].endswith("x")
    assert f"{res['gqr_score'] - res['baselines']['tfidf_lr']['gqr_score']:+.2f}" in vs[0]


@pytest.mark.slow
def test_latency_probe_times_every_row_by_default_and_baselines_the_same_count(files, model, capsys):
    code = main(["eval", "guard", "--model", str(model), "--test-id", str(files["test_id"]),
                 "--test-ood", str(files["test_ood"]), "--train", str(files["train"]), "--dev", str(files["dev"]),
                 "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = sum(1 for f in ("test_id", "test_ood") for line in open(files[f]) if line.strip())
    assert res["latency_queries"] == rows
    assert {b["latency_queries"] for b in res["baselines"].values()} == {rows}
    assert 0 < res["latency_ms_p50"] <= res["latency_ms_p99"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ('{"text": "a", "label": "law"}\n{"label": "law"}\n', ":2: missing or non-string 'text'"),
        ('{"text": "a", "label": "law"}\n{"text": "b", "label": "cooking"}\n', ":2: unknown label 'cooking'"),
        ('{"text": "a", "label": "law"}\n{not json\n', ":2: bad JSON"),
    ],
)
def test_bad_test_file_is_one_line_error(files, model, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code = main(["eval", "guard", "--model", str(model), "--test-id", str(bad), "--test-ood", str(files["test_ood"])])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("switchyard: error:") and message in err


def test_bad_training_files(files, tmp_path, capsys):
    no_label = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    code = main(["train", "guard", "--train", str(no_label), "--dev", str(files["dev"]), "--out", str(tmp_path / "o")])
    assert code == 2 and ":1: missing 'label'" in capsys.readouterr().err
    with_ood = write_jsonl(tmp_path / "t2.jsonl", rows_of(2, 0) + [{"text": "x", "label": "ood"}])
    code = main(["train", "guard", "--train", str(with_ood), "--dev", str(files["dev"]), "--out", str(tmp_path / "o")])
    assert code == 2 and "--ood-train" in capsys.readouterr().err
    code = main(["eval", "guard", "--model", str(tmp_path / "nope"), "--test-id", str(files["test_id"]),
                 "--test-ood", str(files["test_ood"])])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_threshold_and_seed_options(files, model, tmp_path, capsys):
    meta = json.loads((model / "manifest.json").read_text())["meta"]
    assert meta["thresholds"]["per_class"] is False and meta["thresholds"]["id_recall"] == 0.9  # the defaults
    out = tmp_path / "per_class"
    code = main(["train", "guard", "--train", str(files["train"]), "--dev", str(files["dev"]), "--out", str(out),
                 "--epochs", "5", "--lr", "0.01", "--hidden", "16", "--threshold", "per-class", "--seeds", "2",
                 "--kind", "widemlp"])
    assert code == 0
    meta = json.loads((out / "manifest.json").read_text())["meta"]
    assert meta["thresholds"]["per_class"] is True and set(meta["members"]) == {"widemlp", "widemlp_1"}
    capsys.readouterr()
    code = main(["train", "guard", "--train", str(files["train"]), "--dev", str(files["dev"]), "--out", str(out),
                 "--seeds", "0"])
    assert code == 2 and "--seeds" in capsys.readouterr().err


def test_encoder_options_are_checked(files, tmp_path, capsys):
    base = ["train", "guard", "--train", str(files["train"]), "--dev", str(files["dev"]), "--out", str(tmp_path / "o"),
            "--kind", "ensemble"]
    assert main([*base, "--encoder-max-length", "2"]) == 2
    assert "--encoder-max-length must be at least 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own one-line usage error
        main([*base, "--encoder-layers", "9"])
    assert e.value.code == 2 and "--encoder-layers" in capsys.readouterr().err


def test_kind_defaults_and_search_options(files, tmp_path, capsys):
    """Each kind gets guard_select's choices unless an option says otherwise; bad values are one line."""
    from training.guard_fit import FitConfig

    e = FitConfig.for_kind("ensemble")
    assert (e.per_class_threshold, e.hidden_knn_dims, e.embedding_knn_dims, e.tfknn_terms) == (False, 64, 64, 0)
    assert (e.encoder_layers, e.encoder_int8, e.encoder_max_length) == (3, True, 32)
    w = FitConfig.for_kind("widemlp", per_class_threshold=None, tfknn_terms=None)
    assert w.per_class_threshold is False and (w.hidden_knn_dims, w.tfknn_terms) == (0, 0)
    assert FitConfig.for_kind("ensemble", per_class_threshold=True, hidden_knn_dims=0).hidden_knn_dims == 0
    with pytest.raises(ValueError, match="unknown guard kind"):
        FitConfig.for_kind("nope")
    out = tmp_path / "terms"
    assert main(["train", "guard", "--train", str(files["train"]), "--dev", str(files["dev"]), "--out", str(out),
                 "--epochs", "5", "--lr", "0.01", "--hidden", "16", "--tfknn-terms", "7", "--knn-dims", "0"]) == 0
    assert json.loads((out / "manifest.json").read_text())["meta"]["members"]["widemlp"]["tfknn_terms"] == 7
    capsys.readouterr()
    assert main(["train", "guard", "--train", str(files["train"]), "--dev", str(files["dev"]), "--out", str(out),
                 "--knn-dims", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--knn-dims" in err[0]


def test_add_encoder_ships_the_graph_an_older_artifact_names(tmp_path, capsys):
    """An ensemble written before artifacts shipped their MiniLM (no files, no recorded "graph": the HF
    graph) is refused with a one-line error; `switchyard artifact add-encoder` exports that graph and adds
    it, and the artifact loads and classifies; a widemlp artifact is left unchanged."""
    from routers.artifact import ArtifactError
    from routers.guard import Guard
    from training.guard_fit import FitConfig, fit_guard

    cfg = FitConfig(kind="ensemble", epochs=10, lr=1e-2, hidden=32, max_features=4096, knn_k=3)
    path = fit_guard(make_rows(20, 0), make_rows(8, 1), cfg).save(tmp_path / "old")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"], manifest["meta"]["members"]["embedding"]["graph"]
    manifest["meta"]["guard_format"] = 3
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"switchyard artifact add-encoder {path}"):
        Guard.load(path)
    capsys.readouterr()
    assert main(["artifact", "add-encoder", str(path)]) == 0
    assert "embedding.minilm.onnx" in capsys.readouterr().out
    again = Guard.load(path)
    assert again.members["embedding"].embedder.graph == "hf"
    assert all(again.classify(t).label == "ood" for t in FOREIGN[:2])
    wide = fit_guard(make_rows(20, 0), make_rows(8, 1), FitConfig(epochs=10, lr=1e-2, hidden=32, knn_k=3))
    assert main(["artifact", "add-encoder", str(wide.save(tmp_path / "wide"))]) == 0
    assert "uses no MiniLM encoder" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_guard_loso_reports_every_held_out_source(files, tmp_path, capsys):
    """`eval guard --loso`: per held-out source and the mean, for the guard `train guard` builds with the
    same options; no test file is read. Without --loso the test files are required (one line)."""
    src = lambda rows: [{**r, "source": f"{r['label']}_{'ab'[i % 2]}"} for i, r in enumerate(rows)]  # noqa: E731
    train = write_jsonl(tmp_path / "train.jsonl", src(rows_of(30, 0)))
    dev = write_jsonl(tmp_path / "dev.jsonl", src(rows_of(10, 1)))
    code = main(["eval", "guard", "--loso", "--train", str(train), "--dev", str(dev), "--ood-val", str(files["test_ood"]),
                 "--kind", "widemlp", "--ood-reject", "0.9", "--json"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert set(res["per_source"]) == {f"loso-{d}_{s}" for d in ("finance", "healthcare", "law") for s in "ab"}
    assert res["kind"] == "widemlp" and 0 <= res["shift_acc"] <= 100 and res["ood_val_gqr"] is not None
    assert any(line.startswith("mean") for line in out)
    assert main(["eval", "guard", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--test-id" in err[0]


@pytest.mark.slow
def test_guard_add_examples_cli_writes_a_new_artifact(model, tmp_path, capsys):
    from routers.guard import Guard
    from tests.routers.test_guard_shift import ticket_texts

    rows = [{"text": t, "label": "finance"} for t in ticket_texts(20, 3)] + [{"text": TOXIC[0], "label": "ood"}]
    f = write_jsonl(tmp_path / "examples.jsonl", rows)
    out = tmp_path / "added"
    assert main(["guard", "add-examples", str(model), "--file", str(f), "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["added"] == {"finance": 20, "ood": 1} and res["artifact"] == str(out)
    shifted = ticket_texts(30, 7)
    after = sum(v.domain == "finance" for v in map(Guard.load(out).classify, shifted))
    assert after > sum(v.domain == "finance" for v in map(Guard.load(model).classify, shifted))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "football", "label": "sports"}])
    assert main(["guard", "add-examples", str(model), "--file", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1" in err[0] and "sports" in err[0]
    assert main(["guard", "add-examples", str(model), "--file", str(f), "--out", str(model)]) == 2
