"""Decode tokens/s with n-gram speculation off vs on, at c = 1, on repetitive and plain workloads.

    python -m bench.speculation [--model smollm2-135m] [--max-tokens 128] [--repeats 3] [--json]

Each workload is one chat prompt, greedy (``--concurrency 8``: eight copies at once, output tok/s of the
batch with prefill included); off and on alternate (best of ``--repeats`` each, so a loaded machine
hurts both alike). Decode tokens/s = (output tokens - 1) / (time from the first token to the last). Prints
the acceptance rate and checks that both runs produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from backends.engine.args import EngineArgs
from backends.engine.llm_engine import LLMEngine
from backends.engine.sampling_params import SamplingParams
from backends.models import resolve_model_path

DOC = json.dumps({"tool": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3},
                  "history": [{"city": "Lyon", "temp": 12}, {"city": "Nice", "temp": 17},
                              {"city": "Lille", "temp": 9}]})
CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
WORKLOADS = {
    "json_repeat": f"Repeat this JSON exactly, then stop:\n{DOC}",
    "code_edit": f"Rewrite this function with the parameter `window` renamed to `size`:\n{CODE}",
    "plain_chat": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    seq = engine.requests[rid][0]
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        if first is None and seq.num_output_tokens:
            first = time.perf_counter()
            first_count = seq.num_output_tokens
    elapsed = time.perf_counter() - first
    return seq.output_token_ids, (len(seq.output_token_ids) - first_count) / elapsed if elapsed > 0 else 0.0


def run_batch(engine: LLMEngine, prompt: list[int], max_tokens: int, concurrency: int) -> tuple[list[list[int]], float]:
    """``concurrency`` copies of the request at once (prefix cache off in the engine, so each prefills its
    own prompt): output tokens/s over the whole batch, prefill included."""
    seqs = []
    start = time.perf_counter()
    for _ in range(concurrency):
        rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
        seqs.append(engine.requests[rid][0])
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - start
    return [s.output_token_ids for s in seqs], sum(s.num_output_tokens for s in seqs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="> 1: that many copies at once, output tok/s of the batch (prefill included)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    path = resolve_model_path(a.model)
    engines = {spec: LLMEngine(path, EngineArgs(speculation=spec, num_threads=a.threads, num_kv_blocks=256,
                                                enable_prefix_caching=a.concurrency == 1))
               for spec in ("none", "ngram")}
    tok = engines["none"].tokenizer
    results = {}
    for name in a.workloads.split(","):
        text = WORKLOADS[name]
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        prompt = tok(chat, add_special_tokens=False)["input_ids"]
        best = {"none": 0.0, "ngram": 0.0}
        outputs = {}
        e = engines["ngram"]
        drafted0, accepted0 = e.stats().num_draft_tokens_total, e.stats().num_accepted_tokens_total
        for _ in range(a.repeats):
            for spec, engine in engines.items():
                if a.concurrency > 1:
                    batch, rate = run_batch(engine, prompt, a.max_tokens, a.concurrency)
                    tokens = batch[0] if all(t == batch[0] for t in batch) else batch
                else:
                    tokens, rate = run(engine, prompt, a.max_tokens)
                outputs[spec] = tokens
                best[spec] = max(best[spec], rate)
        s = e.stats()
        drafted, accepted = s.num_draft_tokens_total - drafted0, s.num_accepted_tokens_total - accepted0
        results[name] = {"off_tok_s": round(best["none"], 1), "on_tok_s": round(best["ngram"], 1),
                         "speedup": round(best["ngram"] / best["none"], 2) if best["none"] else None,
                         "acceptance": round(accepted / drafted, 2) if drafted else None,
                         "output_tokens": len(outputs["none"]),
                         "identical": outputs["none"] == outputs["ngram"]}
        print(f"{name:12s} off {best['none']:6.1f} tok/s  on {best['ngram']:6.1f} tok/s  "
              f"x{results[name]['speedup']}  acceptance {results[name]['acceptance']}  "
              f"tokens {len(outputs['none'])}  identical {results[name]['identical']}", flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs, threads {a.threads}, "
          f"concurrency {a.concurrency}")
    if a.json:
        print(json.dumps({"model": a.model, "max_tokens": a.max_tokens, "concurrency": a.concurrency, "load": load,
                          "workloads": results}))


if __name__ == "__main__":
    main()
