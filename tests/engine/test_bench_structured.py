"""`switchyard bench engine --structured` on a tiny random model, without llama-server: every row and the
compile timings come out, outputs are counted and checked against the schema."""

from __future__ import annotations

import json

from bench import structured
from training.cli import main as cli_main


def test_structured_bench_rows_and_compile_times(tiny_model_dir, capsys):
    folder = str(tiny_model_dir("llama"))
    code = cli_main(["bench", "engine", "--structured", "--model", folder, "--concurrency", "1,2",
                     "--max-tokens", "8", "--compile-repeats", "1", "--skip-llamacpp", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["benchmark"] == "engine-structured"
    rows = report["tokens_per_s"]
    assert [s.split(" ")[0] for s in rows] == ["(a)", "(b)", "(b=)"]
    assert all(rows[s][c] > 0 for s in rows for c in ("1", "2"))
    assert set(report["ratios"]) == {"(a) / (b)", "(a) / (b=)"}
    runs = {(r["system"].split(" ")[0], r["concurrency"]): r for r in report["runs"]}
    for c in (1, 2):
        # the matched row generates exactly what the constrained row did, request by request
        assert runs[("(b=)", c)]["num_tokens"] == runs[("(a)", c)]["num_tokens"]
        assert runs[("(a)", c)]["num_requests"] == c * (3 if c == 1 else 1)
        assert runs[("(a)", c)]["num_valid"] <= runs[("(a)", c)]["num_parsed"]
    compile_ = report["compile"]
    assert set(compile_["per_schema"]) == set(structured.COMPILE_SCHEMAS)
    assert compile_["cold_ms_mean"] > 0 and compile_["cached_us_mean"] > 0


def test_schema_check_counts_parsed_and_valid():
    good = {"title": "Sync", "category": "meeting", "date": "2026-03-01", "start_time": "09:30",
            "duration_minutes": 30, "location": {"name": "Room B", "is_virtual": False},
            "attendees": [{"name": "Ann", "role": "organizer"}], "priority": "normal", "reminder_minutes": 10,
            "confidence": 0.9}
    bad = dict(good, duration_minutes=1000)
    texts = [json.dumps(good, separators=(",", ":")), json.dumps(bad), '{"title": "Sync"', "not json"]
    assert structured.check_outputs(texts, structured.EVENT_SCHEMA) == (2, 1)


def test_event_messages_are_deterministic_and_distinct():
    a = structured.event_messages(32, seed=5)
    assert a == structured.event_messages(32, seed=5)
    assert len(set(a)) == 32
