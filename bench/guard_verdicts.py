"""Guard verdicts of one artifact on JSONL files, for before/after equality checks of a refactoring.

    python -m bench.guard_verdicts --model DIR --out verdicts.json [--batched] F1.jsonl F2.jsonl ...
    python -m bench.guard_verdicts --compare before.json after.json

The first form writes, per text, ``classify``'s label (``domain`` name, ``ood`` or ``unsafe``), its
confidence, id_percentile and whether it exited early, and ``score_batch``'s label; with ``--batched`` the
verdicts come from ``classify_batch`` over the texts shuffled and cut into batches of 1 to 32 (as the
gateway's batcher forms them), recorded in file order. The second prints one JSON line: how many texts,
how many labels differ (classify and score_batch), and the largest score differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def record(model: str, files: list[str], out: str, batched: bool = False) -> None:
    from routers.guard import Guard

    guard = Guard.load(model)
    texts = [json.loads(line)["text"] for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    verdicts = batched_verdicts(guard, texts) if batched else [guard.classify(t) for t in texts]
    rows = [{"label": v.domain or v.label, "confidence": v.confidence, "id_percentile": v.scores.get("id_percentile"),
             "early_exit": bool(v.scores.get("early_exit"))} for v in verdicts]
    for row, label in zip(rows, guard.score_batch(texts).labels, strict=True):
        row["batch_label"] = label
    Path(out).write_text(json.dumps(rows))
    print(json.dumps({"texts": len(rows), "out": out}))


def batched_verdicts(guard, texts: list[str], max_batch: int = 32, seed: int = 0) -> list:
    """``classify_batch`` verdicts of ``texts`` (in their order) over shuffled batches of 1..max_batch."""
    import random

    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    out: list = [None] * len(texts)
    i = 0
    while i < len(order):
        part = order[i:i + rng.randint(1, max_batch)]
        for j, v in zip(part, guard.classify_batch([texts[j] for j in part]), strict=True):
            out[j] = v
        i += len(part)
    return out


def compare(before: str, after: str) -> int:
    a, b = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    if len(a) != len(b):
        print(json.dumps({"error": f"{len(a)} vs {len(b)} texts"}))
        return 1
    diff = sum(x["label"] != y["label"] for x, y in zip(a, b, strict=True))
    batch_diff = sum(x["batch_label"] != y["batch_label"] for x, y in zip(a, b, strict=True))
    conf = max((abs(x["confidence"] - y["confidence"]) for x, y in zip(a, b, strict=True)), default=0.0)
    pct = max((abs((x["id_percentile"] or 0.0) - (y["id_percentile"] or 0.0)) for x, y in zip(a, b, strict=True)),
              default=0.0)
    exits = sum(x.get("early_exit") != y.get("early_exit") for x, y in zip(a, b, strict=True) if "early_exit" in x)
    print(json.dumps({"texts": len(a), "classify_labels_differ": diff, "score_batch_labels_differ": batch_diff,
                      "early_exits_differ": exits, "max_confidence_diff": conf, "max_id_percentile_diff": pct}))
    return 1 if diff or batch_diff else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*")
    p.add_argument("--model")
    p.add_argument("--out")
    p.add_argument("--batched", action="store_true", help="verdicts from classify_batch (batches of 1-32)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not (args.model and args.out and args.files):
        p.error("--model, --out and at least one file are needed (or --compare BEFORE AFTER)")
    record(args.model, args.files, args.out, args.batched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
