"""The pieces of `switchyard bench quantization` (bench/quantization.py): agreement and prefix metrics, the
roofline arithmetic, weight bytes per token, the tolerance, the held-out perplexity, the data it reads, and a
--quick run on a tiny model. (The benchmark itself is run by hand; these keep its pieces from rotting.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bench.quantization import (
    TOLERANCE,
    Agreement,
    choose_default,
    common_prefix_len,
    escalation_share,
    heldout_text,
    load_prompts,
    parse_args,
    prefix_share,
    roofline_tokens_per_s,
    sliding_window_nll,
    weight_bytes_per_token,
)
from training.cli import main as cli_main


def test_prefix_metrics():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert prefix_share([1, 2, 3], [1, 2, 4, 5]) == 0.5  # 2 of the longer output's 4 tokens
    assert prefix_share([1, 2], [1, 2]) == 1.0 and prefix_share([], []) == 1.0
    assert prefix_share([7], []) == 0.0


def test_agreement_first_k_exact_and_mean_prefix():
    ref = [[1, 2, 3, 4], [5, 6], [9, 9, 9, 9]]
    other = [[1, 2, 3, 8], [5, 6], [8, 9, 9, 9]]
    a = Agreement.of(ref, other, k=3)
    assert a.first_k_match == pytest.approx(2 / 3)  # the first 3 tokens agree for prompts 0 and 1
    assert a.exact_match == pytest.approx(1 / 3)
    assert a.mean_prefix_share == pytest.approx((3 / 4 + 1 + 0) / 3)
    # an output that stops early is not a match of the first k tokens
    assert Agreement.of([[1, 2]], [[1, 2, 3]], k=16).first_k_match == 0.0
    with pytest.raises(ValueError):
        Agreement.of([[1]], [])


def test_roofline_arithmetic():
    assert roofline_tokens_per_s(30e9, 150_000_000) == pytest.approx(200.0)
    assert roofline_tokens_per_s(8e9, 4_000_000) == pytest.approx(2000.0)
    with pytest.raises(ValueError):
        roofline_tokens_per_s(30e9, 0)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.norm = nn.LayerNorm(64)
        self.proj = nn.Linear(64, 32, bias=False)
        self.lm_head = nn.Linear(64, 100, bias=False)
        self.lm_head.weight = self.embed.weight  # tied


def test_weight_bytes_per_token_counts_tied_lm_head_once_and_one_embedding_row():
    from backends.engine.layers.quantization import quantize_for_engine

    model = _Toy()
    norm = 2 * 64 * 4
    assert weight_bytes_per_token(model) == 100 * 64 * 4 + norm + 32 * 64 * 4  # lm_head reads the whole table
    quantize_for_engine(model, "int8")
    if model.lm_head.kernel == "native":  # 16-row tiles; per 32 weights 32 bytes + an fp16 scale
        int8 = lambda n, k: -(-n // 16) * 16 * (k // 32) * 34  # noqa: E731
    else:  # int8 weights + bf16 per-row scales
        int8 = lambda n, k: n * k + n * 2  # noqa: E731
    assert weight_bytes_per_token(model) == 64 * 4 + norm + int8(32, 64) + int8(100, 64)  # one fp32 row gathered
    untied = nn.Sequential(nn.Embedding(10, 8))
    assert weight_bytes_per_token(untied) == 8 * 4


def test_tolerance_and_choice():
    fp32 = {"perplexity": 10.0, "first_k_match": 1.0, "escalated_default_config": 0.30,
            "escalated_default_rule": 0.50, "decode_tokens_per_s": 20.0}
    bf16 = dict(fp32, first_k_match=0.60)
    ok = dict(fp32, perplexity=10.4, first_k_match=0.56, escalated_default_config=0.33, escalated_default_rule=0.47)
    assert TOLERANCE.failures(ok, fp32, bf16, judge_escalation=True) == []
    bad = dict(ok, perplexity=10.6, first_k_match=0.54, escalated_default_rule=0.535)
    reasons = TOLERANCE.failures(bad, fp32, bf16, judge_escalation=True)
    assert len(reasons) == 3 and "perplexity +6.0%" in reasons[0] and "agreement" in reasons[1]
    assert "escalated_default_rule moved +3.5 points" in reasons[2]
    assert len(TOLERANCE.failures(bad, fp32, bf16, judge_escalation=False)) == 2  # the LLM is not judged
    assert TOLERANCE.failures(ok, fp32, None, judge_escalation=False) == ["no bf16 reference for greedy agreement"]
    rows = {"fp32": fp32, "int8": dict(ok, quantization="int8", decode_tokens_per_s=60.0, within_tolerance=True),
            "int4": dict(ok, quantization="int4", decode_tokens_per_s=80.0, within_tolerance=True)}
    assert choose_default(rows) == "int4"
    rows["int4"]["within_tolerance"] = False
    assert choose_default(rows) == "int8"
    rows["int8"]["within_tolerance"] = False
    assert choose_default(rows) == "none"


def test_escalation_share_applies_the_cascade_rule():
    from gateway.cascade import DEFAULT_RULE, CascadeRule

    answers = [[-0.1, -0.2], [-2.0, -2.0], [], [-0.01] * 19 + [-7.5]]
    assert escalation_share(answers, CascadeRule(min_mean_logprob=-1.5)) == 0.5  # low mean; empty
    assert escalation_share(answers, DEFAULT_RULE) == 0.75  # and the -7.5 token (mean -0.38)
    with pytest.raises(ValueError):
        escalation_share([], DEFAULT_RULE)


def test_sliding_window_nll_matches_hf_loss_and_scores_every_token_once(tiny_model_dir):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    nll, count = sliding_window_nll(model, ids, window=64, stride=32, chunk=7)  # one window
    with torch.inference_mode():
        loss = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert count == 39 and nll / count == pytest.approx(loss, rel=1e-5)
    nll_w, count_w = sliding_window_nll(model, ids, window=16, stride=8)
    assert count_w == 39 and math.isfinite(nll_w)
    with pytest.raises(ValueError):
        sliding_window_nll(model, ids, window=8, stride=16)


def _data_dir(tmp_path):
    (tmp_path / "guard").mkdir()
    (tmp_path / "routing").mkdir()
    guard = [{"text": f"Can my landlord keep deposit number {i}?", "label": "law"} for i in range(12)]
    guard.append({"text": "x" * 900, "label": "law"})  # too long: never sampled
    routing = [{"source": "gsm8k", "prompt": f"What is {i} plus {i}?"} for i in range(6)]
    routing += [{"source": "mmlu", "prompt": f"Question {i}\nA. a\nB. b\nAnswer:"} for i in range(6)]
    routing += [{"source": "mtbench", "prompt": "t1", "turns": ["Write a poem about the sea.", "Now shorter."]},
                {"source": "mtbench", "prompt": "t2", "turns": ["Explain rain.", "To a child."]}]
    for name, rows in (("guard/test_id.jsonl", guard), ("routing/routing_bench.jsonl", routing)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_prompts_and_heldout_text(tmp_path):
    data = _data_dir(tmp_path)
    prompts = load_prompts(data, 9, seed=1)
    assert prompts == load_prompts(data, 9, seed=1) and len(prompts) == 9
    assert sum("landlord" in p for p in prompts) == 5 and all(len(p) <= 800 for p in prompts)
    assert heldout_text(data) == "Write a poem about the sea.\n\nNow shorter.\n\nExplain rain.\n\nTo a child."
    with pytest.raises(ValueError, match="--prompts 40"):
        load_prompts(data, 40)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "nowhere", 4)


def test_bench_args(capsys):
    opts = parse_args(["--data", "/d"])
    assert (opts.prompts, opts.max_tokens, opts.ppl_tokens, opts.ppl_window, opts.ppl_stride) == (200, 32, 4096, 1024, 512)
    assert opts.formats == ["fp32", "bf16", "int8", "int4"] and opts.models == ["smollm2-135m", "gemma3-270m"]
    assert parse_args(["--data", "/d", "--formats", "int4,fp32"]).formats == ["fp32", "int4"]
    with pytest.raises(ValueError, match="unknown"):
        parse_args(["--data", "/d", "--formats", "fp8"])
    assert cli_main(["bench", "quantization", "--data", "/d", "--formats", "fp8"]) == 2
    assert "--formats: unknown ['fp8']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--data is required"):
        parse_args([])
    assert parse_args(["--speed-only"]).data is None


def test_quick_run_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    data = _data_dir(tmp_path)
    folder = tiny_model_dir("llama")
    assert cli_main(["bench", "quantization", "--quick", "--json", "--data", str(data), "--models", str(folder),
                     "--threads", "1", "--prompts", "6"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    rows = report["models"][str(folder)]["rows"]
    assert list(rows) == ["fp32", "bf16", "int8", "int4"]
    assert rows["fp32"]["first_k_match"] == 1.0 and rows["fp32"]["perplexity_vs_fp32"] == 1.0
    assert rows["int8"]["weight_bytes_per_token"] < rows["bf16"]["weight_bytes_per_token"] < \
        rows["fp32"]["weight_bytes_per_token"]
    for r in rows.values():
        assert r["roofline_tokens_per_s"] == pytest.approx(
            report["bandwidth"]["best_read_gb_s"] * 1e9 / r["weight_bytes_per_token"])
        assert r["decode_tokens_per_s"] == pytest.approx(max(r["decode_rounds"]), abs=0.01) and len(r["decode_rounds"]) == 2
        assert 0 <= r["escalated_default_config"] <= 1
    assert "within_tolerance" in rows["int4"] and "within_tolerance" not in rows["bf16"]
    assert report["models"][str(folder)]["default"] in ("none", "int8", "int4")
    assert "chosen default" in out and "memory read bandwidth (measured" in out
    assert cli_main(["bench", "quantization", "--quick", "--json", "--speed-only", "--models", str(folder),
                     "--formats", "int8", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = report["models"][str(folder)]["rows"]
    assert list(rows) == ["fp32", "int8"] and "perplexity" not in rows["int8"] and rows["int8"]["speed_vs_fp32"] > 0
