"""`switchyard bench speculation`: decode tokens/s with n-gram speculation off vs on, beside llama-server.

Systems, one chat prompt per workload, greedy, at most ``--max-tokens`` tokens (EOS ends a request):

* switchyard ``off`` — the embedded engine (``LLMEngine`` in-process) without speculation;
* switchyard ``ngram`` — drafts from the request's own prompt + output (``speculation: {method: ngram}``);
* switchyard ``ngram+shared`` — the same, plus the shared draft table of the requests' namespace
  (``shared_context: true``; every request of the benchmark is in one namespace);
* ``llama-server`` on the GGUF the model is converted from, same threads, one slot, plain;
* ``llama-server --spec-type ngram-mod`` (its defaults; one hash pool shared by all requests), when the
  binary lists that type in ``--help`` (else ``ngram-cache`` if listed, else the row is skipped with a note).

llama-server gets the same prompt token ids (``/v1/completions``, streamed, prompt cache on). Every system
runs once per round, in that order, for ``--repeats`` rounds after a warm-up on an unrelated prompt.
Decode tokens/s = (output tokens - 1) / (time of the last token - time of the first token). Reported per
system: ``first`` = the first round (for the shared table and ngram-mod: only other workloads' outputs
seen yet), ``best`` = the best round (from the second round on, both have seen this very request's
answer). ``identical`` = the same output tokens as ``off`` (llama-server: the same text; with ``--concurrency``,
also every copy the same as the first). ``--concurrency N``
sends N copies at once to switchyard only (prefix caching off, output tok/s of the batch with prefill);
llama-server rows are c = 1 only. Acceptance = accepted / drafted tokens over all rounds (llama-server: its
``timings.draft_n_accepted / draft_n``).

``switchyard bench speculation [--quick] [--json] [--model smollm2-135m] [--quantization none|int8|int4]
[--max-tokens 128] [--repeats 3] [--threads 1] [--concurrency 1] [--workloads json_repeat,code_edit,plain_chat]
[--skip-llamacpp] [--llama-server PATH] [--bench-dir .bench]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.engine.args import EngineArgs, SpeculationConfig
from backends.engine.llm_engine import LLMEngine
from backends.engine.sampling_params import SamplingParams
from backends.engine.speculation import ngram_lookup
from backends.models import resolve_model_path
from bench.engine import LlamaServer, ensure_llama_server, llama_stream, say

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
WARMUP = "Say hello."
NAMESPACE = "bench"
OURS = {
    "off": SpeculationConfig(),
    "ngram": SpeculationConfig(method="ngram"),
    "ngram+shared": SpeculationConfig(method="ngram", shared_context=True),
}
NUM_DRAFTS_BOUND = SpeculationConfig().num_draft_tokens  # the default most drafts a step
LLAMA_SPEC_TYPES = ("ngram-mod", "ngram-cache")  # the first one the binary lists is measured


@dataclass
class Run:
    """One request (or batch) of one system: its output and decode rate; drafted/accepted when known."""

    tok_s: float
    tokens: list[int] | None = None  # switchyard
    text: str = ""
    num_tokens: int = 0
    drafted: int | None = None
    accepted: int | None = None
    copies_agree: bool = True  # --concurrency N: the N copies answered the same tokens


@dataclass
class Row:
    system: str
    runs: list[Run] = field(default_factory=list)

    def summary(self, off: Row | None, off_text: str) -> dict[str, Any]:
        last = self.runs[-1]
        drafted = sum(r.drafted or 0 for r in self.runs)
        accepted = sum(r.accepted or 0 for r in self.runs)
        same = (last.tokens == off.runs[-1].tokens if last.tokens is not None and off is not None
                else last.text == off_text)
        same = same and all(r.copies_agree for r in self.runs)
        return {"first_tok_s": round(self.runs[0].tok_s, 1), "best_tok_s": round(max(r.tok_s for r in self.runs), 1),
                "output_tokens": last.num_tokens, "identical": same,
                "acceptance": round(accepted / drafted, 2) if drafted else None,
                "drafted": drafted if any(r.drafted is not None for r in self.runs) else None}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="switchyard bench speculation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled model name (its GGUF source runs llama.cpp)")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"], help="switchyard weights")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens at most (default 128; --quick 24)")
    p.add_argument("--repeats", type=int, default=None, help="rounds per workload (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every system (default 1)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="> 1: that many copies at once to switchyard (output tok/s of the batch; no llama-server)")
    p.add_argument("--workloads", default=None, help=f"comma list of {', '.join(WORKLOADS)} (--quick: json_repeat)")
    p.add_argument("--skip-llamacpp", action="store_true", help="do not run llama-server")
    p.add_argument("--llama-server", type=Path, default=None, help="use this llama-server binary (no build)")
    p.add_argument("--bench-dir", type=Path, default=Path(".bench"), help="where peers are built (git-ignored)")
    p.add_argument("--quick", action="store_true", help="a smoke run: json_repeat, 24 tokens, 2 rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    opts = p.parse_args(argv)
    opts.max_tokens = opts.max_tokens or (24 if opts.quick else 128)
    opts.repeats = opts.repeats or (2 if opts.quick else 3)
    opts.workloads = (opts.workloads or ("json_repeat" if opts.quick else ",".join(WORKLOADS))).split(",")
    unknown = [w for w in opts.workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    if opts.concurrency < 1 or opts.repeats < 1 or opts.max_tokens < 2:
        raise ValueError("need --concurrency >= 1, --repeats >= 1, --max-tokens >= 2")
    return opts


# ------------------------------------------------------------------------------------ switchyard


def run_ours(engine: LLMEngine, prompt: list[int], max_tokens: int, namespace: str | None) -> Run:
    s0 = engine.stats()
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), namespace=namespace)
    seq = engine.requests[rid][0]
    first, first_count = None, 0
    while engine.has_unfinished_requests():
        engine.step()
        if first is None and seq.num_output_tokens:
            first, first_count = time.perf_counter(), seq.num_output_tokens
    elapsed = time.perf_counter() - first
    s1 = engine.stats()
    tokens = seq.output_token_ids
    return Run((len(tokens) - first_count) / elapsed if elapsed > 0 else 0.0, tokens, num_tokens=len(tokens),
               drafted=s1.num_draft_tokens_total - s0.num_draft_tokens_total,
               accepted=s1.num_accepted_tokens_total - s0.num_accepted_tokens_total)


def run_ours_batch(engine: LLMEngine, prompt: list[int], max_tokens: int, concurrency: int,
                   namespace: str | None) -> Run:
    """``concurrency`` copies at once (prefix cache off in the engine, so each prefills its own prompt):
    output tokens/s over the whole batch, prefill included."""
    s0 = engine.stats()
    start = time.perf_counter()
    seqs = []
    for _ in range(concurrency):
        rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), namespace=namespace)
        seqs.append(engine.requests[rid][0])
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - start
    s1 = engine.stats()
    outputs = [s.output_token_ids for s in seqs]
    return Run(sum(len(t) for t in outputs) / elapsed, outputs[0], num_tokens=len(outputs[0]),
               drafted=s1.num_draft_tokens_total - s0.num_draft_tokens_total,
               accepted=s1.num_accepted_tokens_total - s0.num_accepted_tokens_total,
               copies_agree=all(t == outputs[0] for t in outputs))


def free_verify_bound(prompt: list[int], output: list[int], k: int) -> float:
    """What n-gram speculation could at most gain on this greedy output: drafts from the request's own text
    (any n from 1 to 8, the longest most recent match, up to k tokens), each verification as cheap as a plain
    step; output tokens / steps."""
    if not output:
        return 1.0
    done = steps = 0
    while done < len(output):
        drafts, _ = ngram_lookup(prompt + output[:done], 1, 8, k)
        accepted = 0
        while accepted < len(drafts) and done + accepted < len(output) and drafts[accepted] == output[done + accepted]:
            accepted += 1
        done += accepted + 1
        steps += 1
    return len(output) / steps


# ------------------------------------------------------------------------------------ llama-server


def llama_spec_type(binary: Path) -> str | None:
    """The n-gram speculation type this llama-server lists in ``--help`` (``LLAMA_SPEC_TYPES`` order), else None."""
    out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    listed = next((line for line in (out.stdout + out.stderr).splitlines() if line.startswith("--spec-type")), "")
    return next((t for t in LLAMA_SPEC_TYPES if t in listed), None)


def run_llama(url: str, prompt: list[int], max_tokens: int) -> Run:
    import httpx

    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            return await llama_stream(client, url, prompt, max_tokens, ignore_eos=False, timings=True)

    r = asyncio.run(go())
    span = r.last - (r.first or r.last)
    drafted = accepted = None  # unknown without the server's timings; it leaves draft_n out when it drafted nothing
    if r.timings is not None:
        drafted, accepted = r.timings.get("draft_n", 0), r.timings.get("draft_n_accepted", 0)
    return Run((r.num_tokens - 1) / span if span > 0 else 0.0, text=r.text, num_tokens=r.num_tokens,
               drafted=drafted, accepted=accepted)


def start_llama(opts: argparse.Namespace, stack: contextlib.ExitStack, ctx: int,
                notes: list[str]) -> dict[str, LlamaServer]:
    """The llama-server rows (system name → started server, stopped when ``stack`` closes); the reasons for
    any row left out go to ``notes``."""
    from backends.models import CATALOG, source_gguf

    if opts.skip_llamacpp:
        return {}
    if opts.concurrency > 1:
        notes.append("llama-server rows are measured at c = 1 only")
        return {}
    if opts.model not in CATALOG:
        notes.append("llama.cpp skipped: --model is not a bundled model with a GGUF source")
        return {}
    servers: dict[str, LlamaServer] = {}
    try:
        binary = opts.llama_server or ensure_llama_server(opts.bench_dir)
        gguf = source_gguf(opts.model)
        spec = llama_spec_type(binary)
        variants = {"llama-server": []}
        if spec is None:
            notes.append(f"{binary} lists none of {', '.join(LLAMA_SPEC_TYPES)} under --spec-type: no speculative row")
        else:
            variants[f"llama-server {spec}"] = ["--spec-type", spec]
        for name, extra in variants.items():
            log = opts.bench_dir.resolve() / f"llama-server-speculation{'-' + extra[-1] if extra else ''}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            say(f"[llama.cpp] {name}: {gguf.name}, 1 slot x {ctx} ctx, {opts.threads} threads")
            servers[name] = stack.enter_context(LlamaServer(binary, gguf, opts.threads, 1, ctx, log, extra))
        opts.llama_gguf = gguf.name
    except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as e:
        notes.append(f"llama.cpp skipped: {e}")
        say(f"[llama.cpp] skipped: {e}")
    return servers


# ------------------------------------------------------------------------------------ the run


def run(opts: argparse.Namespace) -> dict[str, Any]:
    notes: list[str] = []
    load_before = os.getloadavg()
    path = resolve_model_path(opts.model)
    say(f"[switchyard] loading {opts.model} ({opts.quantization}) x {len(OURS)} engines ...")
    engines = {name: LLMEngine(path, EngineArgs(speculation=spec, quantization=opts.quantization,
                                                num_threads=opts.threads, num_kv_blocks=256,
                                                enable_prefix_caching=opts.concurrency == 1))
               for name, spec in OURS.items()}
    tok = engines["off"].tokenizer

    def prompt_of(text: str) -> list[int]:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return tok(chat, add_special_tokens=False)["input_ids"]

    prompts = {name: prompt_of(WORKLOADS[name]) for name in opts.workloads}
    ctx = max(len(p) for p in prompts.values()) + opts.max_tokens + 64
    opts.llama_gguf = None
    results: dict[str, dict[str, Any]] = {}
    bounds: dict[str, float] = {}  # free_verify_bound of each workload's output
    with contextlib.ExitStack() as stack:
        servers = start_llama(opts, stack, ctx, notes)
        warm = prompt_of(WARMUP)
        for name, engine in engines.items():
            run_ours(engine, warm, 8, NAMESPACE if name == "ngram+shared" else None)
        for server in servers.values():
            run_llama(server.base_url, warm, 8)
        for workload in opts.workloads:
            prompt = prompts[workload]
            rows = {name: Row(name) for name in [*engines, *servers]}
            for _ in range(opts.repeats):
                for name, engine in engines.items():
                    namespace = NAMESPACE if name == "ngram+shared" else None
                    rows[name].runs.append(run_ours_batch(engine, prompt, opts.max_tokens, opts.concurrency, namespace)
                                           if opts.concurrency > 1 else run_ours(engine, prompt, opts.max_tokens,
                                                                                 namespace))
                for name, server in servers.items():
                    rows[name].runs.append(run_llama(server.base_url, prompt, opts.max_tokens))
            off = rows["off"]
            off_text = tok.decode(off.runs[-1].tokens or [], skip_special_tokens=True)
            results[workload] = {name: row.summary(off, off_text) for name, row in rows.items()}
            base = results[workload]["off"]["best_tok_s"]
            for summary in results[workload].values():
                summary["best_vs_off"] = round(summary["best_tok_s"] / base, 2) if base else None
            bound = bounds[workload] = round(free_verify_bound(prompt, off.runs[-1].tokens or [], NUM_DRAFTS_BOUND), 2)
            _print_workload(workload, results[workload])
            print(f"  n-gram drafts from the request's own text, every verification free, k <= {NUM_DRAFTS_BOUND}: "
                  f"at most {bound:.2f}x over off on this output", flush=True)
    load_after = os.getloadavg()
    if max(load_before[0], load_after[0]) > opts.threads + 0.5:
        notes.append(f"measured while other jobs ran (load average {load_before[0]:.1f} → {load_after[0]:.1f} on "
                     f"{os.cpu_count()} CPUs): numbers are noisy")
    return {"model": opts.model, "quantization": opts.quantization, "llama_gguf": opts.llama_gguf,
            "max_tokens": opts.max_tokens, "repeats": opts.repeats, "threads": opts.threads,
            "concurrency": opts.concurrency, "quick": opts.quick, "load_before": load_before,
            "load_after": load_after, "workloads": results, "free_verify_bound": bounds, "notes": notes}


def _print_workload(workload: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{workload}")
    print(f"  {'system':24s} {'first':>7s} {'best':>7s} {'x off':>6s} {'accept':>7s} {'tokens':>7s} identical")
    for name, r in rows.items():
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"  {name:24s} {r['first_tok_s']:7.1f} {r['best_tok_s']:7.1f} {r['best_vs_off'] or 0:6.2f} "
              f"{acceptance:>7s} {r['output_tokens']:7d} {r['identical']}", flush=True)


def main(args: argparse.Namespace | None = None) -> int:
    opts = parse_args(list(getattr(args, "bench_args", None) or []))
    report = run(opts)
    load = report["load_after"]
    print(f"\nswitchyard {report['model']} ({report['quantization']}) vs llama-server ({report['llama_gguf']}); "
          f"decode tok/s, c = {report['concurrency']}, {report['threads']} threads, max {report['max_tokens']} tokens, "
          f"best of {report['repeats']}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    for note in report["notes"]:
        print(f"note: {note}")
    if opts.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(argparse.Namespace(bench_args=sys.argv[1:])))
