"""`switchyard cache stats|export|import|clear|replay` against a real redis-server."""

from __future__ import annotations

import asyncio
import json

from gateway.example_cache import RedisExampleStore
from gateway.settings import ExampleCacheSettings
from tests.gateway.fakes import bow_embed
from training.cli import main


def populate(redis_url: str, rows: dict[str, list[tuple[str, str]]]) -> None:
    async def run():
        store = RedisExampleStore(redis_url, ExampleCacheSettings(min_similarity=0.3), embed=bow_embed)
        for ns, pairs in rows.items():
            for q, a in pairs:
                assert await store.admit(ns, q, a, "llm", "stop")
        await store.close()

    asyncio.run(run())


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


ROWS = {
    "alice": [("what is two plus two", "4"), ("what is three plus three", "6"), ("capital of france", "Paris")],
    "bob": [("hello there friend", "hi")],
}


def test_stats_export_clear_import(redis_url, tmp_path, capsys):
    populate(redis_url, ROWS)
    assert main(["cache", "stats", "--redis-url", redis_url, "--json"]) == 0
    stats = last_json(capsys)["namespaces"]
    assert stats["alice"]["num_entries"] == 3 and stats["bob"]["num_entries"] == 1
    assert stats["alice"]["mean_utility"] == 0.5 and stats["alice"]["models"] == ["llm"]

    out = tmp_path / "alice.jsonl"
    assert main(["cache", "export", "--redis-url", redis_url, "--namespace", "alice", "--file", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["4", "6", "Paris"]
    assert all(r["namespace"] == "alice" and r["embedding_f16"] for r in rows)

    assert main(["cache", "clear", "--redis-url", redis_url, "--namespace", "alice"]) == 0
    assert "cleared 3 entries" in capsys.readouterr().out
    assert main(["cache", "stats", "--redis-url", redis_url, "--json"]) == 0
    assert list(last_json(capsys)["namespaces"]) == ["bob"]

    assert main(["cache", "import", "--redis-url", redis_url, "--namespace", "carol", "--file", str(out)]) == 0
    assert main(["cache", "stats", "--redis-url", redis_url, "--namespace", "carol", "--json"]) == 0
    assert last_json(capsys)["namespaces"]["carol"]["num_entries"] == 3
    assert main(["cache", "stats", "--redis-url", redis_url]) == 0
    text = capsys.readouterr().out
    assert "carol: 3 entries" in text and "bob: 1 entries" in text


def test_bad_input_is_one_line(redis_url, tmp_path, capsys):
    assert main(["cache", "clear", "--redis-url", redis_url]) == 2
    assert "clear needs --namespace" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request_text": "q", "answer": "a", "namespace": "x"}\n{"request_text": ""}\n')
    assert main(["cache", "import", "--redis-url", redis_url, "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and len(err.strip().splitlines()) == 1
    assert main(["cache", "stats"]) == 2  # the embedded default has no redis_url
    assert "no Redis" in capsys.readouterr().err


def test_replay_judge_and_neighbours(redis_url, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("SWITCHYARD__EXAMPLE_CACHE__MIN_SIMILARITY", "0.3")
    populate(redis_url, ROWS)
    model = str(tiny_model_dir("llama"))
    base = ["cache", "replay", "--redis-url", redis_url, "--slm", model, "--llm", model, "--json"]
    assert main([*base, "--namespace", "alice", "--dry-run"]) == 0
    report = last_json(capsys)
    alice = report["namespaces"]["alice"]
    assert report["method"] == "judge" and alice["num_scored"] == 3 and alice["num_removed"] == 0
    assert 0.0 <= alice["mean_score"] <= 1.0

    assert main([*base, "--namespace", "alice", "--method", "neighbours", "--dry-run"]) == 0
    alice = last_json(capsys)["namespaces"]["alice"]
    assert alice["num_scored"] == 2  # the two "plus" questions are each other's neighbours; france has none

    assert main([*base, "--namespace", "alice", "--min-score", "1.01"]) == 0  # everything is "harmful"
    alice = last_json(capsys)["namespaces"]["alice"]
    assert alice["num_removed"] == 3
    assert main(["cache", "stats", "--redis-url", redis_url, "--json"]) == 0
    assert "alice" not in last_json(capsys)["namespaces"]
