"""`switchyard label`: answer scoring, a fake OpenAI server on real uvicorn, and a tiny local model."""

import json

import pytest
from fastapi import FastAPI

from training.cli import main
from training.label import agreement, score_answer


def test_score_answer_rules():
    assert score_answer("So the total is 1,234 apples.", "1234") == 1.0
    assert score_answer("It is 18 then 19.", "18") == 0.0  # last number counts
    assert score_answer("B. Paris", "B") == 1.0
    assert score_answer("The answer is C", "B") == 0.0
    assert score_answer("the capital is Paris!", "paris") == 1.0
    assert score_answer("London", "Paris") == 0.0
    assert agreement("the cat sat", "the cat sat") == 1.0
    assert agreement("a b", "c d") == 0.0
    assert 0 < agreement("the cat sat down", "the cat") < 1


def fake_openai(answers: dict[str, str], name: str) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        prompt = body["messages"][-1]["content"]
        text = answers.get(prompt, "I do not know")
        return {
            "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": [{"token": w, "logprob": -0.5, "bytes": None, "top_logprobs": []}
                                         for w in text.split()]},
            }],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        }

    return app


def test_label_with_fake_openai_servers(tmp_path, live_server, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "What is 6*7?", "answer": "42"},
        {"id": "b", "prompt": "Capital of France? A. Paris B. Rome", "answer": "A"},
        {"id": "c", "prompt": "Say hello"},
    ]) + "\n")
    slm = live_server(fake_openai({"What is 6*7?": "It is 41.", "Capital of France? A. Paris B. Rome": "A",
                                   "Say hello": "hello there"}, "small"))
    llm = live_server(fake_openai({"What is 6*7?": "6*7 = 42", "Capital of France? A. Paris B. Rome": "A. Paris",
                                   "Say hello": "hello"}, "big"))
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--prompts", str(prompts), "--slm", f"{slm.base_url}/v1", "--llm",
                 f"{llm.base_url}/v1#big", "--out", str(out), "--max-tokens", "16"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["strong_score"], r["weak_score"]) for r in rows[:2]] == [("a", 1.0, 0.0), ("b", 1.0, 1.0)]
    assert rows[2]["score_type"] == "agreement_with_llm" and rows[2]["weak_score"] == pytest.approx(2 / 3)
    assert rows[0]["slm_mean_logprob"] == pytest.approx(-0.5)
    assert "labelled 3 prompts" in capsys.readouterr().out
    # the output is routing data that `train router` accepts
    from training.data import load_routing_rows

    assert len(load_routing_rows(out, require="pairwise")) == 3


def test_label_bad_prompts_file(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["label", "--prompts", str(f), "--slm", "x", "--llm", "y", "--out", str(tmp_path / "o")]) == 2
    assert "p.jsonl:2: missing or empty 'prompt'" in capsys.readouterr().err


def test_label_with_tiny_local_model(tmp_path, tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "add two numbers", "answer": "3"}) + "\n"
                       + json.dumps({"prompt": "hello"}) + "\n")
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--prompts", str(prompts), "--slm", model, "--llm", model, "--out", str(out),
                 "--max-tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    # same model, greedy → identical answers → full agreement on the reference-free row
    assert rows[0]["slm_answer"] == rows[0]["llm_answer"]
    assert rows[1]["weak_score"] == 1.0 and rows[1]["slm_min_logprob"] <= 0
