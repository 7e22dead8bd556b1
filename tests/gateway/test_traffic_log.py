"""The traffic log: prompts of sampled ``auto`` requests, recorded only for the keys / namespaces named, with
its retention enforced (the decision log's writer with rotation)."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.app import create_app
from gateway.decision_log import DecisionLog
from gateway.settings import ConfigError, hash_api_key
from tests.gateway.fakes import FakeFactory, fake_settings, wait_until

KEYS = [{"name": "team-a", "sha256": hash_api_key("sk-a")},
        {"name": "team-b", "sha256": hash_api_key("sk-b"), "namespace": "shared"},
        {"name": "team-c", "sha256": hash_api_key("sk-c")}]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------ the writer


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rotation_keeps_at_most_max_bytes_in_two_files(tmp_path):
    path = tmp_path / "t.jsonl"
    clock = Clock(1000.0)
    log = DecisionLog(str(path), max_bytes=400, clock=clock)
    for i in range(10):
        assert log.write({"i": i, "prompt": "x" * 20})  # 52 bytes a line
        clock.now += 1
    # the current file rotates before it would pass 200 bytes: 3 lines each; the oldest rotation is gone
    assert [line["i"] for line in _lines(tmp_path / "t.jsonl.1")] == [6, 7, 8]
    assert [line["i"] for line in _lines(path)] == [9]
    assert path.stat().st_size + (tmp_path / "t.jsonl.1").stat().st_size <= 400


def test_no_line_outlives_the_retention_even_on_a_quiet_log(tmp_path):
    path = tmp_path / "t.jsonl"
    clock = Clock(1000.0)
    log = DecisionLog(str(path), max_age_s=100, clock=clock)
    log.write({"i": 0})
    clock.now = 1049.0
    log.write({"i": 1})
    clock.now = 1050.0  # the oldest line is half the retention old: the file rotates on this write
    log.write({"i": 2})
    assert [line["i"] for line in _lines(tmp_path / "t.jsonl.1")] == [0, 1]
    assert [line["i"] for line in _lines(path)] == [2]
    clock.now = 1099.9
    log.enforce_retention()
    assert (tmp_path / "t.jsonl.1").exists()
    clock.now = 1100.0  # line 0 is 100 s old: the rotated file goes; line 2 is 50 s old: its file rotates
    log.enforce_retention()
    assert [line["i"] for line in _lines(tmp_path / "t.jsonl.1")] == [2] and _lines(path) == []
    clock.now = 1150.0
    log.enforce_retention()
    assert not (tmp_path / "t.jsonl.1").exists()
    log.write({"i": 3})
    clock.now = 1400.0  # nothing written since: line 3 is past retention, rotated and deleted at once
    log.enforce_retention()
    assert _lines(path) == [] and not (tmp_path / "t.jsonl.1").exists()
    log.close()
    # a restarted gateway reads the ages back from the files
    path.write_text(json.dumps({"ts": 900.0, "i": 9}) + "\n")
    DecisionLog(str(path), max_age_s=100, clock=Clock(1300.0)).close()
    assert _lines(path) == []


def test_writer_refuses_retention_on_stdout():
    with pytest.raises(ValueError, match="not stdout"):
        DecisionLog("stdout", max_bytes=1000)


# ------------------------------------------------------------------------------------ settings


def test_settings_make_recording_opt_in_and_name_bad_keys(tmp_path):
    assert fake_settings().traffic_log.path is None  # nothing is recorded by default
    with pytest.raises(ConfigError, match="no keys or namespaces are named"):
        fake_settings(traffic_log={"path": str(tmp_path / "t.jsonl")})
    with pytest.raises(ConfigError, match="traffic_log.keys names 'nobody'"):
        fake_settings(api_keys=KEYS, traffic_log={"path": str(tmp_path / "t.jsonl"), "keys": ["nobody"]})
    with pytest.raises(ConfigError, match="not stdout"):
        fake_settings(traffic_log={"path": "stdout", "namespaces": ["default"]})
    with pytest.raises(ConfigError, match="traffic_log.sample"):
        fake_settings(traffic_log={"path": str(tmp_path / "t.jsonl"), "namespaces": ["x"], "sample": 1.5})


# ------------------------------------------------------------------------------------ the gateway


def _chat(base: str, key: str, text: str, model: str = "auto", system: str | None = None) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    r = httpx.post(base + "/v1/chat/completions", headers={"authorization": f"Bearer {key}",
                                                            "x-request-id": f"req-{key}-{len(text)}"},
                   json={"model": model, "messages": messages, "max_tokens": 16})
    assert r.status_code == 200, r.text
    return r


@pytest.mark.slow
def test_records_auto_requests_of_the_named_keys_and_namespaces_only(live_server, tmp_path):
    log = tmp_path / "traffic.jsonl"
    settings = fake_settings(api_keys=KEYS, traffic_log={"path": str(log), "keys": ["team-a"],
                                                         "namespaces": ["shared"]})
    server = live_server(create_app(settings, backend_factory=FakeFactory()))
    base = server.base_url
    _chat(base, "sk-a", "what is the capital of France", system="you are terse")
    _chat(base, "sk-b", "name a fruit")  # recorded through its namespace
    _chat(base, "sk-c", "not recorded: key not named")
    _chat(base, "sk-a", "not recorded: a pool named explicitly", model="llm")
    lines = wait_until(lambda: len(_lines(log)) >= 2 and _lines(log), "two traffic lines")
    assert len(lines) == 2
    first, second = lines
    assert first["prompt"] == "what is the capital of France"  # the router's text: no system prompt
    assert (first["key"], first["namespace"], first["route"], first["pool"]) == (
        "team-a", "team-a", "slm_then_escalate", "slm")
    assert first["request_id"] == "req-sk-a-29" and first["endpoint"] == "/v1/chat/completions"
    assert {"ts", "score", "threshold", "escalated"} <= set(first)
    assert (second["key"], second["namespace"], second["prompt"]) == ("team-b", "shared", "name a fruit")
    assert log.stat().st_mode & 0o777 == 0o600  # prompts: readable by the gateway's user only
    metrics = httpx.get(base + "/metrics").text
    assert "switchyard_traffic_log_lines_total 2.0" in metrics


@pytest.mark.slow
def test_sample_zero_records_nothing_and_an_open_gateway_records_its_default_namespace(live_server, tmp_path):
    quiet, open_log = tmp_path / "quiet.jsonl", tmp_path / "open.jsonl"
    s1 = fake_settings(api_keys=KEYS, traffic_log={"path": str(quiet), "keys": ["team-a"], "sample": 0.0})
    s2 = fake_settings(traffic_log={"path": str(open_log), "namespaces": ["default"]})
    a = live_server(create_app(s1, backend_factory=FakeFactory()))
    b = live_server(create_app(s2, backend_factory=FakeFactory()))
    for i in range(5):
        _chat(a.base_url, "sk-a", f"question {i}")
    _chat(b.base_url, "anything", "hello from an open gateway")
    assert wait_until(lambda: _lines(open_log), "the open gateway's line")[0]["key"] is None
    assert _lines(quiet) == []
