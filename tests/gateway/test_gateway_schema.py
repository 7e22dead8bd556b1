"""The served OpenAPI schema and the server agree: schemathesis with every check, with and without a key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from gateway.app import create_app
from gateway.settings import hash_api_key
from tests.gateway.fakes import FakeFactory, fake_settings


def test_openapi_schema_lists_the_openai_routes(live_server):
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    schema = httpx.get(server.base_url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(
        schema["paths"])
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "429", "503"} <= set(responses)
    assert "422" not in responses


def _remote_pool_gateway(live_server, **overrides):
    """A gateway whose pools are remote (a real OpenAIUpstream in front of bench's FakeUpstream) and can do
    tools, JSON mode and images: every schema-valid body is then servable."""
    from bench.fake_upstream import FakeUpstream
    from gateway.settings import settings_from_dict

    upstream = live_server(FakeUpstream())
    pools = [{"name": name, "kind": "remote", "model": model, "urls": [upstream.base_url + "/v1"],
              "supports_tools": True, "supports_json_mode": True, "supports_vision": True}
             for name, model in (("slm", "fake-slm"), ("llm", "fake-llm"))]
    pools.append({"name": "minilm", "kind": "remote", "task": "embed", "model": "text-embedding-x",
                  "urls": [upstream.base_url + "/v1"]})
    return live_server(create_app(settings_from_dict({"pools": pools, "example_cache": {"enabled": False},
                                                      **overrides})))


# /readyz answers 503 by design while a pool has no available replica (fuzzed bodies can get an upstream
# replica ejected for a while): that 503 is the documented answer, not a server error.
SCHEMATHESIS_TOML = """
[[operations]]
include-name = "GET /readyz"
checks.not_a_server_error.expected-statuses = ["2xx", "4xx", "503"]
"""


def _schemathesis(server, tmp_path, *extra: str) -> None:
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_TOML)
    exe = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(exe), "run", server.base_url + "/openapi.json", "-n", "30", "--seed", "7", "--generation-database",
         "none", "--checks", "all", "--phases", "examples,coverage,fuzzing", "--output-sanitize", "false", *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        # the rules across fields that JSON Schema cannot state: schemathesis_hooks.py
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("schemathesis_hooks.py"))},
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_schemathesis_all_checks_open_gateway(live_server, tmp_path):
    """No 500, no schema-valid request rejected, no schema-violating request accepted, every response
    as documented (issue 25: the schema and the server agree)."""
    _schemathesis(_remote_pool_gateway(live_server), tmp_path)


def test_schemathesis_all_checks_with_and_without_a_key(live_server, tmp_path):
    server = _remote_pool_gateway(live_server, api_keys=[{"name": "k", "sha256": hash_api_key("sk-schema")}])
    schema = httpx.get(server.base_url + "/openapi.json").json()
    assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearer": []}]
    _schemathesis(server, tmp_path)  # every /v1/ call is a 401, and the schema says a key is needed
    _schemathesis(server, tmp_path, "-H", "Authorization: Bearer sk-schema")


def test_served_schema_carries_the_configured_limits(live_server):
    server = live_server(create_app(fake_settings(limits={"max_n": 3, "max_completion_tokens": 64}),
                                    backend_factory=FakeFactory()))
    props = httpx.get(server.base_url + "/openapi.json").json()["components"]["schemas"][
        "ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 3} == {
        k: v for k, v in props["n"]["anyOf"][0].items() if k in ("type", "minimum", "maximum")}
    assert props["max_tokens"]["anyOf"][0]["maximum"] == 64
    over = {"model": "slm", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
            "max_completion_tokens": 65}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=over)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
