"""The plumbing of `switchyard bench gateway`: its gateway config, the load generator, its CLI parsing.

(The benchmark itself is run by hand; these tests keep its pieces from rotting.)
"""

from __future__ import annotations

import pytest

from bench.fake_upstream import FakeBehavior, FakeUpstream
from bench.gateway import (
    gateway_config,
    knee,
    litellm_config,
    parse_args,
    read_prompts,
    synthetic_prompts,
    write_training_data,
)
from bench.loadgen import APIS, api_body, is_complete, percentile, run_load
from gateway.settings import settings_from_dict
from training.cli import main as cli_main


def test_gateway_config_is_valid_settings(tmp_path):
    settings = settings_from_dict(gateway_config("http://127.0.0.1:9/v1", str(tmp_path / "g"), str(tmp_path / "r")))
    assert [p.kind for p in settings.pools] == ["remote", "remote"]
    assert settings.routing.cascade.mode == "off" and not settings.example_cache.enabled
    assert settings.guard.ood.action == "allow" and settings.routing.router_artifact == str(tmp_path / "r")
    settings_from_dict(gateway_config("http://127.0.0.1:9/v1", None, None))
    two = settings_from_dict(gateway_config("http://127.0.0.1:9/v1", None, None, workers=2, batching=False))
    assert two.workers == 2 and not two.classifiers.batching and settings.classifiers.batching
    assert "api_base: http://127.0.0.1:9/v1" in litellm_config("http://127.0.0.1:9/v1")


def test_synthetic_training_data(tmp_path):
    assert synthetic_prompts(5, seed=1) == synthetic_prompts(5, seed=1)
    files = write_training_data(tmp_path)
    assert sum(1 for _ in files["guard_train"].open()) == 450 and sum(1 for _ in files["routing"].open()) == 400


def test_prompts_from_guard_routing_and_chat_rows(tmp_path):
    import json

    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}", "label": "law"}) for i in range(5)))
    (tmp_path / "r.jsonl").write_text(json.dumps({"prompt": "p", "strong_score": 1, "weak_score": 0}) + "\n\n"
                                      + json.dumps({"messages": [{"role": "user", "content": "m"}]}))
    both = read_prompts([str(tmp_path / "g.jsonl"), str(tmp_path / "r.jsonl")], 100)
    assert [m[-1]["content"] for m in both] == ["t0", "t1", "t2", "t3", "t4", "p", "m"]
    drawn = read_prompts([str(tmp_path / "g.jsonl")], 3)
    assert len(drawn) == 3 and drawn == read_prompts([str(tmp_path / "g.jsonl")], 3)  # seeded
    (tmp_path / "bad.jsonl").write_text(json.dumps({"label": "x"}))
    with pytest.raises(ValueError, match="bad.jsonl:1: a prompt row needs"):
        read_prompts([str(tmp_path / "bad.jsonl")], 3)


def test_knee_is_the_highest_rate_within_the_p99_limit_without_errors():
    def cell(rate, p99, errors=0):
        return {"mode": "nonstream", "rate": rate, "switchyard": {"num_errors": errors},
                "switchyard_overhead": {"ms_p99": p99}}

    cells = [cell(100, 2.0), cell(200, 9.9), cell(300, 4.0, errors=1), cell(500, 30.0)]
    assert knee(cells, "nonstream", "switchyard", 10.0) == 200
    assert knee(cells, "nonstream", "switchyard", 1.0) is None
    assert knee(cells, "stream", "switchyard", 10.0) is None


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 99) == 5.0


@pytest.mark.parametrize("stream", [False, True])
async def test_loadgen_against_fake_upstream(live_server, stream):
    app = FakeUpstream(behavior=FakeBehavior(num_tokens=4))
    url = f"{live_server(app).base_url}/v1/chat/completions"
    bodies = [{"model": "x", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4} for i in range(3)]
    result = await run_load(url, bodies, rate=50, duration_s=0.4, warmup_s=0.1, stream=stream, model="fake-model")
    assert result.num_sent == 20 and result.num_ok == 20 and result.num_errors == 0
    assert 0 < result.latency_ms_p50 <= result.latency_ms_p99 and result.ttfb_ms_p50 <= result.latency_ms_p50
    assert app.last_bodies[-1]["model"] == "fake-model" and app.last_bodies[-1]["stream"] is stream


async def test_loadgen_counts_errors(live_server):
    app = FakeUpstream(behavior=FakeBehavior(mode="error_500"))
    url = f"{live_server(app).base_url}/v1/chat/completions"
    result = await run_load(url, [{"messages": []}], rate=40, duration_s=0.25, warmup_s=0.0)
    assert result.num_ok == 0 and result.num_errors == result.num_sent == 10
    assert "HTTP 500" in result.errors[0]


def test_bench_args():
    quick = parse_args(["--quick", "--rates", "100", "--modes", "stream"])
    assert (quick.duration, quick.warmup, quick.rates, quick.modes) == (2.0, 0.5, [100.0], ["stream"])
    assert parse_args([]).duration == 10.0
    named = parse_args(["--guard", "g", "--router", "r", "--prompts", "a.jsonl,b.jsonl", "--workers", "2"])
    assert (named.guard_artifact, named.router_artifact, named.prompts, named.workers) == ("g", "r", "a.jsonl,b.jsonl", 2)
    assert parse_args(["--guard-artifact", "g"]).guard_artifact == "g" and not named.no_batching
    with pytest.raises(ValueError):
        parse_args(["--modes", "bogus"])
    with pytest.raises(ValueError):
        parse_args(["--rates", "-5"])


def test_api_bodies_translate_the_chat_body():
    chat = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
            "max_tokens": 8, "temperature": 0}
    assert api_body("chat", chat, stream=True) == dict(chat, stream=True, stream_options={"include_usage": True})
    assert api_body("responses", chat, stream=False) == {"model": "m", "input": chat["messages"], "max_output_tokens": 8,
                                                         "temperature": 0, "stream": False}
    assert api_body("messages", chat, stream=True) == {"model": "m", "system": "Be brief.", "max_tokens": 8,
                                                       "temperature": 0, "stream": True,
                                                       "messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(ValueError, match="unknown api 'grpc'"):
        api_body("grpc", chat, stream=False)
    assert parse_args([]).apis == ["chat", "responses", "messages"]
    assert parse_args(["--apis", "messages"]).apis == ["messages"]
    with pytest.raises(ValueError, match="--apis: unknown"):
        parse_args(["--apis", "chat,grpc"])


@pytest.fixture
def bench_gateway(live_server):
    """The benchmark's own gateway config (remote slm / llm pools, routing off) over a live FakeUpstream."""
    from gateway.app import create_app

    upstream = FakeUpstream(behavior=FakeBehavior(num_tokens=4))
    url = live_server(upstream).base_url + "/v1"
    return live_server(create_app(settings_from_dict(gateway_config(url, None, None)))), upstream


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("stream", [False, True])
async def test_loadgen_speaks_each_api_through_the_gateway(bench_gateway, api, stream):
    from bench.gateway import API_PATHS

    server, upstream = bench_gateway
    bodies = [{"model": "x", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": f"q{i}"}], "max_tokens": 4} for i in range(3)]
    result = await run_load(server.base_url + API_PATHS[api], bodies, rate=40, duration_s=0.25, warmup_s=0.05,
                            stream=stream, model="auto", api=api)
    assert result.api == api and result.num_sent == 10 and result.num_ok == 10 and result.errors == []
    assert result.reported_overhead_ms_p50 is not None  # the gateway's x-switchyard-overhead-ms
    sent = upstream.last_bodies[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."} and sent["max_tokens"] == 4


def test_is_complete_needs_the_last_event_of_its_own_api(bench_gateway):
    import httpx

    from bench.gateway import API_PATHS

    server, _ = bench_gateway
    chat = {"model": "auto", "messages": [{"role": "user", "content": "q"}], "max_tokens": 4}
    answers = {(api, stream): httpx.post(server.base_url + API_PATHS[api], json=api_body(api, chat, stream=stream)).content
               for api in APIS for stream in (False, True)}
    for (api, stream), body in answers.items():
        assert is_complete(api, body, stream=stream), (api, stream)
        others = [a for a in APIS if a != api]
        assert not any(is_complete(other, body, stream=stream) for other in others), (api, stream)
        if stream:  # the stream cut before its last event is not a whole answer
            cut = body.rstrip()[: body.rstrip().rfind(b"event: " if api != "chat" else b"data: ")]
            assert not is_complete(api, cut, stream=True), api


def test_cli_passes_leading_options_to_the_benchmark(capsys):
    assert cli_main(["bench", "gateway", "--modes", "bogus"]) == 2
    assert "--modes: unknown ['bogus']" in capsys.readouterr().err


def test_instructions_bench_args(capsys):
    from bench.instructions import parse_args as instr_args

    opts = instr_args(["--requests", "40", "--modes", "stream"])
    assert (opts.requests, opts.modes) == (40, ["stream"])
    with pytest.raises(ValueError):
        instr_args(["--requests", "3"])
    assert cli_main(["bench", "instructions", "--modes", "bogus"]) == 2
    assert "--modes: valid are nonstream, stream" in capsys.readouterr().err
