"""The decision log: one JSON line per request (``decision_log: {path: FILE | stdout, sample: 1.0}``).

Fields: ``ts`` (unix seconds), ``request_id`` (the ``x-request-id`` the client sent, or the one the gateway
made and echoed), ``key`` (the key's name, never the key), ``endpoint``, ``status``, ``route``, ``pool``,
``score``, ``threshold``, ``guard``, ``escalated``, ``num_examples``, ``prompt_tokens``,
``completion_tokens``, ``cost_usd``, ``latency_ms``, ``overhead_ms``. Requests that end before a decision
(401, 413, 400 on the body, 499 during upload) have the decision fields null. ``sample`` < 1 keeps that
share of lines, drawn per request. Lines are written as requests end; the file is appended to and flushed
per line, so ``tail -f`` and log shippers see each one at once.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any, TextIO


class DecisionLog:
    def __init__(self, path: str, sample: float = 1.0, rng: random.Random | None = None) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError("decision_log.sample must be within [0, 1]")
        self.sample = sample
        self._rng = rng or random.Random()
        self._file: TextIO = sys.stdout if path == "stdout" else open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._owned = path != "stdout"

    def write(self, entry: dict[str, Any]) -> None:
        if self.sample < 1.0 and self._rng.random() >= self.sample:
            return
        self._file.write(json.dumps({"ts": round(time.time(), 3), **entry}, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._owned:
            self._file.close()
