"""The traffic loop on shared data, as a shift: a router that never saw a task learns it from the gateway's traffic.

``python -m bench.traffic_loop --data routing_bench.jsonl --init MMLU_ROUTER --source gsm8k --workdir DIR``

1. a real gateway process (``python -m gateway --config``; two remote pools on ``bench.fake_upstream``) serves
   with a copy of ``--init`` as its router and ``traffic_log`` on for the application's key;
2. the training-split prompts of ``--source`` in ``--data`` (by the file's own id rule, so the evaluation rows
   are never sent) go through it as ``auto`` traffic, one request each;
3. ``switchyard label --from-log`` labels the recorded prompts with ``--references --data``: the recorded
   outcomes of the strong and weak models stand in for running them (GPT-4 and Mixtral cannot run here; the
   gateway's pools are fakes);
4. ``switchyard train router --init --promote-if-better`` refits on the init router's rows + the labelled
   traffic and promotes in place only if it is no worse on the held-out traffic;
5. ``switchyard calibrate`` on the held-out traffic, then ``POST /admin/reload`` (admin key);
6. ``switchyard eval router --source`` on the evaluation split of ``--source`` (rows never sent) before and
   after, and on the init router's own sources (does the update forget them?).

Prints each step's command and a before/after table; ``--json`` adds one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
APP_KEY, ADMIN_KEY = "sk-traffic-app", "sk-traffic-admin"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.traffic_loop", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="routing rows with the shifted task (e.g. routing_bench.jsonl)")
    p.add_argument("--init", required=True, help="the serving router (trained without --source)")
    p.add_argument("--source", default="gsm8k", help="the task sent as traffic")
    p.add_argument("--workdir", required=True, help="where the gateway config, log, rows and artifacts go")
    p.add_argument("--strong-share", type=float, default=0.5, help="calibration target after the update")
    p.add_argument("--limit", type=int, help="send at most this many prompts")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def cli(argv: list[str]) -> tuple[int, str]:
    """Run ``switchyard ARGV`` in this process; (exit code, what it printed). The command is echoed."""
    from training.cli import main

    print("$ switchyard " + " ".join(argv), flush=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    out = buf.getvalue()
    print("  " + "\n  ".join(out.strip().splitlines()[:12]), flush=True)
    return code, out


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from gateway.settings import hash_api_key
    from training.data import is_eval_row, load_routing_rows

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    serving = work / "router"
    shutil.rmtree(serving, ignore_errors=True)
    shutil.copytree(args.init, serving)
    log = work / "traffic.jsonl"
    for f in (log, work / "traffic.jsonl.1"):
        f.unlink(missing_ok=True)

    rows = load_routing_rows(args.data, require="pairwise")
    pct = int(json.loads((serving / "manifest.json").read_text())["meta"]["training_data"]["split"]["eval_percent"])
    task = [r for r in rows if r.source == args.source]
    traffic = [r for r in task if not is_eval_row(r, pct)]
    held_prompts = {r.prompt.strip() for r in task if is_eval_row(r, pct)}
    traffic = [r for r in traffic if r.prompt.strip() not in held_prompts][: args.limit]
    print(f"{args.source}: {len(task)} rows; {len(traffic)} training-split prompts sent as traffic, "
          f"{len(task) - len(traffic)} held back (the evaluation split)", flush=True)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    upstream_port, port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.fake_upstream", "--port", str(upstream_port)],
                                env=env)
    pools = [{"name": name, "kind": "remote", "model": "fake-model",
              "urls": [f"http://127.0.0.1:{upstream_port}/v1"]} for name in ("slm", "llm")]
    config = {"pools": pools, "example_cache": {"enabled": False},
              "routing": {"router_artifact": str(serving), "cascade": {"mode": "off"}},
              "api_keys": [{"name": "app", "sha256": hash_api_key(APP_KEY)},
                           {"name": "ops", "sha256": hash_api_key(ADMIN_KEY), "admin": True}],
              "traffic_log": {"path": str(log), "keys": ["app"]}}
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    gateway_log = (work / "gateway.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(work / "config.yaml"),
                             "--port", str(port)], stdout=gateway_log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(upstream_port)
        wait_for_port(port)
        t0 = time.perf_counter()
        routes: dict[str, int] = {}
        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {APP_KEY}"}, timeout=60) as c:
            for r in traffic:
                resp = c.post("/v1/chat/completions", headers={"x-request-id": f"traffic-{r.row_id}"},
                              json={"model": "auto", "max_tokens": 8,
                                    "messages": [{"role": "user", "content": r.prompt}]})
                resp.raise_for_status()
                route = resp.headers["x-switchyard-route"]
                routes[route] = routes.get(route, 0) + 1
        num_logged = len(log.read_text().splitlines())
        print(f"sent {len(traffic)} auto requests in {time.perf_counter() - t0:.1f} s (routes {routes}); "
              f"{num_logged} lines in {log}", flush=True)

        labelled = work / "traffic_rows.jsonl"
        code, _ = cli(["label", "--from-log", str(log), "--references", args.data, "--out", str(labelled)])
        assert code == 0, "label failed"
        before = work / "router-before"
        shutil.rmtree(before, ignore_errors=True)
        shutil.copytree(serving, before)
        t1 = time.perf_counter()
        code, out = cli(["train", "router", "--init", str(serving), "--data", str(labelled), "--out", str(serving),
                         "--promote-if-better", "--json"])
        train_s = time.perf_counter() - t1
        update = last_json(out)
        if code == 0:
            cli(["calibrate", "--model", str(serving), "--data", str(labelled), "--strong-share",
                 str(args.strong_share)])
        reload = httpx.post(base + "/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
        print(f"POST /admin/reload → {reload.status_code} {json.dumps(reload.json()['serving']['router'])}",
              flush=True)

        init_sources = sorted(json.loads((before / "manifest.json").read_text())["meta"]["training_data"]["sources"])
        results: dict[str, dict[str, Any]] = {}
        for name, model in (("before", before), ("after", serving)):
            for source in [args.source, *init_sources]:
                _, out = cli(["eval", "router", "--model", str(model), "--data", args.data, "--source", source,
                              "--json"])
                entry = last_json(out)["sources"][source]
                results.setdefault(source, {})[name] = entry
        print()
        print(f"{'held-out rows':<16} {'n':>6} {'before APGR':>12} {'after APGR':>11} {'random':>7} {'oracle':>7} "
              f"{'CPT50 before':>13} {'CPT50 after':>12}")
        summary = {}
        for source, e in results.items():
            b, a = e["before"], e["after"]
            kind_b = next(k for k in b if k not in ("random", "oracle"))
            kind_a = next(k for k in a if k not in ("random", "oracle"))
            print(f"{source:<16} {b[kind_b]['n']:>6} {b[kind_b]['apgr']:>12.3f} {a[kind_a]['apgr']:>11.3f} "
                  f"{b['random']['apgr']:>7.3f} {b['oracle']['apgr']:>7.3f} {b[kind_b]['cpt50']:>13.1%} "
                  f"{a[kind_a]['cpt50']:>12.1%}")
            summary[source] = {"n": b[kind_b]["n"], "apgr_before": b[kind_b]["apgr"], "apgr_after": a[kind_a]["apgr"],
                               "cpt50_before": b[kind_b]["cpt50"], "cpt50_after": a[kind_a]["cpt50"],
                               "random": b["random"]["apgr"], "oracle": b["oracle"]["apgr"]}
        print(f"gate on {update['gate']['num_rows']} held-out traffic rows: {update['gate']['reason']}; "
              f"update fitted in {train_s:.0f} s")
        if args.json:
            print(json.dumps({"source": args.source, "num_traffic": len(traffic), "num_logged": num_logged,
                              "gate": update["gate"], "promoted": code == 0, "reload": reload.json(),
                              "results": summary}))
        return 0
    finally:
        for p in (proc, upstream):
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
            if p.poll() is None:
                p.kill()
        gateway_log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s:g} s")


if __name__ == "__main__":
    sys.exit(main())
