"""Graceful shutdown of a real `python -m gateway` process: SIGTERM during a stream lets the stream finish,
refuses new connections, and the process exits by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from bench.fake_upstream import FakeBehavior, FakeUpstream
from tests.conftest import free_port, wait_for_port


@pytest.mark.slow
def test_sigterm_drains_a_stream_then_exits(live_server, tmp_path):
    upstream = live_server(FakeUpstream(behavior=FakeBehavior(num_tokens=20, token_delay_s=0.15)))
    pools = [{"name": name, "kind": "remote", "model": "fake-model", "urls": [upstream.base_url + "/v1"]}
             for name in ("slm", "llm")]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"pools": pools, "example_cache": {"enabled": False},
                                      "shutdown": {"drain_s": 30}}))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, timeout=60)
        base = f"http://127.0.0.1:{port}"
        events: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"model": "slm", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30), "no first event"
        proc.send_signal(signal.SIGTERM)
        refused = False
        for _ in range(200):  # the listening socket closes at once; in-flight work goes on
            try:
                httpx.get(base + "/healthz", timeout=1)
            except httpx.ConnectError:
                refused = True
                break
            threading.Event().wait(0.02)
        reader.join(60)
        assert refused, "new connections were still accepted after SIGTERM"
        assert events[-1] == "data: [DONE]"
        assert sum('"content":"tok' in e for e in events) == 20  # the whole answer, not a cut stream
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
