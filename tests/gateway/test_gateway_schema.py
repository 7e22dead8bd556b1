"""The served OpenAPI schema is accurate: a schemathesis run finds no 500s and no response that breaks it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.app import create_app
from tests.gateway.fakes import FakeFactory, fake_settings

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance")


def test_openapi_schema_lists_the_openai_routes(live_server):
    import httpx

    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    schema = httpx.get(server.base_url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(
        schema["paths"])
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "429", "503"} <= set(responses)
    assert "422" not in responses


def test_schemathesis_finds_no_server_errors(live_server, tmp_path):
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    exe = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(exe), "run", server.base_url + "/openapi.json", "-n", "25", "--seed", "7", "--generation-database",
         "none", "-c", CHECKS, "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
