"""The Backend protocol: where tokens come from.

A Backend turns one ``GenerationRequest`` into an async stream of ``Delta``s. The embedded engine
(``backends/local.py``) and any OpenAI-compatible server (``backends/openai_upstream.py``) implement it;
``backends/pool.py`` balances requests over replicas of them.

Contract of ``generate``:
  * yields zero or more Deltas per choice index; the last Delta of each choice has ``finish_reason`` set
    (``"stop"`` | ``"length"`` | ``"tool_calls"`` | ``"content_filter"`` | ``"abort"``) and exactly once;
  * the final Delta of the request (``is_final=True``) carries ``usage``;
  * raises ``BackendError`` *before the first Delta* for failures another replica may retry
    (``retryable=True``: connect error, 5xx, timeout) or that the caller must see (``retryable=False``:
    a 4xx such as context too long); after a Delta was yielded it raises ``BackendError`` with
    ``after_first_token=True`` — the caller ends the stream with an error event, never silently;
  * cancellation (``aclose()`` / task cancel, e.g. client disconnect) aborts the request and frees its
    resources at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import orjson

# The boundary types live in backends/types.py; re-exported for the modules that import them from here.
from backends.types import (  # noqa: F401
    Delta,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    Usage,
)


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the wire encoding of the gateway and its upstream clients (orjson: ~5x the
    stdlib's speed on response chunks; non-finite floats become ``null``, where the stdlib would write
    ``NaN``, which is not JSON). What orjson refuses (integers beyond 64 bits) goes through the stdlib,
    ASCII-escaped so lone surrogates survive too."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


class BackendError(Exception):
    """A backend failure. ``retryable`` tells the pool whether another replica may try."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status_code: int = 502,
        code: str | None = None,
        after_first_token: bool = False,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault (a 4xx's OpenAI ``param``)
        self.message = message
        self.retryable = retryable
        self.status_code = status_code
        self.code = code
        self.after_first_token = after_first_token


@runtime_checkable
class Backend(Protocol):
    """One replica: an in-process engine or one remote server."""

    name: str  # replica id, e.g. "slm/0" or "http://10.0.0.5:8000/v1"

    async def load(self) -> None:
        """Get ready to serve (load weights / open connections). Idempotent."""

    async def close(self) -> None:
        """Release everything; in-flight requests end with finish_reason 'abort'."""

    async def health(self) -> bool:
        """True when the replica can take requests now."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer; see the module docstring for the contract."""

    def num_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """Prompt length in tokens if cheaply known (local: exact after templating), else None."""
