"""Synthetic routing data where the right decision is known (shared by the router tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

HARD = ["integral", "eigenvalue", "theorem", "proof", "derivative", "topology", "lemma", "matrix"]
EASY = ["capital", "color", "animal", "weather", "greeting", "fruit", "holiday", "sport"]
FILLER = ["the", "a", "about", "please", "explain", "what", "is", "tell", "me", "quick", "question", "now",
          "today", "simple", "short", "my", "friend", "asked", "this", "again"] + [f"w{i}" for i in range(300)]


def synth_rows(n: int, seed: int = 0, noise: float = 0.1, source: str = "synth") -> list[dict]:
    """Prompts with a hard topic word need the strong model (gain 1); easy ones don't (gain 0)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hard = rng.random() < 0.4
        topic = rng.choice(HARD if hard else EASY)
        words = rng.choices(FILLER, k=rng.randint(4, 12)) + [topic] + rng.choices(FILLER, k=rng.randint(0, 6))
        strong, weak = (1, 0) if hard else (1, 1)
        if rng.random() < noise:
            weak = 1 - weak if hard else 0
        rows.append({"id": f"{source}-{i}", "source": source, "prompt": " ".join(words),
                     "strong_score": strong, "weak_score": weak})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
