"""The decision log: one record per request, the latest kept in memory, and one JSON line each when
configured (``decision_log: {path: FILE | stdout, sample: 1.0}``).

Fields: ``ts`` (unix seconds), ``request_id`` (the ``x-request-id`` the client sent, or the one the gateway
made and echoed), ``key`` (the key's name, never the key), ``endpoint``, ``status``, ``route``, ``pool``,
``score``, ``threshold``, ``guard``, ``escalated``, ``num_examples``, ``prompt_tokens``,
``completion_tokens``, ``cost_usd``, ``latency_ms``, ``overhead_ms``. Requests that end before a decision
(401, 413, 400 on the body, 499 during upload) have the decision fields null; a request the pipeline
refused after its guard ran (e.g. 400 ``unsafe_content``) has ``route`` "error" and its ``guard`` verdict.

``recent`` holds the last ``keep`` records whatever ``path`` and ``sample`` say (the ``/ui`` dashboard reads
them); ``sample`` < 1 keeps that share of *lines*, drawn per request. Lines are written as requests end; the
file is appended to and flushed per line, so ``tail -f`` and log shippers see each one at once.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import deque
from typing import Any, TextIO

RECENT = 200  # records kept in memory for the dashboard


class DecisionLog:
    def __init__(self, path: str | None, sample: float = 1.0, rng: random.Random | None = None,
                 keep: int = RECENT) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError("decision_log.sample must be within [0, 1]")
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.sample = sample
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)  # oldest first; appended on the event loop
        self._rng = rng or random.Random()
        self._file: TextIO | None = None
        if path is not None:
            self._file = sys.stdout if path == "stdout" else open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._owned = path is not None and path != "stdout"

    def write(self, entry: dict[str, Any]) -> None:
        """Keep ``entry`` (stamped with ``ts``) among the recent records; write its line when a path is set
        and the sample draws it."""
        record = {"ts": round(time.time(), 3), **entry}
        self.recent.append(record)
        if self._file is None or (self.sample < 1.0 and self._rng.random() >= self.sample):
            return
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def latest(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` most recent records, newest first (copies: callers may not change the log)."""
        out = []
        for record in reversed(self.recent):
            if len(out) >= n:
                break
            out.append(dict(record))
        return out

    def close(self) -> None:
        if self._owned and self._file is not None:
            self._file.close()
