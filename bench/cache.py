"""`switchyard bench cache`: example-cache retrieval latency (and, with --quality, whether examples help).

Retrieval, per namespace size (default 10k and 100k examples, 384-dim unit vectors):
  * ``index``: ``VectorIndex.search`` (two-stage exact) vs a plain numpy full scan, p50/p99 ms, on the
    same vectors and queries (k = top_k, cutoff = min_similarity);
  * ``redis``: ``RedisExampleStore.lookup`` end to end against a real redis-server started here
    (stream catch-up + search + fetching the texts), the query embedding passed in, so excluded;
  * ``embed``: the MiniLM query embedding (``routers.features.MiniLMEmbedder``, 1 thread) on its own.

Vectors: ``--embeddings FILE.npy`` (real MiniLM embeddings, [n, 384]) are resampled with small noise up
to each size, which keeps the real distribution's shape; without it, anisotropic clustered synthetic
vectors. Queries are perturbed stored vectors (hits) and fresh draws (mostly misses), half each.

``--quality`` runs ``bench/cache_quality.py`` (see there). Prints a table; ``--json`` adds one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from gateway.example_cache import Entry, RedisExampleStore, VectorIndex, _single_threaded_blas
from gateway.settings import ExampleCacheSettings


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="switchyard bench cache", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated namespace sizes")
    p.add_argument("--queries", type=int, default=400, help="timed queries per size and part")
    p.add_argument("--embeddings", help=".npy of real MiniLM embeddings to resample from")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--min-similarity", type=float, default=0.75)
    p.add_argument("--skip-redis", action="store_true")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--quality", action="store_true", help="also run the SLM-with-examples quality benchmark")
    p.add_argument("--quality-args", default="", help="arguments passed to the quality benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3)}


def make_vectors(n: int, dim: int, rng: np.random.Generator, real: np.ndarray | None) -> np.ndarray:
    if real is not None:
        base = real[rng.integers(0, len(real), n)]
        v = base + rng.normal(scale=0.15 / np.sqrt(dim), size=(n, dim))
    else:
        centres = rng.normal(size=(max(50, n // 100), dim)) * np.geomspace(3.0, 0.05, dim)
        v = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.2, size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def make_queries(vecs: np.ndarray, num: int, rng: np.random.Generator, real: np.ndarray | None) -> np.ndarray:
    dim = vecs.shape[1]
    hits = vecs[rng.integers(0, len(vecs), num // 2)] + rng.normal(scale=0.5 / np.sqrt(dim), size=(num // 2, dim))
    fresh = make_vectors(num - num // 2, dim, rng, real)
    q = np.vstack([hits, fresh])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def bench_index(vecs: np.ndarray, queries: np.ndarray, k: int, min_sim: float) -> dict[str, Any]:
    idx = VectorIndex(vecs.shape[1], capacity=len(vecs))
    t0 = time.perf_counter()
    for i, v in enumerate(vecs):
        idx.add(str(i), v)
    build_s = time.perf_counter() - t0
    two_stage, full, exact_rows, num_hits, mismatches = [], [], [], 0, 0
    for q in queries[:10]:
        idx.search(q, k, min_sim)
    for q in queries:
        t = time.perf_counter()
        got = idx.search(q, k, min_sim)
        two_stage.append((time.perf_counter() - t) * 1000)
        exact_rows.append(idx.num_exact_rows_last)
        t = time.perf_counter()
        with _single_threaded_blas():  # the same BLAS setting: the comparison is the algorithm
            scores = vecs @ q
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top])]
        want = [str(i) for i in top if scores[i] >= min_sim]
        full.append((time.perf_counter() - t) * 1000)
        num_hits += bool(got)
        mismatches += [g for g, _ in got] != want
    return {
        "n": len(vecs), "two_stage": percentiles(two_stage), "full_scan": percentiles(full),
        "mean_exact_rows": round(float(np.mean(exact_rows)), 1), "hit_rate": round(num_hits / len(queries), 3),
        "result_mismatches": mismatches, "build_s": round(build_s, 2),
    }


@contextlib.contextmanager
def redis_server():
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


async def bench_redis(url: str, vecs: np.ndarray, queries: np.ndarray, k: int, min_sim: float) -> dict[str, Any]:
    settings = ExampleCacheSettings(top_k=k, min_similarity=min_sim, deadline_ms=1000,
                                    max_entries_per_namespace=max(len(vecs), 1))
    writer = RedisExampleStore(url, settings, embed=lambda texts: None)
    now = time.time()
    entries = [Entry(f"{i:012d}", "bench", f"request number {i} " + "lorem ipsum " * 8,
                     f"answer number {i} " + "dolor sit amet " * 10, "llm", now, embedding=v)
               for i, v in enumerate(vecs)]
    t0 = time.perf_counter()
    await writer.put_many(entries)
    write_s = time.perf_counter() - t0
    await writer.close()
    reader = RedisExampleStore(url, settings, embed=lambda texts: None)
    t0 = time.perf_counter()
    await reader.lookup("bench", "warm-up", embedding=queries[0])  # loads the namespace's index
    load_s = time.perf_counter() - t0
    for q in queries[:10]:
        await reader.lookup("bench", "q", embedding=q)
    ms = []
    for q in queries:
        t = time.perf_counter()
        await reader.lookup("bench", "q", embedding=q)
        ms.append((time.perf_counter() - t) * 1000)
    stats = dict(reader.stats)
    await reader.close()
    return {"n": len(vecs), "lookup": percentiles(ms), "bulk_write_s": round(write_s, 2),
            "first_lookup_load_s": round(load_s, 2), "hits": stats["hits"], "timeouts": stats["timeouts"]}


def bench_embed(num: int) -> dict[str, Any]:
    from routers.features import MiniLMEmbedder

    emb = MiniLMEmbedder(num_threads=1)
    texts = [f"How do I configure example number {i} of the gateway's cache for tenant {i % 7}?" for i in range(num)]
    emb.encode(texts[:5])
    ms = []
    for t in texts:
        t0 = time.perf_counter()
        emb.encode([t])
        ms.append((time.perf_counter() - t0) * 1000)
    return {"backend": emb.backend, **percentiles(ms)}


def main(args: argparse.Namespace) -> int:
    opts = parse(list(getattr(args, "bench_args", None) or []))
    rng = np.random.default_rng(opts.seed)
    real = np.load(opts.embeddings).astype(np.float32) if opts.embeddings else None
    dim = real.shape[1] if real is not None else 384
    report: dict[str, Any] = {"load_avg_before": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
                              "vectors": "real-resampled" if real is not None else "synthetic-clustered",
                              "k": opts.top_k, "min_similarity": opts.min_similarity, "sizes": {}}
    for n in [int(s) for s in opts.sizes.split(",") if s]:
        vecs = make_vectors(n, dim, rng, real)
        queries = make_queries(vecs, opts.queries, rng, real)
        row: dict[str, Any] = {"index": bench_index(vecs, queries, opts.top_k, opts.min_similarity)}
        if not opts.skip_redis:
            with redis_server() as url:
                row["redis"] = asyncio.run(bench_redis(url, vecs, queries, opts.top_k, opts.min_similarity))
        report["sizes"][str(n)] = row
        _print_row(n, row)
    if not opts.skip_embed:
        report["embed"] = bench_embed(min(opts.queries, 200))
        e = report["embed"]
        print(f"query embedding (MiniLM, {e['backend']}, 1 thread): p50 {e['p50_ms']:.2f} ms  p99 {e['p99_ms']:.2f} ms")
    if opts.quality:
        from bench.cache_quality import run as run_quality

        report["quality"] = run_quality(opts.quality_args.split())
    report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before/after: {report['load_avg_before']} / {report['load_avg_after']} "
          f"on {report['cpus']} CPUs (shared machine)")
    if opts.json:
        print(json.dumps(report))
    return 0


def _print_row(n: int, row: dict[str, Any]) -> None:
    i = row["index"]
    print(f"n={n:>7}  index two-stage p50 {i['two_stage']['p50_ms']:.2f} ms p99 {i['two_stage']['p99_ms']:.2f} ms"
          f" | full scan p50 {i['full_scan']['p50_ms']:.2f} ms p99 {i['full_scan']['p99_ms']:.2f} ms"
          f" | exact rows/query {i['mean_exact_rows']:.0f} | hit rate {i['hit_rate']:.2f}"
          f" | mismatches {i['result_mismatches']}")
    if "redis" in row:
        r = row["redis"]
        print(f"           redis lookup (no embedding) p50 {r['lookup']['p50_ms']:.2f} ms p99 {r['lookup']['p99_ms']:.2f} ms"
              f" | first-lookup index load {r['first_lookup_load_s']:.2f} s | bulk write {r['bulk_write_s']:.2f} s")


if __name__ == "__main__":
    raise SystemExit(main(argparse.Namespace(bench_args=sys.argv[1:])))

