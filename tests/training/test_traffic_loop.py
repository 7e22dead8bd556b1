"""The traffic loop: `label --from-log`, `train router --init` with its promotion gate, and the whole loop end to
end — a live gateway records its traffic, the labeller runs both pools through that gateway and asks a fake
judge, the router is updated, promoted, calibrated and reloaded without a restart."""

from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from routers import artifact
from routers.router import Router
from tests.training.router_synth import synth_rows, write_jsonl
from training.cli import main
from training.data import load_routing_rows, parse_routing_row
from training.fit import TrainConfig, fit_router
from training.router_update import promotion_gate

# Traffic the first router never saw: a "shift". Hard requests need the LLM, easy ones do not.
SHIFT_HARD = ["contract", "statute", "liability", "tort", "plaintiff", "indemnity", "arbitration", "easement"]
SHIFT_EASY = ["coffee", "music", "garden", "movie", "recipe", "puppy", "sunset", "bicycle"]


def shift_prompts(n: int, seed: int) -> list[tuple[str, bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        hard = rng.random() < 0.4
        words = rng.sample(SHIFT_HARD if hard else SHIFT_EASY, 2) + rng.sample(["please", "tell", "me", "about",
                                                                              "my", "the", "quick", "question"], 3)
        rng.shuffle(words)
        out.append((" ".join(words) + f" {rng.randint(0, 10**6)}", hard))
    return out


def fake_judge() -> tuple[FastAPI, list[str]]:
    """An OpenAI-compatible judge: "no" when the judged request has a SHIFT_HARD word, else "yes"."""
    app, asked = FastAPI(), []

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "judge", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        text = body["messages"][-1]["content"]
        asked.append(text)
        request = text.split("Request:", 1)[1].split("Answer A", 1)[0]
        verdict = "No." if any(w in request.split() for w in SHIFT_HARD) else "Yes, it is."
        return {"id": "j", "object": "chat.completion", "created": 0, "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": verdict}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app, asked


def fake_pool(answers: dict[str, str], name: str) -> tuple[FastAPI, list[str]]:
    app, asked = FastAPI(), []

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        prompt = body["messages"][-1]["content"]
        asked.append(prompt)
        text = answers.get(prompt, "I do not know")
        return {"id": "c", "object": "chat.completion", "created": 0, "model": name,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text},
                             "logprobs": {"content": [{"token": w, "logprob": -0.5, "bytes": None,
                                                       "top_logprobs": []} for w in text.split()]}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app, asked


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------ label --from-log


@pytest.mark.slow
def test_label_from_log_takes_references_asks_the_judge_only_on_disagreement(tmp_path, live_server, capsys):
    _jsonl(tmp_path / "traffic.jsonl.1", [  # the rotated file (older lines) is read first
        {"ts": 1, "request_id": "r1", "namespace": "team", "route": "slm", "prompt": "What is 6*7?"},
        {"ts": 2, "request_id": "r2", "namespace": "team", "route": "llm", "prompt": "What is 6*7?"},  # repeat
    ])
    log = _jsonl(tmp_path / "traffic.jsonl", [
        {"ts": 3, "request_id": "r3", "namespace": "team", "route": "llm", "prompt": "Sue the landlord?"},
        {"ts": 4, "request_id": "r4", "namespace": "team", "route": "slm", "prompt": "Say hello"},
        {"ts": 5, "request_id": "r5", "namespace": "other", "route": "slm", "prompt": "Known outcome"},
    ])
    refs = _jsonl(tmp_path / "refs.jsonl", [{"prompt": "What is 6*7?", "answer": "42"},
                                             {"id": "r5", "strong_score": 1, "weak_score": 0}])
    slm, slm_asked = fake_pool({"What is 6*7?": "It is 41.", "Sue the landlord?": "Yes, sue.",
                                "Say hello": "Hello!"}, "small")
    llm, llm_asked = fake_pool({"What is 6*7?": "6*7 = 42", "Sue the landlord?": "It depends on the lease.",
                                "Say hello": "hello"}, "big")
    judge, judge_asked = fake_judge()
    s, lg, j = live_server(slm), live_server(llm), live_server(judge)
    out = tmp_path / "rows.jsonl"
    assert main(["label", "--from-log", log, "--references", refs, "--slm", f"{s.base_url}/v1#small",
                 "--llm", f"{lg.base_url}/v1#big", "--judge", f"{j.base_url}/v1", "--out", str(out)]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == ["r1", "r3", "r4", "r5"]  # one row per distinct prompt, in log order
    assert (rows["r1"]["strong_score"], rows["r1"]["weak_score"], rows["r1"]["score_type"]) == (1.0, 0.0,
                                                                                              "reference_match")
    assert rows["r3"]["score_type"] == "judge" and rows["r3"]["weak_score"] == 1.0  # no SHIFT_HARD word: "yes"
    assert rows["r4"]["score_type"] == "agreement_with_llm" and rows["r4"]["weak_score"] == 1.0  # same answer
    assert (rows["r5"]["strong_score"], rows["r5"]["weak_score"], rows["r5"]["score_type"]) == (
        1.0, 0.0, "reference_scores")
    assert rows["r1"]["source"] == "team" and rows["r5"]["source"] == "other"  # the namespace
    assert "Known outcome" not in slm_asked + llm_asked  # recorded outcomes need no model call
    assert len(judge_asked) == 1 and "Sue the landlord?" in judge_asked[0]  # only the disagreeing row
    printed = capsys.readouterr().out
    assert "labelled 4 prompts (1 repeated prompts skipped)" in printed and "judge 1" in printed
    assert len(load_routing_rows(out, require="pairwise")) == 4  # what `train router` reads


def test_label_from_log_errors_are_one_line(tmp_path, capsys):
    log = _jsonl(tmp_path / "traffic.jsonl", [{"request_id": "r1", "prompt": "unscored"}])
    assert main(["label", "--from-log", log, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "1 of 1 prompts have no recorded scores in --references: give --slm and --llm" in capsys.readouterr().err
    bad = _jsonl(tmp_path / "bad.jsonl", [{"request_id": "r1", "route": "slm"}])
    assert main(["label", "--from-log", bad, "--slm", "x", "--llm", "y", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:1: missing or empty 'prompt' (is this a traffic_log file?)" in capsys.readouterr().err
    refs = _jsonl(tmp_path / "refs.jsonl", [{"prompt": "unscored", "strong_score": 1}])
    assert main(["label", "--from-log", log, "--references", refs, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "refs.jsonl:1: a reference needs 'answer', or 'strong_score' and 'weak_score'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one of --prompts / --from-log
        main(["label", "--prompts", log, "--from-log", log, "--out", "o"])


# ------------------------------------------------------------------------------------ train --init and the gate


def _shift_rows(n: int, seed: int, source: str = "app") -> list[dict]:
    return [{"id": f"t{seed}-{i}", "source": source, "prompt": p, "strong_score": 1, "weak_score": 0 if hard else 1}
            for i, (p, hard) in enumerate(shift_prompts(n, seed))]


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """A router trained on the synthetic "first task" only (kind tfidf_source_ridge, the default)."""
    d = tmp_path_factory.mktemp("serving")
    data = write_jsonl(d / "first.jsonl", synth_rows(1500, seed=0))
    assert main(["train", "router", "--data", str(data), "--out", str(d / "router"), "--strong-share", "0.4"]) == 0
    return d / "router", data


def test_gate_keeps_the_serving_router_when_the_candidate_is_worse_or_there_is_no_signal(serving):
    router = Router.load(serving[0])
    rows = [parse_routing_row(r, f"x:{i}") for i, r in enumerate(synth_rows(300, seed=3))]
    worse = fit_router(rows, TrainConfig(kind="random"))
    gate = promotion_gate(router, worse, rows)
    assert not gate.passed and gate.candidate_apgr < gate.serving_apgr and "<" in gate.reason
    assert promotion_gate(router, router, rows).passed  # no worse than itself
    ties = [parse_routing_row({"prompt": f"p{i}", "strong_score": 1, "weak_score": 1}, "t") for i in range(10)]
    assert "no gap" in promotion_gate(router, router, ties).reason
    assert "no held-out rows" in promotion_gate(router, router, []).reason


@pytest.mark.slow
def test_train_init_refits_on_old_and_new_rows_and_promotes_only_a_better_router(serving, tmp_path, capsys):
    model, first = serving
    new = write_jsonl(tmp_path / "traffic_rows.jsonl", _shift_rows(400, seed=1))
    out = tmp_path / "updated"
    capsys.readouterr()
    assert main(["train", "router", "--init", str(model), "--data", str(new), "--out", str(out),
                 "--promote-if-better", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    gate = report["gate"]
    assert gate["passed"] and report["written"] and gate["candidate_apgr"] > gate["serving_apgr"] + 0.2
    assert report["num_old_rows"] == 1500 and report["num_new_rows"] == 400
    meta = Router.load(out).meta
    td = meta["training_data"]
    assert [f["path"] for f in td["files"]] == [str(first), str(new)]
    assert td["update"]["method"].startswith("refit from scratch") and meta["promotion"]["passed"]
    assert set(td["sources"]) == {"synth", "app"} and meta["scorer"]["kind"] == "tfidf_source_ridge"
    # the new rows' eval split was held out: never trained on (same rule as every artifact)
    assert td["num_fit_rows"] < 1500 + 400 - gate["num_rows"]

    # held-out rows that all tie: no signal, so the gate keeps the serving router and --out is not written
    ties = [{**r, "weak_score": 1} for r in _shift_rows(200, seed=2)]
    kept = tmp_path / "kept"
    assert main(["train", "router", "--init", str(model), "--data", str(write_jsonl(tmp_path / "t.jsonl", ties)),
                 "--out", str(kept), "--promote-if-better"]) == 1
    printed = capsys.readouterr().out
    assert "gate: not passed" in printed and "not promoted" in printed and not kept.exists()
    # an update keeps kind and split; one-line errors otherwise
    assert main(["train", "router", "--init", str(model), "--data", str(new), "--out", str(kept),
                 "--kind", "tfidf_lr"]) == 2
    assert main(["train", "router", "--init", str(model), "--data", str(new), "--out", str(kept),
                 "--eval-fraction", "0.3"]) == 2
    assert main(["train", "router", "--data", str(new), "--out", str(kept), "--promote-if-better"]) == 2
    err = capsys.readouterr().err
    assert "keeps the kind" in err and "keeps the split" in err and "add --init ARTIFACT" in err


# ------------------------------------------------------------------------------------ the loop, end to end


@pytest.mark.slow
def test_traffic_loop_end_to_end(serving, tmp_path, live_server, monkeypatch, capsys):
    """record → label (both pools through the gateway, a fake judge) → train --init --promote-if-better →
    calibrate → POST /admin/reload; the reloaded router separates the shifted traffic the old one could not."""
    from gateway.app import create_app
    from gateway.settings import hash_api_key
    from tests.gateway.fakes import FakeFactory, fake_settings
    from tests.gateway.test_reload import install

    model, _ = serving
    router_dir = tmp_path / "router"
    install(model, router_dir)
    log = tmp_path / "traffic.jsonl"
    keys = [{"name": "app", "sha256": hash_api_key("sk-app"), "models": ["auto"]},
            {"name": "labeller", "sha256": hash_api_key("sk-label"), "models": ["slm", "llm"]},
            {"name": "ops", "sha256": hash_api_key("sk-ops"), "admin": True, "models": []}]
    settings = fake_settings(api_keys=keys, traffic_log={"path": str(log), "keys": ["app"]},
                             routing={"router_artifact": str(router_dir), "escalate_band": 0.0,
                                      "cascade": {"mode": "off"}})
    gw = live_server(create_app(settings, backend_factory=FakeFactory()))
    judge_app, _ = fake_judge()
    judge = live_server(judge_app)

    # 1. record: the application's auto traffic (FakeBackend answers "<pool>: echo <prompt> done.")
    traffic = shift_prompts(300, seed=7)
    with httpx.Client(base_url=gw.base_url, headers={"authorization": "Bearer sk-app"}, timeout=30) as c:
        routes_before = [c.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 32, "messages": [
            {"role": "user", "content": p}]}).json()["switchyard"]["route"] for p, _ in traffic]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(logged) == 300 and {line["key"] for line in logged} == {"app"}

    # 2. label: both pools through the gateway (pool names: explicit, never recorded), the judge on disagreement
    rows = tmp_path / "traffic_rows.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-label")
    assert main(["label", "--from-log", str(log), "--slm", f"{gw.base_url}/v1#slm", "--llm",
                 f"{gw.base_url}/v1#llm", "--judge", f"{judge.base_url}/v1#judge", "--max-tokens", "32",
                 "--out", str(rows)]) == 0
    labelled = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(labelled) == 300 and {r["score_type"] for r in labelled} == {"judge"}
    hard = {p for p, h in traffic if h}
    assert all((r["weak_score"] == 0.0) == (r["prompt"] in hard) for r in labelled)
    assert len(log.read_text().splitlines()) == 300  # the labeller's calls were not recorded

    # 3. update the router with the labelled traffic; 4. the gate promotes it in place
    capsys.readouterr()
    assert main(["train", "router", "--init", str(router_dir), "--data", str(rows), "--out", str(router_dir),
                 "--promote-if-better", "--json"]) == 0
    gate = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gate"]
    assert gate["passed"] and gate["candidate_apgr"] > gate["serving_apgr"]
    # 5. calibrate on the held-out traffic (the new rows' eval split), 6. reload without a restart
    assert main(["calibrate", "--model", str(router_dir), "--data", str(rows), "--strong-share", "0.4"]) == 0
    reloaded = httpx.post(gw.base_url + "/admin/reload", headers={"authorization": "Bearer sk-ops"}).json()
    assert reloaded["reloaded"] and reloaded["serving"]["router"]["threshold"] == pytest.approx(
        artifact.load(router_dir).meta["threshold"])

    fresh = shift_prompts(100, seed=8)
    with httpx.Client(base_url=gw.base_url, headers={"authorization": "Bearer sk-app"}, timeout=30) as c:
        routes_after = [c.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 8, "messages": [
            {"role": "user", "content": p}]}).json()["switchyard"]["route"] for p, _ in fresh]

    def accuracy(routes, prompts):  # hard → llm, easy → slm
        return np.mean([(r == "llm") == h for r, (_, h) in zip(routes, prompts, strict=True)])

    assert accuracy(routes_after, fresh) >= 0.9 > accuracy(routes_before, traffic) + 0.2
