"""JSON-lines logs of requests: the decision log, and the traffic log through the same writer.

The decision log: one record per request, the latest kept in memory, and one JSON line each when
configured (``decision_log: {path: FILE | stdout, sample: 1.0}``).

Fields: ``ts`` (unix seconds), ``request_id`` (the ``x-request-id`` the client sent, or the one the gateway
made and echoed), ``key`` (the key's name, never the key), ``endpoint``, ``status``, ``route``, ``pool``,
``score``, ``threshold``, ``guard``, ``escalated``, ``num_examples``, ``prompt_tokens``,
``completion_tokens``, ``cost_usd``, ``latency_ms``, ``overhead_ms``. Requests that end before a decision
(401, 413, 400 on the body, 499 during upload) have the decision fields null; a request the pipeline
refused after its guard ran (e.g. 400 ``unsafe_content``) has ``route`` "error" and its ``guard`` verdict.
It never records prompts.

``recent`` holds the last ``keep`` records whatever ``path`` and ``sample`` say (the ``/ui`` dashboard reads
them; ``keep=0`` holds none); ``sample`` < 1 keeps that share of *lines*, drawn per request. Lines are written
as requests end; the file is appended to and flushed per line, so ``tail -f`` and log shippers see each one
at once.

The traffic log (``traffic_log``, opt-in per key or namespace) records the request text of sampled
``auto``-routed requests for ``switchyard label --from-log``; its lines are described in
``Pipeline._record_traffic``. It uses this writer with ``keep=0`` and a retention limit:

Retention (``max_bytes`` / ``max_age_s``, off unless given): the file ``path`` is rotated to ``path.1``
(replacing it) when it reaches half of ``max_bytes`` or its oldest line is half of ``max_age_s`` old, and
``path.1`` is deleted once its oldest line is ``max_age_s`` old. So the two files together never hold more
than ``max_bytes`` (plus one line), nor a line older than ``max_age_s`` — checked on every write and by
``enforce_retention()``, which the gateway also calls on a timer so that a quiet log expires too.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from gateway.decision import round_to

RECENT = 200  # records kept in memory for the dashboard


class DecisionLog:
    """Not thread-safe: the gateway writes from its event loop only."""

    def __init__(self, path: str | None, sample: float = 1.0, rng: random.Random | None = None,
                 keep: int = RECENT, *, max_bytes: int | None = None, max_age_s: float | None = None,
                 clock: Callable[[], float] = time.time, file_mode: int = 0o644) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError("decision_log.sample must be within [0, 1]")
        if keep < 0:
            raise ValueError("keep must be at least 0")
        if (max_bytes is not None or max_age_s is not None) and (path is None or path == "stdout"):
            raise ValueError("a log with a retention limit must be a file, not stdout")
        if max_bytes is not None and max_bytes < 2:
            raise ValueError(f"max_bytes must be at least 2, got {max_bytes}")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s}")
        self.path = path
        self.sample = sample
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.file_mode = file_mode  # of a file this log creates (the traffic log: 0o600, it holds prompts)
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)  # oldest first; appended on the event loop
        self._rng = rng or random.Random()
        self._clock = clock
        self._owned = path is not None and path != "stdout"
        self._file: TextIO | None = None
        if path is not None:
            self._file = sys.stdout if path == "stdout" else self._open()
        self._size = 0
        self._oldest: float | None = None  # ts of the first line in ``path``
        self._rotated_oldest: float | None = None  # ts of the first line in ``path.1``
        if self._limited:
            self._size = os.path.getsize(self.path)
            self._oldest = _first_ts(self.path)
            self._rotated_oldest = _first_ts(self.rotated_path)
            self.enforce_retention()

    @property
    def rotated_path(self) -> str:
        return f"{self.path}.1"

    @property
    def _limited(self) -> bool:
        return self._owned and (self.max_bytes is not None or self.max_age_s is not None)

    def _open(self) -> TextIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.file_mode)
        return open(fd, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, entry: dict[str, Any]) -> bool:
        """Keep ``entry`` (stamped with ``ts``) among the recent records; write its line when a path is set
        and the sample draws it. True when a line was written."""
        now = self._clock()
        record = {"ts": round_to(now, 1000), **entry}
        if self.recent.maxlen:
            self.recent.append(record)
        if self._file is None or (self.sample < 1.0 and self._rng.random() >= self.sample):
            return False
        line = json.dumps(record, separators=(",", ":")) + "\n"
        if self._limited:
            num_bytes = len(line.encode("utf-8"))
            self.enforce_retention(now, num_incoming_bytes=num_bytes)
            self._size += num_bytes
            if self._oldest is None:
                self._oldest = now
        self._file.write(line)
        return True

    def latest(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` most recent records, newest first (copies: callers may not change the log)."""
        out = []
        for record in reversed(self.recent):
            if len(out) >= n:
                break
            out.append(dict(record))
        return out

    def enforce_retention(self, now: float | None = None, num_incoming_bytes: int = 0) -> None:
        """Rotate ``path`` and delete ``path.1`` as the module docstring says. A no-op without limits."""
        if not self._limited:
            return
        now = self._clock() if now is None else now
        if (self._rotated_oldest is not None and self.max_age_s is not None
                and now - self._rotated_oldest >= self.max_age_s):
            _remove(self.rotated_path)
            self._rotated_oldest = None
        too_big = self.max_bytes is not None and self._size > 0 and self._size + num_incoming_bytes > self.max_bytes // 2
        too_old = (self.max_age_s is not None and self._oldest is not None
                   and now - self._oldest >= self.max_age_s / 2)
        if too_big or too_old:
            self._file.close()
            os.replace(self.path, self.rotated_path)
            self._rotated_oldest = self._oldest
            if self.max_age_s is not None and now - (self._rotated_oldest or now) >= self.max_age_s:
                _remove(self.rotated_path)  # a quiet log whose lines are all past retention
                self._rotated_oldest = None
            self._file = self._open()
            self._size, self._oldest = 0, None

    def close(self) -> None:
        if self._owned and self._file is not None:
            self._file.close()


def _first_ts(path: str) -> float | None:
    """``ts`` of the first line of ``path``; None when it has none. A first line without a readable ``ts``
    counts as written at the file's modification time (retention stays enforced)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except FileNotFoundError:
        return None
    if not first.strip():
        return None
    try:
        ts = json.loads(first).get("ts")
        if isinstance(ts, int | float):
            return float(ts)
    except (json.JSONDecodeError, AttributeError):
        pass
    return os.path.getmtime(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
