"""`switchyard bench cache`: example-cache retrieval latency (and, with --quality, whether examples help).

Retrieval, per namespace size (default 10k and 100k examples, 384-dim unit vectors):
  * ``index``: ``VectorIndex.search`` (two-stage exact) vs a plain numpy full scan, p50/p99 ms, on the
    same vectors and queries (k = top_k, cutoff = min_similarity);
  * ``redis``: ``RedisExampleStore.lookup`` end to end against a real redis-server started here
    (stream catch-up + search + fetching the texts), the query embedding passed in, so excluded;
  * ``embed``: the MiniLM query embedding (``routers.embeddings.MiniLMEmbedder``, 1 thread) on its own.

Vectors: ``--embeddings FILE.npy`` (real MiniLM embeddings, [n, 384]) are resampled with small noise up
to each size, which keeps the real distribution's shape; without it, anisotropic clustered synthetic
vectors. Queries are perturbed stored vectors (hits) and fresh draws (mostly misses), half each.

``--quality``: SLM accuracy with retrieved LLM examples vs without, and the cascade's SLM share at equal
accuracy, on capital-city questions with the bundled models on the embedded engine (see ``run_quality``).
Prints a table; ``--json`` adds one JSON line.
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

from gateway.example_cache import Entry, RedisExampleStore
from gateway.example_cache.index import VectorIndex, single_threaded_blas
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
    p.add_argument("--only-quality", action="store_true", help="skip the retrieval part")
    p.add_argument("--slm", default="smollm2-135m")
    p.add_argument("--llm", default="gemma3-270m")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seen-fraction", type=float, default=0.6, help="share of countries the LLM answered before")
    p.add_argument("--llm-format", default="chat", choices=["chat", "completion"],
                   help="quality: prompt the LLM as the gateway does (chat turns) or as a base model (Q/A text)")
    p.add_argument("--num-countries", type=int, default=len(CAPITALS), help="quality: how many countries")
    p.add_argument("--num-templates", type=int, default=2, help="quality: test phrasings per country (1-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def cpu_percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"cpu_p50_ms": round(float(np.percentile(a, 50)), 3), "cpu_p99_ms": round(float(np.percentile(a, 99)), 3)}


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
    two_stage, full, exact_rows, num_hits, mismatches, cpu_two, cpu_full = [], [], [], 0, 0, [], []
    for q in queries[:10]:
        idx.search(q, k, min_sim)
    for q in queries:
        t, c = time.perf_counter(), time.thread_time()
        got = idx.search(q, k, min_sim)
        two_stage.append((time.perf_counter() - t) * 1000)
        cpu_two.append((time.thread_time() - c) * 1000)
        exact_rows.append(idx.num_exact_rows_last)
        t, c = time.perf_counter(), time.thread_time()
        with single_threaded_blas():  # the same BLAS setting: the comparison is the algorithm
            scores = vecs @ q
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top])]
        want = [str(i) for i in top if scores[i] >= min_sim]
        full.append((time.perf_counter() - t) * 1000)
        cpu_full.append((time.thread_time() - c) * 1000)
        num_hits += bool(got)
        mismatches += [g for g, _ in got] != want
    return {
        "n": len(vecs), "two_stage": {**percentiles(two_stage), **cpu_percentiles(cpu_two)},
        "full_scan": {**percentiles(full), **cpu_percentiles(cpu_full)},
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
    await reader.preload("bench", vecs.shape[1])
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
    from routers.embeddings import MiniLMEmbedder

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
    sizes = [] if opts.only_quality else [int(s) for s in opts.sizes.split(",") if s]
    for n in sizes:
        vecs = make_vectors(n, dim, rng, real)
        queries = make_queries(vecs, opts.queries, rng, real)
        row: dict[str, Any] = {"index": bench_index(vecs, queries, opts.top_k, opts.min_similarity)}
        if not opts.skip_redis:
            with redis_server() as url:
                row["redis"] = asyncio.run(bench_redis(url, vecs, queries, opts.top_k, opts.min_similarity))
        report["sizes"][str(n)] = row
        _print_row(n, row)
    if not opts.skip_embed and not opts.only_quality:
        report["embed"] = bench_embed(min(opts.queries, 200))
        e = report["embed"]
        print(f"query embedding (MiniLM, {e['backend']}, 1 thread): p50 {e['p50_ms']:.2f} ms  p99 {e['p99_ms']:.2f} ms")
    if opts.quality or opts.only_quality:
        report["quality"] = run_quality(opts)
    report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before/after: {report['load_avg_before']} / {report['load_avg_after']} "
          f"on {report['cpus']} CPUs (shared machine)")
    if opts.json:
        print(json.dumps(report))
    return 0


def _print_row(n: int, row: dict[str, Any]) -> None:
    i = row["index"]
    two, full = i["two_stage"], i["full_scan"]
    print(f"n={n:>7}  index two-stage p50 {two['p50_ms']:.2f} ms p99 {two['p99_ms']:.2f} ms"
          f" (CPU p50 {two['cpu_p50_ms']:.2f} p99 {two['cpu_p99_ms']:.2f})"
          f" | full scan p50 {full['p50_ms']:.2f} ms p99 {full['p99_ms']:.2f} ms"
          f" (CPU p50 {full['cpu_p50_ms']:.2f} p99 {full['cpu_p99_ms']:.2f})"
          f" | exact rows/query {i['mean_exact_rows']:.0f} | hit rate {i['hit_rate']:.2f}"
          f" | mismatches {i['result_mismatches']}")
    if "redis" in row:
        r = row["redis"]
        print(f"           redis lookup (no embedding) p50 {r['lookup']['p50_ms']:.2f} ms p99 {r['lookup']['p99_ms']:.2f} ms"
              f" | first-lookup index load {r['first_lookup_load_s']:.2f} s | bulk write {r['bulk_write_s']:.2f} s")


# ------------------------------------------------------------------------------------ quality
# A task with checkable answers: capital cities. The LLM answers one phrasing for the "seen" countries
# (its answers are admitted to the cache as traffic would admit them); the test set asks two other
# phrasings for seen and unseen countries. Seen = repeated traffic (IC-Cache's premise); unseen = the
# examples retrieved, if any, are about other countries and may mislead.

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia|Brasília"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Pakistan", "Islamabad"), ("India", "New Delhi|Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("South Korea", "Seoul"), ("Mongolia", "Ulaanbaatar"),
    ("Kazakhstan", "Astana"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota|Bogotá"), ("Venezuela", "Caracas"),
    ("Cuba", "Havana"), ("Mexico", "Mexico City"), ("Ireland", "Dublin"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Czech Republic", "Prague"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Ukraine", "Kyiv|Kiev"), ("New Zealand", "Wellington"),
    ("Saudi Arabia", "Riyadh"), ("Syria", "Damascus"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
    ("Sri Lanka", "Colombo|Sri Jayawardenepura Kotte"), ("Bangladesh", "Dhaka"), ("Myanmar", "Naypyidaw|Nay Pyi Taw"),
    ("Tanzania", "Dodoma"), ("Burkina Faso", "Ouagadougou"), ("Bolivia", "Sucre|La Paz"), ("Uruguay", "Montevideo"),
    ("Paraguay", "Asuncion|Asunción"), ("Ecuador", "Quito"), ("Iceland", "Reykjavik|Reykjavík"),
    ("Croatia", "Zagreb"), ("Serbia", "Belgrade"), ("Slovakia", "Bratislava"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Estonia", "Tallinn"), ("Malaysia", "Kuala Lumpur"),
]
SEEN_TEMPLATE = "What is the capital of {c}?"
TEST_TEMPLATES = ("Which city is the capital of {c}?", "Tell me the capital city of {c}.")


def _is_correct(answer: str, capital: str) -> bool:
    a = answer.lower()
    return any(name.lower() in a for name in capital.split("|"))


class _Chat:
    """One bundled model on the embedded engine (greedy), with the gateway's prompt formatting."""

    def __init__(self, name: str, max_tokens: int, completion: bool = False) -> None:
        from backends.engine.args import EngineArgs
        from backends.engine.llm_engine import LLMEngine
        from backends.engine.sampling_params import SamplingParams
        from backends.models import chat_template_override, resolve_model_path

        self.engine = LLMEngine(resolve_model_path(name),
                                EngineArgs(max_num_seqs=16, max_model_len=1024, kv_cache_memory_gb=0.25))
        self.template = chat_template_override(name)  # the gateway's format for this bundled model
        self.tokenizer = self.engine.tokenizer
        self.completion = completion
        self.is_plain = not getattr(self.tokenizer, "chat_template", None)
        stop_ids: tuple[int, ...] = ()
        if self.is_plain:
            eot = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
            stop_ids = (eot,) if isinstance(eot, int) and eot >= 0 else ()
        self.params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=("\n", "<end_of_turn>", "\nUser:"),
                                     stop_token_ids=stop_ids, logprobs=0)

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.completion:  # a base model's natural format: "Question: ...\nAnswer:"
            return self.tokenizer(f"Question: {messages[-1]['content']}\nAnswer:")["input_ids"]
        if self.is_plain:
            from backends.local import GEMMA_PLAIN, builtin_prompt

            return self.tokenizer(builtin_prompt(self.template or GEMMA_PLAIN, messages))["input_ids"]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, conversations: list[list[dict[str, str]]]) -> list[tuple[str, str | None, float]]:
        """(text, finish_reason, mean token logprob) per conversation."""
        results = self.engine.generate([self.ids(m) for m in conversations], self.params)
        out = []
        for r in results:
            o = r.outputs[0]
            lps = [lp.logprob for lp in o.logprobs] or [0.0]
            out.append((o.text.strip(), o.finish_reason, float(np.mean(lps))))
        return out


def _cascade(slm_ok: np.ndarray, conf: np.ndarray, llm_ok: np.ndarray) -> list[tuple[float, float]]:
    """(SLM share, accuracy) for every confidence threshold: answers below it go to the LLM."""
    points = [(0.0, float(llm_ok.mean()))]
    for t in sorted(set(conf.tolist())):
        keep = conf >= t
        points.append((float(keep.mean()), float(np.where(keep, slm_ok, llm_ok).mean())))
    return points


def _share_at(points: list[tuple[float, float]], target: float) -> float:
    """Largest SLM share whose accuracy reaches ``target`` (0.0 if none)."""
    return max((share for share, acc in points if acc >= target - 1e-9), default=0.0)


def run_quality(opts: argparse.Namespace) -> dict[str, Any]:
    from gateway.example_cache import InMemoryExampleStore, format_examples
    from routers.embeddings import MiniLMEmbedder

    rng = np.random.default_rng(opts.seed)
    capitals = [CAPITALS[i] for i in rng.permutation(len(CAPITALS))[: opts.num_countries]]
    num_seen = int(round(len(capitals) * opts.seen_fraction))
    seen = {c for c, _ in capitals[:num_seen]}
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    llm = _Chat(opts.llm, opts.max_tokens, completion=opts.llm_format == "completion")
    slm = _Chat(opts.slm, opts.max_tokens)
    progress("models loaded")
    embedder = MiniLMEmbedder(num_threads=1)
    settings = ExampleCacheSettings(top_k=opts.top_k, min_similarity=opts.min_similarity)
    store = InMemoryExampleStore(settings, embed=embedder.encode)

    train = [(c, cap) for c, cap in capitals if c in seen]
    train_answers = llm.answer([[{"role": "user", "content": SEEN_TEMPLATE.format(c=c)}] for c, _ in train])
    progress(f"LLM answered {len(train)} seen questions")

    async def fill() -> int:
        n = 0
        for (c, _), (text, finish, _) in zip(train, train_answers, strict=True):
            n += await store.admit("bench", SEEN_TEMPLATE.format(c=c), text, opts.llm, finish)
        return n

    num_admitted = asyncio.run(fill())
    tests = [(c, cap, tpl.format(c=c)) for c, cap in capitals for tpl in TEST_TEMPLATES[: opts.num_templates]]

    async def retrieve():
        return [await store.lookup("bench", q) for _, _, q in tests]

    retrieved = asyncio.run(retrieve())
    plain = [[{"role": "user", "content": q}] for _, _, q in tests]
    with_examples = [[*format_examples(ex), {"role": "user", "content": q}] for (_, _, q), ex in zip(tests, retrieved, strict=True)]
    progress(f"retrieved examples for {len(tests)} test questions")
    slm_plain = slm.answer(plain)
    progress("SLM answered without examples")
    slm_ex = slm.answer(with_examples)
    progress("SLM answered with examples")
    llm_test = llm.answer(plain)
    progress("LLM answered the test questions")

    def ok(answers) -> np.ndarray:
        return np.array([_is_correct(a[0], cap) for (_, cap, _), a in zip(tests, answers, strict=True)])

    is_seen = np.array([c in seen for c, _, _ in tests])
    llm_ok, slm_ok, slm_ex_ok = ok(llm_test), ok(slm_plain), ok(slm_ex)
    conf, conf_ex = np.array([a[2] for a in slm_plain]), np.array([a[2] for a in slm_ex])
    target = float(llm_ok.mean())
    curve, curve_ex = _cascade(slm_ok, conf, llm_ok), _cascade(slm_ex_ok, conf_ex, llm_ok)

    def acc(mask: np.ndarray, arr: np.ndarray) -> float:
        return round(float(arr[mask].mean()), 3) if mask.any() else float("nan")

    report = {
        "slm": opts.slm, "llm": opts.llm, "llm_format": opts.llm_format, "num_test": len(tests), "num_seen_countries": len(seen),
        "num_admitted": num_admitted, "num_llm_train_correct": int(sum(_is_correct(a[0], cap) for (_, cap), a in zip(train, train_answers, strict=True))),
        "hit_rate": {"seen": acc(is_seen, np.array([bool(r) for r in retrieved])),
                     "unseen": acc(~is_seen, np.array([bool(r) for r in retrieved]))},
        "accuracy": {
            "llm": {"all": acc(is_seen | ~is_seen, llm_ok), "seen": acc(is_seen, llm_ok), "unseen": acc(~is_seen, llm_ok)},
            "slm": {"all": acc(is_seen | ~is_seen, slm_ok), "seen": acc(is_seen, slm_ok), "unseen": acc(~is_seen, slm_ok)},
            "slm_with_examples": {"all": acc(is_seen | ~is_seen, slm_ex_ok), "seen": acc(is_seen, slm_ex_ok),
                                  "unseen": acc(~is_seen, slm_ex_ok)},
        },
        "cascade_target_accuracy": round(target, 3),
        "cascade_slm_share_at_target": {"without_examples": round(_share_at(curve, target), 3),
                                        "with_examples": round(_share_at(curve_ex, target), 3)},
        "cascade_slm_share_at_0.9_target": {"without_examples": round(_share_at(curve, 0.9 * target), 3),
                                            "with_examples": round(_share_at(curve_ex, 0.9 * target), 3)},
        "wall_s": round(time.perf_counter() - t0, 1),
        "samples": [{"q": q, "slm": a[0], "slm_with_examples": b[0], "llm": c[0], "num_examples": len(ex)}
                    for (_, _, q), a, b, c, ex in list(zip(tests, slm_plain, slm_ex, llm_test, retrieved, strict=True))[:6]],
    }
    a = report["accuracy"]
    print(f"quality ({len(tests)} capital-city questions, {len(seen)} countries seen by the LLM before; greedy):")
    for name in ("llm", "slm", "slm_with_examples"):
        print(f"  {name:<18} accuracy all {a[name]['all']:.3f}  seen {a[name]['seen']:.3f}  unseen {a[name]['unseen']:.3f}")
    print(f"  example hit rate: seen {report['hit_rate']['seen']:.2f}  unseen {report['hit_rate']['unseen']:.2f}"
          f"  ({num_admitted} LLM answers admitted)")
    s = report["cascade_slm_share_at_target"]
    print(f"  cascade on SLM confidence, SLM share at the LLM's accuracy ({target:.3f}): "
          f"without examples {s['without_examples']:.2f}, with examples {s['with_examples']:.2f}")
    return report


if __name__ == "__main__":
    raise SystemExit(main(argparse.Namespace(bench_args=sys.argv[1:])))

