"""Artifacts reload without a restart: POST /admin/reload (admin key only) and SIGHUP. In-flight requests finish
on the artifacts they started with, a failed load keeps the old ones and says why, and no request fails while
artifacts are swapped under load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.settings import hash_api_key
from routers import artifact
from tests.conftest import free_port, wait_for_port
from tests.gateway.fakes import FakeFactory, fake_settings, wait_until

HARD = ["integral", "theorem", "derivative", "eigenvalue", "proof", "lemma", "topology", "manifold"]
EASY = ["hello", "thanks", "weather", "greeting", "morning", "friend", "coffee", "music"]
KEYS = [{"name": "ops", "sha256": hash_api_key("sk-admin"), "admin": True},
        {"name": "app", "sha256": hash_api_key("sk-user")}]
ADMIN, USER = {"authorization": "Bearer sk-admin"}, {"authorization": "Bearer sk-user"}


def _rows():
    import random

    from training.data import RoutingRow

    rng = random.Random(0)
    return [RoutingRow(prompt=f"please {' '.join(rng.sample(HARD if i % 2 else EASY, 3))} now", source="s",
                       row_id=str(i), strong_score=1.0, weak_score=0.0 if i % 2 else 1.0) for i in range(300)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Two versions of one router: ``a`` (its own threshold, a cascade that keeps every fake answer) and ``b``
    (threshold 0.99: every request to the LLM; a cascade that escalates every answer); ``broken``: no arrays."""
    from training.fit import TrainConfig, fit_router

    d = tmp_path_factory.mktemp("artifacts")
    fit_router(_rows(), TrainConfig(kind="tfidf_lr", tfidf_features=2**14)).save(d / "a")
    artifact.update_meta(d / "a", cascade={"min_mean_logprob": -5.0, "min_token_logprob": None})
    shutil.copytree(d / "a", d / "b")
    artifact.update_meta(d / "b", threshold=0.99, cascade={"min_mean_logprob": -0.01, "min_token_logprob": None})
    shutil.copytree(d / "a", d / "broken")
    (d / "broken" / "manifest.json").write_text("{ not json")
    return {"a": d / "a", "b": d / "b", "broken": d / "broken"}


def install(src: Path, dst: Path) -> None:
    """Put artifact ``src`` at ``dst`` (as a deploy would: a new folder renamed into place)."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def _routing(path: Path, **extra) -> dict:
    return {"router_artifact": str(path), "escalate_band": 0.0,
            "cascade": {"mode": "slm_then_escalate", "stream_mode": "stream_when_confident"}, **extra}


def _ask(base: str, text: str, headers=USER, **body) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 16,
                            **body})


def _threshold(r: httpx.Response) -> float:
    assert r.status_code == 200, r.text
    return r.json()["switchyard"]["threshold"]


@pytest.mark.slow
def test_admin_reload_needs_an_admin_key_swaps_the_router_and_keeps_it_when_a_load_fails(
        live_server, tmp_path, artifacts):
    serving = tmp_path / "router"
    install(artifacts["a"], serving)
    old_threshold = artifact.load(artifacts["a"]).meta["threshold"]
    server = live_server(create_app(fake_settings(api_keys=KEYS, routing=_routing(serving)),
                                    backend_factory=FakeFactory()))
    base = server.base_url
    assert _threshold(_ask(base, "please hello coffee friend now")) == pytest.approx(old_threshold)
    assert httpx.post(base + "/admin/reload").status_code == 401
    denied = httpx.post(base + "/admin/reload", headers=USER)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_key_required"

    install(artifacts["b"], serving)
    ok = httpx.post(base + "/admin/reload", headers=ADMIN)
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["reloaded"] is True and body["serving"]["router"]["threshold"] == 0.99
    assert body["previous"]["router"]["threshold"] == pytest.approx(old_threshold)
    assert body["serving"]["router"]["manifest_sha256"] != body["previous"]["router"]["manifest_sha256"]
    r = _ask(base, "please hello coffee friend now")
    assert _threshold(r) == 0.99 and r.headers["x-switchyard-route"] == "llm"

    install(artifacts["broken"], serving)
    failed = httpx.post(base + "/admin/reload", headers=ADMIN)
    assert failed.status_code == 500
    assert failed.json()["reloaded"] is False and "corrupt manifest" in failed.json()["error"]
    assert failed.json()["serving"]["router"]["threshold"] == 0.99  # still the last good one
    assert _threshold(_ask(base, "please hello coffee friend now")) == 0.99
    shutil.rmtree(serving)
    gone = httpx.post(base + "/admin/reload", headers=ADMIN).json()
    assert gone["reloaded"] is False and "does not exist" in gone["error"]
    metrics = httpx.get(base + "/metrics").text
    assert 'switchyard_artifact_reloads_total{result="ok"} 1.0' in metrics
    assert 'switchyard_artifact_reloads_total{result="failed"} 2.0' in metrics


@pytest.mark.slow
def test_open_gateway_has_no_admin_key_to_reload_with(live_server, artifacts):
    server = live_server(create_app(fake_settings(routing=_routing(artifacts["a"])), backend_factory=FakeFactory()))
    r = httpx.post(server.base_url + "/admin/reload", headers=ADMIN)
    assert r.status_code == 403 and "SIGHUP" in r.json()["error"]["message"]


@pytest.mark.slow
def test_in_flight_request_finishes_on_the_artifacts_it_started_with(live_server, tmp_path, artifacts):
    """A request whose SLM answer is being produced when the reload lands is judged by the old cascade rule
    (keep); the next request gets the new rule (escalate) and the new threshold."""
    serving = tmp_path / "router"
    install(artifacts["a"], serving)
    factory = FakeFactory()
    routing = _routing(serving, escalate_band=1.0)  # every SLM-bound request is judged by the cascade
    routing["cascade"]["stream_mode"] = "buffer"
    server = live_server(create_app(fake_settings(api_keys=KEYS, routing=routing), backend_factory=factory))
    base = server.base_url
    result: dict = {}
    slow = threading.Thread(target=lambda: result.update(r=_ask(base, "please hello slow friend now",
                                                                max_tokens=200)))
    slow.start()  # 200 tokens, 20 ms apart: the SLM answer takes 4 s
    wait_until(lambda: sum(b.num_active for b in factory.backends.get("slm", [])), "the slow request on the SLM")
    install(artifacts["b"], serving)
    assert httpx.post(base + "/admin/reload", headers=ADMIN).status_code == 200
    assert sum(b.num_active for b in factory.backends["slm"]) == 1, "the reload outlasted the in-flight request"
    slow.join(60)
    info = result["r"].json()["switchyard"]
    assert (info["route"], info["escalated"], info["model"]) == ("slm_then_escalate", False, "slm")
    assert info["threshold"] == pytest.approx(artifact.load(artifacts["a"]).meta["threshold"])
    after = _ask(base, "please integral proof now").json()["switchyard"]
    assert after["threshold"] == 0.99 and after["route"] == "llm"


@pytest.mark.slow
@pytest.mark.parametrize("inline_when_alone", [True, False])
def test_reload_under_concurrent_load_fails_no_request(live_server, tmp_path, artifacts, inline_when_alone):
    """Reloads while four clients send requests: none fails, each is routed by the old or the new router
    (with inline_when_alone off every request goes through the router's batcher, whose batches may hold
    both snapshots' requests)."""
    serving = tmp_path / "router"
    install(artifacts["a"], serving)
    old_threshold = artifact.load(artifacts["a"]).meta["threshold"]
    settings = fake_settings(api_keys=KEYS, routing=_routing(serving),
                             classifiers={"inline_when_alone": inline_when_alone})
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    base = server.base_url
    stop = threading.Event()
    outcomes: list[tuple[int, float | None]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        try:
            requests(i)
        except Exception as e:  # noqa: BLE001 - a client error is a failed request, counted
            with lock:
                outcomes.append((-1, repr(e)))

    def requests(i: int) -> None:
        with httpx.Client(base_url=base, headers=USER, timeout=60) as c:
            n = 0
            while not stop.is_set():
                text = f"please {EASY[n % 8]} {HARD[(n + i) % 8]} now"
                body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
                if n % 3 == 2:  # every third request streams
                    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                        frames = [line for line in r.iter_lines() if line.startswith("data: ")]
                        ok = r.status_code == 200 and frames[-1] == "data: [DONE]"
                        last = json.loads(frames[-2].removeprefix("data: ")) if ok else {}
                        out = (200 if ok else r.status_code, last.get("switchyard", {}).get("threshold"))
                else:
                    r = c.post("/v1/chat/completions", json=body)
                    out = (r.status_code, r.json().get("switchyard", {}).get("threshold"))
                with lock:
                    outcomes.append(out)
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    num_reloads = 10
    for k in range(num_reloads):
        wait_until(lambda k=k: len(outcomes) >= 5 * (k + 1), "requests between reloads")
        install(artifacts["b" if k % 2 == 0 else "a"], serving)
        r = httpx.post(base + "/admin/reload", headers=ADMIN, timeout=60)
        assert r.status_code == 200, r.text
    wait_until(lambda: len(outcomes) >= 5 * (num_reloads + 1), "requests after the last reload")
    stop.set()
    for t in threads:
        t.join(60)
    failed = [o for o in outcomes if o[0] != 200]
    assert not failed, f"failed requests: {failed}"
    thresholds = {round(t, 6) for _, t in outcomes}
    assert thresholds == {round(old_threshold, 6), 0.99}  # both artifacts served, nothing else
    assert len(outcomes) >= 55


@pytest.mark.slow
def test_sighup_reloads_a_serving_process(live_server, tmp_path, artifacts):
    from bench.fake_upstream import FakeUpstream

    upstream = live_server(FakeUpstream())
    serving = tmp_path / "router"
    install(artifacts["a"], serving)
    pools = [{"name": name, "kind": "remote", "model": "fake-model", "urls": [upstream.base_url + "/v1"]}
             for name in ("slm", "llm")]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"pools": pools, "example_cache": {"enabled": False},
                                      "routing": {"router_artifact": str(serving), "escalate_band": 0.0,
                                                  "cascade": {"mode": "off"}}}))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log_file = tmp_path / "gateway.log"
    with log_file.open("w") as log_out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "--port", str(port)],
                                stdout=log_out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, timeout=60)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(base + "/readyz").status_code == 200, "ready", timeout_s=60)
        old_threshold = _threshold(_ask(base, "please hello friend now", headers={}))
        install(artifacts["b"], serving)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: _threshold(_ask(base, "please hello friend now", headers={})) == 0.99,
                   "the reloaded threshold", timeout_s=60)
        install(artifacts["broken"], serving)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "artifact reload failed" in log_file.read_text(), "the failure in the log", timeout_s=60)
        assert "corrupt manifest" in log_file.read_text()
        assert _threshold(_ask(base, "please hello friend now", headers={})) == 0.99  # the last good one
        assert old_threshold != 0.99 and proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
