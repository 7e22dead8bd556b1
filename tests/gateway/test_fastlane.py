"""FastLane serves the two completion routes without FastAPI's per-request layers: same answers, same
error envelope, and everything else still reaches FastAPI (live uvicorn, fake replicas)."""

from __future__ import annotations

import httpx

import gateway.app as app_module
from gateway.app import create_app
from tests.gateway.fakes import FakeFactory, fake_settings

CHAT = {"model": "slm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _normalise(body: dict) -> dict:
    body = dict(body, id=None, created=None)
    body["switchyard"] = {k: v for k, v in body["switchyard"].items() if k != "overhead_ms"}
    return body


def test_fastlane_answers_like_the_fastapi_routes(live_server, monkeypatch):
    lane = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    fast = [httpx.post(lane.base_url + "/v1/chat/completions", json=CHAT),
            httpx.post(lane.base_url + "/v1/completions", json={"model": "slm", "prompt": "hi", "max_tokens": 3}),
            httpx.post(lane.base_url + "/v1/chat/completions", json={"model": "slm"})]
    monkeypatch.setattr(app_module, "_FAST_ROUTES", frozenset())  # the same requests through FastAPI
    plain = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    slow = [httpx.post(plain.base_url + "/v1/chat/completions", json=CHAT),
            httpx.post(plain.base_url + "/v1/completions", json={"model": "slm", "prompt": "hi", "max_tokens": 3}),
            httpx.post(plain.base_url + "/v1/chat/completions", json={"model": "slm"})]
    for f, s in zip(fast[:2], slow[:2], strict=True):
        assert f.status_code == s.status_code == 200
        assert _normalise(f.json()) == _normalise(s.json())
        assert f.headers["x-switchyard-route"] == s.headers["x-switchyard-route"]
    assert fast[2].status_code == slow[2].status_code == 400
    assert fast[2].json() == slow[2].json()  # missing messages: the same envelope, message and param


def test_fastlane_errors_and_fallthrough(live_server):
    server = live_server(create_app(fake_settings(), backend_factory=FakeFactory()))
    url = server.base_url + "/v1/chat/completions"
    bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    err = bad.json()["error"]
    assert err["type"] == "invalid_request_error" and "Invalid JSON" in err["message"]  # FastLane's parser
    unknown = httpx.post(url, json=dict(CHAT, model="nope"))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    streamed = httpx.post(url, json=dict(CHAT, stream=True))
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    for headers in ({"content-type": "text/plain"}, {}):  # a cross-site form post must not run a request
        r = httpx.post(url, content=b'{"model": "slm", "messages": [{"role": "user", "content": "hi"}]}',
                       headers=headers)
        assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    charset = httpx.post(url, content=b'{"model": "slm", "messages": [{"role": "user", "content": "hi"}]}',
                         headers={"content-type": "application/json; charset=utf-8"})
    assert charset.status_code == 200
    wrong_method = httpx.get(url)  # not FastLane's: FastAPI answers, still in the OpenAI envelope
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert "/v1/chat/completions" in httpx.get(server.base_url + "/openapi.json").json()["paths"]
    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'switchyard_requests_total{model="-",route="error",status="400"} 3.0' in metrics
