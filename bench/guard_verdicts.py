"""Guard verdicts of one artifact on JSONL files, for before/after equality checks of a refactoring.

    python -m bench.guard_verdicts --model DIR --out verdicts.json F1.jsonl F2.jsonl ...
    python -m bench.guard_verdicts --compare before.json after.json

The first form writes, per text, ``classify``'s label (``domain`` name, ``ood`` or ``unsafe``), its
confidence and id_percentile, and ``score_batch``'s label. The second prints one JSON line: how many
texts, how many labels differ (classify and score_batch), and the largest score difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def record(model: str, files: list[str], out: str) -> None:
    from routers.guard import Guard

    guard = Guard.load(model)
    texts = [json.loads(line)["text"] for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    rows = []
    for t in texts:
        v = guard.classify(t)
        rows.append({"label": v.domain or v.label, "confidence": v.confidence,
                     "id_percentile": v.scores.get("id_percentile")})
    for row, label in zip(rows, guard.score_batch(texts).labels, strict=True):
        row["batch_label"] = label
    Path(out).write_text(json.dumps(rows))
    print(json.dumps({"texts": len(rows), "out": out}))


def compare(before: str, after: str) -> int:
    a, b = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    if len(a) != len(b):
        print(json.dumps({"error": f"{len(a)} vs {len(b)} texts"}))
        return 1
    diff = sum(x["label"] != y["label"] for x, y in zip(a, b, strict=True))
    batch_diff = sum(x["batch_label"] != y["batch_label"] for x, y in zip(a, b, strict=True))
    conf = max((abs(x["confidence"] - y["confidence"]) for x, y in zip(a, b, strict=True)), default=0.0)
    print(json.dumps({"texts": len(a), "classify_labels_differ": diff, "score_batch_labels_differ": batch_diff,
                      "max_confidence_diff": conf}))
    return 1 if diff or batch_diff else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*")
    p.add_argument("--model")
    p.add_argument("--out")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not (args.model and args.out and args.files):
        p.error("--model, --out and at least one file are needed (or --compare BEFORE AFTER)")
    record(args.model, args.files, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
