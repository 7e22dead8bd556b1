"""``workers: N``: N gateway processes on one port, each with its own loop and classifiers, sharing rate
limits (and budgets, sessions, stored responses) through Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.settings import ConfigError, hash_api_key, settings_from_dict
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def remote_settings(upstream: str, **extra) -> dict:
    pools = [{"name": "slm", "kind": "remote", "model": "fake-model", "urls": [upstream]},
             {"name": "llm", "kind": "remote", "model": "fake-model", "urls": [upstream]}]
    return {"pools": pools, "routing": {"cascade": {"mode": "off"}}, "example_cache": {"enabled": False}, **extra}


def test_each_worker_rebuilds_the_validated_settings(monkeypatch):
    """The parent validates once; each worker's app gets exactly those settings (env overrides applied,
    keys as hashes) from the environment."""
    from gateway.app import SETTINGS_ENV, create_app_from_env

    settings = settings_from_dict(remote_settings(
        "http://127.0.0.1:9/v1", workers=3, api_keys=[{"name": "a", "sha256": hash_api_key("sk-a"),
                                                        "requests_per_minute": 5}],
        classifiers={"max_batch": 8, "max_wait_ms": 0.5}, limits={"max_n": 2}))
    monkeypatch.setenv(SETTINGS_ENV, settings.model_dump_json())
    app = create_app_from_env()
    assert app.state.settings == settings and app.state.settings.workers == 3


def test_workers_need_remote_pools():
    with pytest.raises(ConfigError, match=r"workers = 2 needs remote pools only.*local pools \['slm', 'llm'\]"):
        settings_from_dict({"workers": 2, "pools": [{"name": "slm", "model": "smollm2-135m"},
                                                    {"name": "llm", "model": "gemma3-270m"}]})
    with pytest.raises(ConfigError, match="workers = 0"):
        settings_from_dict(remote_settings("http://127.0.0.1:9/v1", workers=0))


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


@pytest.mark.slow
def test_two_worker_processes_share_one_port_and_exact_rate_limits_through_redis(live_server, redis_url, tmp_path):
    """`switchyard serve` with workers: 2 runs two worker processes on one port; a key limited to 6
    requests a minute gets exactly 6 answers of 12 sent on fresh connections, whichever worker took each."""
    from bench.fake_upstream import FakeUpstream
    from tests.gateway.fakes import wait_until

    upstream = live_server(FakeUpstream())
    port = free_port()
    config = remote_settings(upstream.base_url + "/v1", workers=2, redis_url=redis_url,
                             api_keys=[{"name": "app", "sha256": hash_api_key("sk-app"), "requests_per_minute": 6}])
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD__")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(tmp_path / "gw.yaml"), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(base + "/readyz", timeout=2).status_code == 200
            return False

        wait_until(up, "the gateway with two workers", timeout_s=120)
        workers = [p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
        statuses: list[int] = []
        lock = threading.Lock()

        def ask() -> None:
            with httpx.Client(headers={"Authorization": "Bearer sk-app"}) as client:  # a fresh connection each
                r = client.post(base + "/v1/chat/completions", timeout=30,
                                json={"model": "slm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            with lock:
                statuses.append(r.status_code)

        threads = [threading.Thread(target=ask) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(statuses) == [200] * 6 + [429] * 6
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
