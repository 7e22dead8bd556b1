"""`switchyard bench gateway`: gateway overhead beside LiteLLM's proxy, same upstream, same load, one run.

What runs (each a separate process on loopback):
  * the fast fake OpenAI upstream (``bench/fake_upstream.py``, uvicorn + uvloop + httptools);
  * the switchyard gateway (``python -m gateway``) with two remote pools (slm, llm) on that upstream and
    routing on: a guard (``widemlp``) and a router (``tfidf_ridge``) artifact trained at bench start on a
    small synthetic in-domain set (a few seconds), or the folders given with ``--guard-artifact`` /
    ``--router-artifact``; guard verdicts are logged, not enforced (``action: allow``), so every request
    reaches the upstream; cascade and example cache off (they are measured by their own benchmarks);
  * LiteLLM's proxy (``litellm[proxy]==1.108.7``, 1 worker), installed on first use into its own venv
    ``.bench/litellm-venv`` (git-ignored; never a project dependency);
  * the open-loop load generator (``bench/loadgen.py``).

For every mode (non-stream, stream) and rate, the same load goes direct to the upstream, through
switchyard and through LiteLLM, minutes apart at most. Overhead = latency through the proxy − direct
latency, at p50 and p99 (percentile minus percentile). The gateway's own ``x-switchyard-overhead-ms``
header is reported beside it. Besides chat completions, the same prompts go through switchyard's Responses
API (``/v1/responses``) and Anthropic Messages (``/v1/messages``) endpoints (``--apis``), each its own row:
their overhead is measured against the same direct chat-completions latency of the cell, since the gateway
translates them into one upstream chat request. LiteLLM is measured on chat completions only.

``switchyard bench gateway [--quick] [--rates 100,500] [--duration 10] [--modes nonstream,stream]
[--apis chat,responses,messages] [--no-litellm] [--guard DIR --router DIR] [--prompts F.jsonl[,F2.jsonl]
[--num-prompts 2000]] [--workers N] [--no-batching] [--json]`` (``switchyard bench gateway -- --help`` lists
every option).

``--prompts``: JSONL rows with ``text`` (the guard's data files), ``prompt`` (routing rows) or ``messages``;
``--num-prompts`` of them are drawn (seed 0) and sent round-robin, each as one chat request. Without it, 256
synthetic prompts. For every mode the report names the knee: the highest rate whose overhead p99 is at
most 10 ms (``--knee-ms``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LITELLM_SPEC = "litellm[proxy]==1.108.7"
DEFAULT_LITELLM_VENV = ROOT / ".bench" / "litellm-venv"
MODEL = "fake-model"
# switchyard's endpoint for each API the load generator speaks (bench/loadgen.py APIS)
API_PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}

_DOMAINS = {
    "law": ["contract", "tenant lease", "copyright claim", "court appeal", "employment dispute", "will and estate",
            "trademark", "non-compete clause", "small claims case", "custody agreement"],
    "finance": ["index fund", "mortgage rate", "retirement account", "credit score", "capital gains tax",
                "bond yield", "emergency savings", "stock dividend", "student loan", "inflation hedge"],
    "healthcare": ["blood pressure", "flu vaccine", "knee pain", "type 2 diabetes", "migraine", "cholesterol",
                   "sleep apnea", "allergy medication", "physical therapy", "vitamin D deficiency"],
}
_EASY = ["What is a {t}?", "Define {t} in one sentence.", "Give a short example of a {t}.",
         "Is a {t} common?", "Name one fact about {t}."]
_HARD = ["Compare the trade-offs of a {t} under three different jurisdictions or scenarios, step by step.",
         "Write a detailed analysis of how a {t} interacts with recent regulation, citing edge cases.",
         "Explain, with a worked numerical example and caveats, how to evaluate a {t} for a complex case.",
         "Draft a structured plan covering risks, alternatives and long-term effects of a {t}."]


def synthetic_prompts(n: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """(text, domain, is_hard) rows from fixed templates; deterministic."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        domain = list(_DOMAINS)[i % 3]
        topic = rng.choice(_DOMAINS[domain])
        hard = rng.random() < 0.4
        template = rng.choice(_HARD if hard else _EASY)
        rows.append((template.format(t=topic) + f" (case {rng.randint(1, 999)})", domain, hard))
    return rows


def write_training_data(folder: Path) -> dict[str, Path]:
    """Small guard (train/dev) and routing files in the formats of DESIGN.md."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"guard_train": folder / "guard_train.jsonl", "guard_dev": folder / "guard_dev.jsonl",
             "routing": folder / "routing.jsonl"}
    with files["guard_train"].open("w") as f:
        for text, domain, _ in synthetic_prompts(450, seed=1):
            f.write(json.dumps({"text": text, "label": domain}) + "\n")
    with files["guard_dev"].open("w") as f:
        for text, domain, _ in synthetic_prompts(90, seed=2):
            f.write(json.dumps({"text": text, "label": domain}) + "\n")
    rng = random.Random(3)
    with files["routing"].open("w") as f:
        for i, (text, domain, hard) in enumerate(synthetic_prompts(400, seed=4)):
            weak = rng.uniform(0.1, 0.5) if hard else rng.uniform(0.7, 1.0)
            f.write(json.dumps({"prompt": text, "strong_score": rng.uniform(0.8, 1.0), "weak_score": weak,
                                "source": domain, "id": f"r{i}"}) + "\n")
    return files


def train_artifacts(folder: Path, log: Path) -> tuple[str | None, str | None, str]:
    """(guard dir, router dir, note) trained through the CLI; None where training failed."""
    data = write_training_data(folder / "data")
    cli = [sys.executable, "-m", "training.cli"]
    runs = {
        "guard": cli + ["train", "guard", "--train", str(data["guard_train"]), "--dev", str(data["guard_dev"]),
                        "--out", str(folder / "guard"), "--kind", "widemlp"],
        "router": cli + ["train", "router", "--data", str(data["routing"]), "--out", str(folder / "router"),
                         "--kind", "tfidf_ridge"],
    }
    out: dict[str, str | None] = {}
    notes = []
    for what, cmd in runs.items():
        t0 = time.monotonic()
        with log.open("a") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env())
        if proc.returncode == 0:
            out[what] = str(folder / what)
            notes.append(f"{what} trained in {time.monotonic() - t0:.1f}s")
        else:
            out[what] = None
            notes.append(f"{what} training failed (rc {proc.returncode}; see {log})")
    return out["guard"], out["router"], "; ".join(notes)


def read_prompts(files: list[str], num: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat messages of ``num`` rows drawn (``seed``) from JSONL files whose rows carry ``text``, ``prompt``
    or ``messages``; all rows, in file order, when there are no more than ``num``."""
    rows = []
    for f in files:
        for i, line in enumerate(Path(f).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row.get("messages"), list):
                rows.append(row["messages"])
            elif isinstance(row.get("text") or row.get("prompt"), str):
                rows.append([{"role": "user", "content": row.get("text") or row["prompt"]}])
            else:
                raise ValueError(f"{f}:{i}: a prompt row needs 'text', 'prompt' or 'messages'")
    if not rows:
        raise ValueError(f"--prompts: no rows in {', '.join(files)}")
    return rows if len(rows) <= num else random.Random(seed).sample(rows, num)


def knee(cells: list[dict[str, Any]], mode: str, target: str, limit_ms: float) -> float | None:
    """The highest rate of ``mode`` whose ``target`` overhead p99 is at most ``limit_ms`` with no errors
    (None: none is)."""
    ok = [c["rate"] for c in cells if c["mode"] == mode and f"{target}_overhead" in c
          and c[f"{target}_overhead"]["ms_p99"] is not None and c[f"{target}_overhead"]["ms_p99"] <= limit_ms
          and not c[target]["num_errors"]]
    return max(ok) if ok else None


def gateway_config(upstream: str, guard: str | None, router: str | None, workers: int = 1,
                   batching: bool = True) -> dict[str, Any]:
    pools = [
        {"name": "slm", "kind": "remote", "model": MODEL, "urls": [upstream], "max_retries": 2,
         "price": {"input_per_1m": 0.02, "output_per_1m": 0.04}},
        {"name": "llm", "kind": "remote", "model": MODEL, "urls": [upstream], "max_retries": 2,
         "price": {"input_per_1m": 0.10, "output_per_1m": 0.20}},
    ]
    return {
        "host": "127.0.0.1", "pools": pools, "log_level": "warning",
        "routing": {"slm_pool": "slm", "llm_pool": "llm", "router_artifact": router, "cascade": {"mode": "off"}},
        "guard": {"artifact": guard, "ood": {"action": "allow"}, "unsafe": {"action": "allow"}},
        "classifiers": {"batching": batching},
        "example_cache": {"enabled": False},
        "workers": workers,
    }


def litellm_config(upstream: str) -> str:
    return (f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n"
            f"      api_base: {upstream}\n      api_key: sk-fake\n")


def ensure_litellm(venv: Path) -> Path:
    """The ``litellm`` executable, installing LITELLM_SPEC into ``venv`` on first use."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing {LITELLM_SPEC} into {venv} (first use; a few minutes)...", file=sys.stderr, flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run(["nice", "-n", "10", str(venv / "bin" / "pip"), "install", "-q", LITELLM_SPEC], check=True)
    if not exe.exists():
        raise RuntimeError(f"{LITELLM_SPEC} installed but {exe} is missing")
    return exe


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD__")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """The processes this benchmark started; ``stop()`` ends each by its own process group id."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.logdir / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, n: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of process group ``pgid`` (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout_s:.0f}s")


def probe(url: str, body: dict[str, Any], api_key: str, api: str = "chat") -> dict[str, str]:
    """One request (``body`` a chat body, sent as ``api`` speaks); returns the interesting response headers.
    Raises on a non-200."""
    import httpx

    from bench.loadgen import api_body

    r = httpx.post(url, json=api_body(api, body, stream=False), timeout=30,
                   headers={"Authorization": f"Bearer {api_key}"})
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
    return {k: v for k, v in r.headers.items() if k.startswith("x-switchyard")}


def settle(url: str, model: str, api_key: str, api: str = "chat", timeout_s: float = 90.0) -> float:
    """Wait until ``url`` (speaking ``api``) answers one small request within 0.5 s (a proxy still draining the
    backlog of a saturating cell would otherwise charge it to the next cell). Returns the seconds waited."""
    import httpx

    from bench.loadgen import api_body

    body = api_body(api, {"model": model, "messages": [{"role": "user", "content": "What is a contract?"}],
                          "max_tokens": 4}, stream=False)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        start = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(url, json=body, timeout=10, headers={"Authorization": f"Bearer {api_key}"})
            if r.status_code == 200 and time.monotonic() - start < 0.5:
                return round(time.monotonic() - t0, 1)
        time.sleep(1.0)
    return round(time.monotonic() - t0, 1)


def run_loadgen(url: str, bodies: Path, rate: float, opts: argparse.Namespace, stream: bool,
                model: str, api: str = "chat") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--bodies", str(bodies), "--rate", str(rate),
           "--duration", str(opts.duration), "--warmup", str(opts.warmup), "--model", model,
           "--timeout", str(opts.request_timeout), "--api-key", opts.api_key, "--api", api]
    if stream:
        cmd.append("--stream")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=opts.warmup + opts.duration + opts.request_timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="switchyard bench gateway", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short cells (2 s + 0.5 s warm-up): a smoke run")
    p.add_argument("--rates", default="100,500", help="comma-separated requests/s (default 100,500)")
    p.add_argument("--modes", default="nonstream,stream", help="nonstream,stream")
    p.add_argument("--apis", default="chat,responses,messages",
                   help="switchyard endpoints measured: chat, responses, messages (default all three)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (default 2)")
    p.add_argument("--num-tokens", type=int, default=16, help="tokens the fake upstream answers with")
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--guard", "--guard-artifact", dest="guard_artifact",
                   help="guard artifact folder (default: train a small widemlp one at start)")
    p.add_argument("--router", "--router-artifact", dest="router_artifact",
                   help="router artifact folder (default: train a small tfidf_ridge one at start)")
    p.add_argument("--prompts", help="comma-separated JSONL files of prompts (rows with text, prompt or messages)")
    p.add_argument("--num-prompts", type=int, default=2000, help="prompts drawn from --prompts (seed 0)")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (config workers)")
    p.add_argument("--no-batching", action="store_true", help="classifiers.batching false (one at a time, on the loop)")
    p.add_argument("--knee-ms", type=float, default=10.0, help="the knee: highest rate with overhead p99 <= this")
    p.add_argument("--no-routing", action="store_true", help="no guard / router (pure proxy path)")
    p.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer")
    p.add_argument("--litellm-venv", default=str(DEFAULT_LITELLM_VENV))
    p.add_argument("--keep-logs", help="copy the process logs into this folder")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    opts = p.parse_args(argv)
    opts.rates = [float(r) for r in opts.rates.split(",") if r.strip()]
    opts.modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    bad = [m for m in opts.modes if m not in ("nonstream", "stream")]
    if bad or not opts.modes:
        raise ValueError(f"--modes: unknown {bad}; valid: nonstream, stream")
    opts.apis = [a.strip() for a in opts.apis.split(",") if a.strip()]
    bad = [a for a in opts.apis if a not in API_PATHS]
    if bad or not opts.apis:
        raise ValueError(f"--apis: unknown {bad}; valid: {', '.join(API_PATHS)}")
    if not opts.rates or any(r <= 0 for r in opts.rates):
        raise ValueError("--rates must be positive numbers")
    opts.api_key = "sk-bench-" + secrets.token_hex(16)  # LiteLLM's master key; the others ignore it
    opts.duration = opts.duration or (2.0 if opts.quick else 10.0)
    opts.warmup = opts.warmup if opts.warmup is not None else (0.5 if opts.quick else 2.0)
    return opts


@contextlib.contextmanager
def processes(prefix: str, keep_logs: str | None = None) -> Iterator[tuple[Path, Procs]]:
    """A scratch folder and the benchmark's processes; every process is stopped (and the logs copied to
    ``keep_logs``) however the benchmark ends."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        procs = Procs(work)
        try:
            yield work, procs
        finally:
            procs.stop()
            if keep_logs:
                shutil.copytree(work, keep_logs, dirs_exist_ok=True)


def main(args: argparse.Namespace) -> int:
    opts = parse_args(list(getattr(args, "bench_args", None) or []))
    with processes("switchyard-bench-gw-", opts.keep_logs) as (work, procs):
        report = _run(opts, work, procs)
    _print(report, opts)
    return 0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(opts: argparse.Namespace, work: Path, procs: Procs) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    up_port, gw_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    proc = procs.start("upstream", [sys.executable, "-m", "bench.fake_upstream", "--port", str(up_port),
                                    "--num-tokens", str(opts.num_tokens), "--model", MODEL])
    wait_http(f"{upstream}/models", proc, 30)

    guard, router = opts.guard_artifact, opts.router_artifact
    routing_note = f"guard {guard or 'none'}, router {router or 'none'} (given)"
    if opts.no_routing:
        guard = router = None
        routing_note = "routing off (--no-routing)"
    elif guard is None and router is None:
        say("training a guard and a router on synthetic data...")
        guard, router, routing_note = train_artifacts(work / "artifacts", work / "train.log")
    config = work / "gateway.yaml"
    import yaml

    config.write_text(yaml.safe_dump(gateway_config(upstream, guard, router, opts.workers, not opts.no_batching),
                                     sort_keys=False))
    proc = procs.start("gateway", [sys.executable, "-m", "gateway", "--config", str(config), "--port", str(gw_port)])
    try:
        wait_http(f"http://127.0.0.1:{gw_port}/healthz", proc, 120)
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"gateway did not start: {e}\n{procs.log_tail('gateway')}") from None

    targets = {"direct": (f"{upstream}/chat/completions", MODEL, "chat")}
    targets.update({target_name(api): (f"http://127.0.0.1:{gw_port}{API_PATHS[api]}", "auto", api)
                    for api in opts.apis})
    litellm_note = "skipped (--no-litellm)"
    if not opts.no_litellm:
        exe = ensure_litellm(Path(opts.litellm_venv))
        ll_port = free_port()
        (work / "litellm.yaml").write_text(litellm_config(upstream))
        proc = procs.start("litellm", [str(exe), "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1",
                                       "--port", str(ll_port), "--num_workers", "1"],
                           env=_env(LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False", LITELLM_MASTER_KEY=opts.api_key))
        say("waiting for LiteLLM's proxy (first start takes ~20 s)...")
        try:
            wait_http(f"http://127.0.0.1:{ll_port}/health/liveliness", proc, 240)
            targets["litellm"] = (f"http://127.0.0.1:{ll_port}/v1/chat/completions", MODEL, "chat")
            litellm_note = f"{LITELLM_SPEC}, 1 worker"
        except (RuntimeError, TimeoutError) as e:
            litellm_note = f"failed to start: {e}"
            say(f"LiteLLM: {litellm_note}\n{procs.log_tail('litellm')}")

    if opts.prompts:
        chats = read_prompts(opts.prompts.split(","), opts.num_prompts)
        prompts_note = f"{len(chats)} prompts from {opts.prompts}"
    else:
        chats = [[{"role": "user", "content": text}] for text, _, _ in synthetic_prompts(256, seed=7)]
        prompts_note = "256 synthetic prompts"
    bodies = work / "bodies.jsonl"
    with bodies.open("w") as f:
        for messages in chats:
            f.write(json.dumps({"model": MODEL, "messages": messages, "max_tokens": opts.num_tokens,
                                "temperature": 0}) + "\n")
    first = {"model": "auto", "messages": chats[0], "max_tokens": 4}
    headers = {name: probe(url, dict(first, model=model), opts.api_key, api)
               for name, (url, model, api) in targets.items()}

    cells = []
    for mode in opts.modes:
        for rate in opts.rates:
            cell: dict[str, Any] = {"mode": mode, "rate": rate}
            for name, (url, model, api) in targets.items():
                waited = max(settle(u, m, opts.api_key, a) for u, m, a in targets.values())
                say(f"{mode} @ {rate:g} rps → {name}" + (f" (waited {waited:g} s for every target to drain)"
                                                         if waited >= 1 else ""))
                server = procs.procs["upstream" if name == "direct" else
                                     ("gateway" if name.startswith("switchyard") else name)]
                cpu0 = group_cpu_s(server.pid)
                cell[name] = run_loadgen(url, bodies, rate, opts, mode == "stream", model, api)
                cell[name]["settle_wait_s"] = waited
                num_done = cell[name]["num_ok"] + cell[name]["num_errors"]
                cpu = group_cpu_s(server.pid) - cpu0  # includes warm-up requests: divide by all sent
                num_all = num_done + int(opts.warmup * rate)
                cell[name]["server_cpu_ms_per_request"] = round(cpu * 1e3 / max(num_all, 1), 3)
            for name in targets:
                if name != "direct":
                    cell[f"{name}_overhead"] = _overhead(cell[name], cell["direct"])
            cells.append(cell)
    knees = {mode: {name: knee(cells, mode, name, opts.knee_ms) for name in targets if name != "direct"}
             for mode in opts.modes}
    return {"bench": "gateway", "cells": cells, "routing": routing_note, "litellm": litellm_note,
            "prompts": prompts_note, "workers": opts.workers, "batching": not opts.no_batching,
            "knee_ms": opts.knee_ms, "knees": knees, "load_avg_start": load_start,
            "probe_headers": headers.get(target_name(opts.apis[0]), {}), "apis": opts.apis, "duration_s": opts.duration, "warmup_s": opts.warmup,
            "num_tokens": opts.num_tokens, "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}


def target_name(api: str) -> str:
    """The report's name for switchyard's ``api`` endpoint: ``switchyard`` (chat), ``switchyard_responses``, ..."""
    return "switchyard" if api == "chat" else f"switchyard_{api}"


def _overhead(target: dict[str, Any], direct: dict[str, Any]) -> dict[str, float | None]:
    out = {}
    for key in ("latency_ms_p50", "latency_ms_p99", "ttfb_ms_p50", "ttfb_ms_p99"):
        a, b = target.get(key), direct.get(key)
        out[key.replace("latency_ms", "ms").replace("ttfb_ms", "ttfb_ms")] = (
            None if a is None or b is None else round(a - b, 3))
    return out


def _fmt(x: float | None, width: int = 9) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}.2f}"


def _print(report: dict[str, Any], opts: argparse.Namespace) -> None:
    print(f"gateway overhead = latency through the proxy − direct upstream latency (ms); open-loop load, "
          f"{report['duration_s']:g} s per cell after {report['warmup_s']:g} s warm-up; fake upstream answers "
          f"{report['num_tokens']} tokens; routing: {report['routing']}; {report['prompts']}; gateway workers "
          f"{report['workers']}, classifier batching {'on' if report['batching'] else 'off'}; LiteLLM: "
          f"{report['litellm']}; load avg {report['load_avg_start']:.1f} at start, {report['load_avg_1m']:.1f} at "
          f"end, on {report['cpu_count']} cores")
    print(f"switchyard headers on a probe: {report['probe_headers']}")
    has_ll = any("litellm" in c for c in report["cells"])
    cols = ["api", "mode", "rps", "direct p50", "direct p99", "ours p50", "ours p99", "hdr p50", "ours cpu"]
    if has_ll:
        cols += ["LiteLLM p50", "LiteLLM p99", "p99 ratio", "LiteLLM cpu"]
    cols += ["errors"]
    print("  ".join(f"{c:>11}" for c in cols))
    for c in report["cells"]:
        for api in report.get("apis", ["chat"]):
            name = target_name(api)
            d, ours, o = c["direct"], c[name], c[f"{name}_overhead"]
            row = [f"{api:>11}", f"{c['mode']:>11}", f"{c['rate']:>11g}", _fmt(d["latency_ms_p50"], 11),
                   _fmt(d["latency_ms_p99"], 11), _fmt(o["ms_p50"], 11), _fmt(o["ms_p99"], 11),
                   _fmt(ours["reported_overhead_ms_p50"], 11), _fmt(ours.get("server_cpu_ms_per_request"), 11)]
            errors = f"{ours['num_errors']}"
            if has_ll and api == "chat" and "litellm" in c:
                lo = c["litellm_overhead"]
                ratio = None
                if lo["ms_p99"] is not None and o["ms_p99"] is not None:
                    ratio = lo["ms_p99"] / max(o["ms_p99"], 0.01)
                    c["p99_overhead_ratio_litellm_over_ours"] = round(ratio, 2)
                row += [_fmt(lo["ms_p50"], 11), _fmt(lo["ms_p99"], 11), _fmt(ratio, 11),
                        _fmt(c["litellm"].get("server_cpu_ms_per_request"), 11)]
                errors += f"/{c['litellm']['num_errors']}"
            elif has_ll:
                row += [_fmt(None, 11)] * 4
            print("  ".join(row + [f"{errors:>11}"]))
    print("ours / LiteLLM = overhead over direct (ms); cpu = the proxy process's CPU ms per request (user+sys, "
          "load-independent: 1000/cpu ≈ requests/s one core sustains); hdr = the gateway's own x-switchyard-overhead-ms; "
          "p99 ratio = LiteLLM's p99 overhead / ours (higher = better for switchyard); errors = failed "
          "requests in the measured window (ours/LiteLLM); responses / messages rows: switchyard's /v1/responses and "
          "/v1/messages against the same direct chat latency (LiteLLM measured on chat only)")
    for mode, by_target in report["knees"].items():
        said = ", ".join(f"{name} {'none' if rate is None else f'{rate:g} rps'}" for name, rate in by_target.items())
        print(f"knee ({mode}: highest rate with overhead p99 <= {report['knee_ms']:g} ms, no errors): {said}")
    if opts.json:
        print(json.dumps(report))
