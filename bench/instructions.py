"""`switchyard bench instructions`: CPU instructions the gateway spends per request (valgrind callgrind).

Wall-clock overhead on a shared 2-core box moves with whatever else runs; the number of user-space
instructions the gateway process executes per request does not (it excludes the kernel's socket work, so it
measures what our code and its libraries cost). This is the figure used to compare gateway changes
(BENCHMARKS.md "Gateway"); ``switchyard bench gateway`` remains the latency benchmark.

What runs: the fake OpenAI upstream (``bench/fake_upstream.py``), and the gateway under
``valgrind --tool=callgrind`` with the same configuration as ``bench gateway`` (two remote pools on the
upstream; guard + router trained at start on the synthetic set, or the artifacts given). The load
generator first warms every mode up (6 s each: first-use imports, connections, an idle pool's first health
probe), then per mode callgrind's counters are zeroed, ``--requests`` requests go out at a low rate
(one at a time: no overlap), and the counters are dumped: instructions / requests. The same run measures the
pure proxy path (guard and router off) beside the routed one, so the price of routing is printed as a
difference measured the same way.

``switchyard bench instructions [--requests 100] [--modes nonstream,stream] [--guard-artifact DIR
--router-artifact DIR] [--json]``; needs ``valgrind`` (Debian package) on PATH; about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.gateway import (
    MODEL,
    ROOT,
    Procs,
    free_port,
    gateway_config,
    processes,
    synthetic_prompts,
    train_artifacts,
    wait_http,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="switchyard bench instructions", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100, help="measured requests per mode (default 100)")
    p.add_argument("--modes", default="nonstream,stream", help="nonstream,stream")
    p.add_argument("--num-tokens", type=int, default=16, help="tokens the fake upstream answers with")
    p.add_argument("--guard-artifact", help="guard artifact folder (default: train one at start)")
    p.add_argument("--router-artifact", help="router artifact folder (default: train one at start)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    opts = p.parse_args(argv)
    opts.modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    if not opts.modes or any(m not in ("nonstream", "stream") for m in opts.modes):
        raise ValueError(f"--modes: valid are nonstream, stream; got {opts.modes}")
    if opts.requests < 10:
        raise ValueError("--requests must be at least 10")
    return opts


def main(args: argparse.Namespace) -> int:
    opts = parse_args(list(args.bench_args or []))
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise ValueError(f"{tool} not found: install Debian's valgrind package (apt-get install valgrind)")
    with processes("switchyard-instr-") as (work, procs):
        report = _run(opts, work, procs)
    _print(report)
    if opts.json:
        print(json.dumps(report))
    return 0


def _load(url: str, bodies: Path, rate: float, seconds: float, stream: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--bodies", str(bodies), "--rate", str(rate),
           "--duration", str(seconds), "--warmup", "0", "--model", "auto", "--timeout", "60"]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(name: str, config: Path, opts: argparse.Namespace, work: Path, procs: Procs,
             bodies: Path) -> dict[str, int]:
    """Instructions per request for each mode, one gateway under callgrind."""
    port = free_port()
    out_file = work / f"{name}.callgrind"
    proc = procs.start(name, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", sys.executable,
                              "-m", "gateway", "--config", str(config), "--port", str(port)])
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, 600)  # ~40 s under callgrind
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rate = 10.0  # ~20-60 ms per request under callgrind: requests never overlap
    for mode in opts.modes:  # warm-up, past the first health probe of an idle pool: imports, connections
        _load(url, bodies, rate, 6.0, mode == "stream")
    result = {}
    for mode in opts.modes:
        stream = mode == "stream"
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
        done = _load(url, bodies, rate, opts.requests / rate, stream)
        for f in work.glob(f"{name}.callgrind.*"):
            f.unlink()
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
        total = _total_instructions(work, name)
        if done["num_errors"] or not done["num_ok"]:
            raise RuntimeError(f"{name}/{mode}: {done['num_errors']} failed requests")
        result[mode] = total // done["num_ok"]
    return result


def _total_instructions(work: Path, name: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for f in work.glob(f"{name}.callgrind.*"):
            for line in f.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        time.sleep(0.5)
    raise RuntimeError("callgrind wrote no dump")


def _run(opts: argparse.Namespace, work: Path, procs: Procs) -> dict[str, Any]:
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    proc = procs.start("upstream", [sys.executable, "-m", "bench.fake_upstream", "--port", str(up_port),
                                    "--num-tokens", str(opts.num_tokens), "--model", MODEL])
    wait_http(f"{upstream}/models", proc, 30)
    guard, router = opts.guard_artifact, opts.router_artifact
    if guard is None and router is None:
        guard, router, _ = train_artifacts(work / "artifacts", work / "train.log")
    bodies = work / "bodies.jsonl"
    with bodies.open("w") as f:
        for text, _, _ in synthetic_prompts(256, seed=7):
            f.write(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}],
                                "max_tokens": opts.num_tokens, "temperature": 0}) + "\n")
    report: dict[str, Any] = {"bench": "instructions", "requests": opts.requests, "num_tokens": opts.num_tokens}
    for name, g, r in (("proxy", None, None), ("routed", guard, router)):
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(gateway_config(upstream, g, r), sort_keys=False))
        report[name] = _measure(name, config, opts, work, procs, bodies)
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"user-space instructions per request in the gateway process (callgrind; {report['requests']} "
          f"sequential requests after a warm-up; fake upstream, {report['num_tokens']} tokens)")
    print(f"{'mode':>10} {'proxy only':>14} {'guard+router':>14} {'routing costs':>14}")
    for mode in report["proxy"]:
        proxy, routed = report["proxy"][mode], report["routed"][mode]
        print(f"{mode:>10} {proxy:>14,} {routed:>14,} {routed - proxy:>14,}")
