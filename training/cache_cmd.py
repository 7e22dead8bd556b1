"""Handlers for `switchyard cache stats|export|import|clear|replay` (argparse lives in training/cli.py).

All of them talk to the Redis example store (``--redis-url``, else the config's ``example_cache.redis_url``
or ``redis_url``): the in-memory store lives inside one gateway process and has nothing to administer.

``replay`` re-scores stored examples and drops harmful ones:
  * ``--method judge``: the LLM reads (request, answer) and is asked "Is the answer correct? Yes/No";
    score = P(Yes) / (P(Yes) + P(No)) from its next-token distribution; dropped below ``--min-score``
    (default 0.5).
  * ``--method neighbours``: for each example, its held-out neighbours (other examples of the namespace
    with cosine >= ``min_similarity``, at most 3) are answered by the SLM with and without the example in
    context; score = mean gain in the SLM's log-likelihood per token of the neighbour's stored LLM answer
    (teacher forced, no sampling). Dropped below ``--min-score`` (default 0.0: the example hurts).
    Examples without neighbours are not scored and kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gateway.example_cache import Entry, utility
from gateway.example_cache.store_redis import RedisExampleStore


def _store(args: argparse.Namespace) -> RedisExampleStore:
    from gateway.settings import load_settings
    from training.cli import CLIError

    settings = load_settings(args.config)
    url = args.redis_url or settings.example_cache.redis_url or settings.redis_url
    if not url:
        raise CLIError("no Redis to talk to: pass --redis-url or a --config with redis_url "
                       "(the in-memory example store lives inside the gateway process)")
    return RedisExampleStore(url, settings.example_cache)


async def _namespaces(store: RedisExampleStore, namespace: str | None) -> list[str]:
    return [namespace] if namespace else await store.namespaces()


# ---------------------------------------------------------------------------------- stats


def namespace_stats(entries: list[Entry], now: float) -> dict[str, Any]:
    if not entries:
        return {"num_entries": 0}
    utilities = [utility(e.kept, e.escalated) for e in entries]
    return {
        "num_entries": len(entries),
        "uses": sum(e.uses for e in entries),
        "kept": sum(e.kept for e in entries),
        "escalated": sum(e.escalated for e in entries),
        "mean_utility": round(float(np.mean(utilities)), 4),
        "num_never_used": sum(1 for e in entries if e.uses == 0),
        "oldest_age_s": round(now - min(e.created_at for e in entries), 1),
        "models": sorted({e.model for e in entries}),
    }


def stats_cmd(args: argparse.Namespace) -> int:
    import time

    async def run() -> dict[str, Any]:
        store = _store(args)
        try:
            out = {}
            for ns in await _namespaces(store, args.namespace):
                out[ns] = namespace_stats(await store.entries(ns), time.time())
            return out
        finally:
            await store.close()

    result = asyncio.run(run())
    if getattr(args, "json", False):
        print(json.dumps({"namespaces": result}))
        return 0
    if not result:
        print("no namespaces")
    for ns, s in result.items():
        if not s["num_entries"]:
            print(f"{ns}: empty")
            continue
        print(f"{ns}: {s['num_entries']} entries, {s['uses']} uses, {s['kept']} kept, {s['escalated']} escalated, "
              f"mean utility {s['mean_utility']:.3f}, {s['num_never_used']} never used, models {s['models']}")
    return 0


# ------------------------------------------------------------------------- export / import


def export_cmd(args: argparse.Namespace) -> int:
    async def run(out) -> int:
        store = _store(args)
        try:
            n = 0
            for ns in await _namespaces(store, args.namespace):
                for entry in await store.entries(ns):
                    out.write(json.dumps(entry.to_json()) + "\n")
                    n += 1
            return n
        finally:
            await store.close()

    if args.file == "-":
        n = asyncio.run(run(sys.stdout))
    else:
        with open(args.file, "w") as f:
            n = asyncio.run(run(f))
    print(f"exported {n} entries", file=sys.stderr)
    return 0


def read_entries(path: str, namespace: str | None) -> list[Entry]:
    """JSONL → entries; ``namespace`` overrides the rows'. Raises ValueError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    entries = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = Entry.from_json(json.loads(line))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        entry.namespace = namespace or entry.namespace
        if not entry.namespace:
            raise ValueError(f"{path}:{lineno}: no namespace in the row; pass --namespace")
        entries.append(entry)
    return entries


def import_cmd(args: argparse.Namespace) -> int:
    entries = read_entries(args.file, args.namespace)

    async def run() -> None:
        store = _store(args)
        try:
            if all(e.embedding is not None for e in entries):
                await store.put_many(entries)  # pipelined
            else:
                for entry in _progress(entries, "import"):
                    await store.put(entry)
        finally:
            await store.close()

    asyncio.run(run())
    print(f"imported {len(entries)} entries")
    return 0


def clear_cmd(args: argparse.Namespace) -> int:
    from training.cli import CLIError

    if not args.namespace:
        raise CLIError("clear needs --namespace")

    async def run() -> int:
        store = _store(args)
        try:
            return await store.clear(args.namespace)
        finally:
            await store.close()

    print(f"cleared {asyncio.run(run())} entries from {args.namespace!r}")
    return 0


# --------------------------------------------------------------------------------- replay


def _progress(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="ex", file=sys.stderr, disable=None, leave=False)


class Scorer:
    """Teacher-forced scoring with an HF causal LM (offline; replay is not on the request path)."""

    def __init__(self, model: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from backends.models import prepare

        path = prepare(model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self._torch = torch

    def _chat_prefix(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = "".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n{m['content']}"
                        "<end_of_turn>\n" for m in messages)
        return turns + "<start_of_turn>model\n"

    def answer_logprob(self, messages: list[dict[str, str]], answer: str) -> float:
        """Mean log-probability per token of ``answer`` as the next assistant turn."""
        prefix = self.tokenizer(self._chat_prefix(messages), add_special_tokens=False)["input_ids"]
        target = self.tokenizer(answer, add_special_tokens=False)["input_ids"][:128]
        if not target:
            return 0.0
        ids = self._torch.tensor([prefix + target])
        with self._torch.no_grad():
            logits = self.model(ids).logits[0, len(prefix) - 1 : -1].float()
        logp = self._torch.log_softmax(logits, -1).gather(1, self._torch.tensor(target)[:, None])
        return float(logp.mean())

    def judge(self, request_text: str, answer: str) -> float:
        """P(Yes) / (P(Yes) + P(No)) for "is this answer correct and helpful?"."""
        prompt = ("You are grading answers.\n\nQuestion: " + request_text.strip() + "\n\nAnswer: " + answer.strip()
                  + "\n\nIs the answer correct and helpful? Reply Yes or No.\nVerdict:")
        ids = self.tokenizer(prompt)["input_ids"]
        yes = self.tokenizer(" Yes", add_special_tokens=False)["input_ids"][0]
        no = self.tokenizer(" No", add_special_tokens=False)["input_ids"][0]
        with self._torch.no_grad():
            logits = self.model(self._torch.tensor([ids])).logits[0, -1].float()
        pair = self._torch.softmax(logits[[yes, no]], -1)
        return float(pair[0])


def score_by_neighbours(entries: list[Entry], scorer: Scorer, min_similarity: float,
                        max_neighbours: int = 3, progress: Callable = lambda xs, desc: xs) -> dict[str, float]:
    """id → mean per-token log-likelihood gain the example gives the SLM on its held-out neighbours."""
    usable = [e for e in entries if e.embedding is not None]
    if len(usable) < 2:
        return {}
    mat = np.stack([e.embedding for e in usable]).astype(np.float32)
    sims = mat @ mat.T
    np.fill_diagonal(sims, -np.inf)
    baseline: dict[str, float] = {}
    scores: dict[str, float] = {}
    for i in progress(range(len(usable)), "replay"):
        order = [j for j in np.argsort(-sims[i])[:max_neighbours] if sims[i, j] >= min_similarity]
        if not order:
            continue
        ex = usable[i]
        shots = [{"role": "user", "content": ex.request_text}, {"role": "assistant", "content": ex.answer}]
        gains = []
        for j in order:
            nb = usable[j]
            if nb.id not in baseline:
                baseline[nb.id] = scorer.answer_logprob([{"role": "user", "content": nb.request_text}], nb.answer)
            with_ex = scorer.answer_logprob([*shots, {"role": "user", "content": nb.request_text}], nb.answer)
            gains.append(with_ex - baseline[nb.id])
        scores[ex.id] = float(np.mean(gains))
    return scores


def replay_cmd(args: argparse.Namespace) -> int:
    from training.cli import CLIError

    method = getattr(args, "method", "judge")
    min_score = args.min_score if getattr(args, "min_score", None) is not None else (
        0.5 if method == "judge" else 0.0)

    store = _store(args)

    async def load() -> dict[str, list[Entry]]:
        try:
            out = {}
            for ns in await _namespaces(store, args.namespace):
                entries = await store.entries(ns)
                out[ns] = entries[: args.limit] if args.limit else entries
            return out
        finally:
            await store.close()

    by_ns = asyncio.run(load())
    if not any(by_ns.values()):
        raise CLIError("no examples to replay")
    scorer = Scorer(args.llm if method == "judge" else args.slm)
    report: dict[str, Any] = {"method": method, "min_score": min_score, "dry_run": bool(args.dry_run),
                              "namespaces": {}}
    for ns, entries in by_ns.items():
        if method == "judge":
            scores = {e.id: scorer.judge(e.request_text, e.answer) for e in _progress(entries, f"judge {ns}")}
        else:
            scores = score_by_neighbours(entries, scorer, store.settings.min_similarity, progress=_progress)
        drop = sorted(i for i, s in scores.items() if s < min_score)
        removed = 0
        if drop and not args.dry_run:
            store = _store(args)

            async def remove(ns=ns, drop=drop, store=store) -> int:
                try:
                    return await store.remove(ns, drop)
                finally:
                    await store.close()

            removed = asyncio.run(remove())
        report["namespaces"][ns] = {
            "num_entries": len(entries), "num_scored": len(scores), "num_below": len(drop), "num_removed": removed,
            "mean_score": round(float(np.mean(list(scores.values()))), 4) if scores else None,
            "drop_ids": drop,
        }
        verb = "would drop" if args.dry_run else "dropped"
        print(f"{ns}: scored {len(scores)}/{len(entries)} by {method}; {verb} {len(drop)} below {min_score}")
        for i in drop:
            text = next(e.request_text for e in entries if e.id == i)
            print(f"  {i}  score {scores[i]:.3f}  {text[:70]!r}")
    if getattr(args, "json", False):
        print(json.dumps(report))
    return 0
