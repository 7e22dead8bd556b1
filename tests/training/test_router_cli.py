"""`switchyard train router / eval router / calibrate` end to end on synthetic data."""

import json

import numpy as np
import pytest

from routers.router import Router
from tests.training.router_synth import synth_rows, write_jsonl
from training.calibrate import calibrate_scores, share_for_cost, threshold_for_share
from training.cli import main
from training.data import eval_bucket


@pytest.fixture(scope="module")
def data_and_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("router")
    rows = synth_rows(4000, seed=0) + synth_rows(300, seed=5, source="other")
    for r in rows[4000:]:
        r["id"] = "o" + r["id"]
    data = write_jsonl(d / "rows.jsonl", rows)
    out = d / "model"
    assert main(["train", "router", "--data", str(data), "--out", str(out), "--eval-fraction", "0.5",
                 "--slm-price", "0.1", "--llm-price", "2.0"]) == 0
    return data, out


@pytest.mark.slow
def test_eval_json_per_source_and_plot(data_and_model, tmp_path, capsys):
    data, model = data_and_model
    capsys.readouterr()
    plot = tmp_path / "curve.png"
    assert main(["eval", "router", "--model", str(model), "--data", str(data), "--baselines", "--json",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert set(report["per_source"]) == {"synth", "other", "all"}
    synth = report["sources"]["synth"]
    assert report["kind"] == "tfidf_source_ridge"  # the default kind
    assert synth["tfidf_source_ridge"]["apgr"] > synth["random"]["apgr"] + 0.1
    assert "tfidf_lr" in synth and synth["oracle"]["apgr"] >= synth["tfidf_source_ridge"]["apgr"]
    assert 0 <= report["per_source"]["synth"]["cpt50"] <= 1
    assert report["latency_ms_p50"] > 0
    assert plot.stat().st_size > 1000
    assert main(["eval", "router", "--model", str(model), "--data", str(data), "--source", "other", "--json"]) == 0
    only = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(only["per_source"]) == {"other"}


@pytest.mark.slow
def test_calibrate_strong_share_within_two_points(data_and_model, capsys):
    data, model = data_and_model
    capsys.readouterr()
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--strong-share", "0.3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["realised_share"] == pytest.approx(0.3, abs=0.02)
    router = Router.load(model)
    assert router.threshold == pytest.approx(res["threshold"], abs=1e-6)  # the JSON rounds to 6 places
    assert router.meta["calibration"]["target_share"] == 0.3


@pytest.mark.slow
def test_calibrate_max_cost(data_and_model, capsys):
    data, model = data_and_model
    capsys.readouterr()
    # share = (0.67 - 0.1) / (2.0 - 0.1) = 0.3
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--max-cost", "0.67", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["target_share"] == pytest.approx(0.3)
    assert res["expected_cost_per_1k"] <= 0.67 + 2.0 * 0.02


def test_calibration_functions_on_large_heldout():
    rng = np.random.default_rng(0)
    cal, held = rng.beta(2, 5, 20000), rng.beta(2, 5, 20000)
    for share in (0.1, 0.25, 0.5, 0.8):
        c = calibrate_scores(cal, held, share)
        assert abs(c.realised_share - share) < 0.02
    assert threshold_for_share(np.array([0.1, 0.2, 0.3, 0.4]), 0.5) == pytest.approx(0.25)
    assert share_for_cost(1.1, 0.1, 2.1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="below the SLM-only cost"):
        share_for_cost(0.05, 0.1, 2.0)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "strong_score": 1}', "rows.jsonl:2: missing 'weak_score'"),
        ('{"prompt": "", "strong_score": 1, "weak_score": 0}', "rows.jsonl:2: missing or empty 'prompt'"),
        ('{"prompt": "x", "strong_score": 1.5, "weak_score": 0}', "rows.jsonl:2: 'strong_score' must be a number"),
        ('{"prompt": "x", "strong_score": "yes", "weak_score": 0}', "rows.jsonl:2: 'strong_score' must be"),
        ('{"prompt": "x", "strong_score": 1, ', "rows.jsonl:2: not valid JSON"),
        ('[1, 2]', "rows.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_rows_one_line_error(tmp_path, capsys, line, message):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "ok", "strong_score": 1, "weak_score": 1}\n' + line + "\n")
    assert main(["train", "router", "--data", str(f), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_missing_file_and_bad_kind(tmp_path, capsys):
    assert main(["train", "router", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    f = write_jsonl(tmp_path / "r.jsonl", synth_rows(50))
    assert main(["train", "router", "--data", str(f), "--out", str(tmp_path / "m"), "--kind", "magic"]) == 2
    assert "valid kinds" in capsys.readouterr().err


@pytest.mark.slow
def test_nmodel_train_and_eval(tmp_path, capsys):
    rows = []
    for r in synth_rows(600, seed=3, noise=0.0):
        hard = r["weak_score"] < r["strong_score"]
        rows.append({"id": r["id"], "prompt": r["prompt"],
                     "model_scores": {"small": 0.2 if hard else 0.9, "big": 0.9}})
    f = write_jsonl(tmp_path / "n.jsonl", rows)
    nm = str(tmp_path / "nm")
    assert main(["train", "router", "--data", str(f), "--out", nm, "--kind", "nmodel", "--price", "small=1",
                 "--price", "big=4"]) == 0
    capsys.readouterr()
    assert main(["eval", "router", "--model", nm, "--data", str(f), "--json", "--tolerance", "0.3"]) == 0
    rep = _last_json(capsys)
    assert rep["kind"] == "nmodel" and rep["oracle_quality"] >= rep["tolerances"]["0.05"]["quality"]
    assert rep["prices_per_1k"] == {"small": 1.0, "big": 4.0} and rep["cost_range_per_1k"] == [1.0, 4.0]
    assert rep["single_models"]["big"] == {"cost_per_1k": 4.0, "quality": 0.9} and rep["best_single"] == "big"
    # hard prompts are learnable: the router's hull is far above random mixes and reaches "big"'s quality cheaper
    assert rep["aiq"]["random"] + 0.05 < rep["aiq"]["router"] <= rep["aiq"]["oracle"] + 1e-9
    vs = rep["router_vs_best_single"]
    assert vs["router_cost_to_match_its_quality"] < 3.0 and vs["router_quality_at_that_cost"] >= 0.89
    assert set(rep["tolerances"]) == {"0", "0.02", "0.05", "0.1", "0.3"}
    # calibrate: a budget per 1k requests sets the tolerance; a smaller budget, a larger tolerance
    tolerances = []
    for budget in ("3.5", "2"):
        assert main(["calibrate", "--model", nm, "--data", str(f), "--max-cost", budget, "--json"]) == 0
        cal = _last_json(capsys)
        assert cal["expected_cost_per_1k"] <= float(budget)
        tolerances.append(Router.load(nm).tolerance)
        assert tolerances[-1] == pytest.approx(cal["tolerance"], abs=1e-6)
        assert Router.load(nm).meta["calibration"]["rule"] == "cost_budget"
    assert tolerances[1] > tolerances[0]
    for args, message in ((["--strong-share", "0.3"], "calibrated to a cost budget: --max-cost"),
                          (["--max-cost", "0.5"], "below the cheapest model's cost"),
                          (["--max-cost", "2", "--price", "huge=1"], "'huge' is not a model of this router")):
        assert main(["calibrate", "--model", nm, "--data", str(f), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_calibrate_cascade_from_labelled_logprobs(data_and_model, tmp_path, capsys):
    data, model = data_and_model
    rng = np.random.default_rng(0)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows:
        r["slm_mean_logprob"] = -float(rng.gamma(2.0, 0.3))
        r["slm_min_logprob"] = r["slm_mean_logprob"] * 4
    labelled = write_jsonl(tmp_path / "labelled.jsonl", rows)
    capsys.readouterr()
    assert main(["calibrate", "--model", str(model), "--data", str(labelled), "--strong-share", "0.3",
                 "--escalate-share", "0.25", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["cascade"]["realised_escalate_share"] == pytest.approx(0.25, abs=0.04)
    router = Router.load(model)
    cascade = router.meta["cascade"]  # what the gateway's cascade rule reads (gateway.cascade.resolve_rule)
    assert cascade["min_mean_logprob"] == pytest.approx(res["cascade"]["min_mean_logprob"])
    assert cascade["min_token_logprob"] is not None
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--strong-share", "0.3",
                 "--escalate-share", "0.25"]) == 2
    assert "needs held-out rows with slm_mean_logprob" in capsys.readouterr().err


@pytest.mark.slow
def test_ensemble_of_fast_members_round_trip(tmp_path):
    from routers.scorers import LengthScorer, TfidfRidgeScorer, make_scorer
    from training.data import parse_routing_row
    from training.fit import TrainConfig, fit_router

    rows = [parse_routing_row(r, f"s:{i}") for i, r in enumerate(synth_rows(600, seed=4))]
    scorer = make_scorer("ensemble", members=[TfidfRidgeScorer(), LengthScorer()], weights=[3.0, 1.0])
    router = fit_router(rows, TrainConfig(kind="ensemble"), scorer=scorer)
    texts = ["prove the lemma", "what color is it"]
    s = router.score_batch(texts)
    assert s[0] < s[1]
    router.save(tmp_path / "e")
    assert np.allclose(Router.load(tmp_path / "e").score_batch(texts), s, atol=1e-6)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_baselines_fit_on_rows_disjoint_from_the_evaluated_ones(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", synth_rows(600, seed=1))
    model = tmp_path / "m"
    assert main(["train", "router", "--data", str(train), "--out", str(model)]) == 0
    training_split = [r for r in synth_rows(600, seed=1) if eval_bucket(r["id"]) >= 20]
    evaluate = ["eval", "router", "--model", str(model), "--baselines", "--json"]
    capsys.readouterr()

    # the held-out split of --data: fitted on its training split, and says so
    assert main([*evaluate, "--data", str(train)]) == 0
    out = capsys.readouterr().out
    fit = json.loads(out.strip().splitlines()[-1])["baseline_fit"]
    assert (fit["file"], fit["num_rows"], fit["disjoint_from_eval"]) == (str(train), len(training_split), True)
    assert f"tfidf_lr baseline fitted on {len(training_split)} rows of {train}" in out

    # --all-rows on new rows: fitted on the router's own training data (the file its artifact records)
    fresh = write_jsonl(tmp_path / "fresh.jsonl", synth_rows(200, seed=2, source="fresh"))
    assert main([*evaluate, "--data", str(fresh), "--all-rows"]) == 0
    fit = _last_json(capsys)["baseline_fit"]
    assert (fit["file"], fit["num_rows"]) == (str(train), len(training_split))

    # --all-rows on the training data itself: nothing disjoint to fit on, one line and no traceback
    assert main([*evaluate, "--data", str(train), "--all-rows"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is among the evaluated rows" in err

    # the recorded file is gone: refuse, or fit on --baseline-data
    moved = train.rename(tmp_path / "moved.jsonl")
    assert main([*evaluate, "--data", str(fresh), "--all-rows"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --baseline-data FILE" in err
    assert main([*evaluate, "--data", str(fresh), "--all-rows", "--baseline-data", str(moved)]) == 0
    assert _last_json(capsys)["baseline_fit"]["file"] == str(moved)


def test_rows_with_pairwise_scores_and_model_scores_serve_both_kinds(tmp_path, capsys):
    rows = [{**r, "model_scores": {"small": r["weak_score"], "big": r["strong_score"]}} for r in synth_rows(600, seed=4)]
    data = write_jsonl(tmp_path / "both.jsonl", rows)
    for kind, out in [("tfidf_source_ridge", tmp_path / "pair"), ("nmodel", tmp_path / "nm")]:
        assert main(["train", "router", "--data", str(data), "--out", str(out), "--kind", kind]) == 0
        capsys.readouterr()
        assert main(["eval", "router", "--model", str(out), "--data", str(data), "--json"]) == 0
        assert _last_json(capsys)["kind"] == kind
    assert main(["train", "router", "--data", str(data), "--out", str(tmp_path / "default")]) == 0
    assert Router.load(tmp_path / "default").kind == "tfidf_source_ridge"  # pairwise unless --kind nmodel
