"""Fakes and builders shared by gateway tests (real Pool, real uvicorn, real openai client).

``FakeBackend`` / ``FakeFactory`` / ``fake_settings`` / ``fake_app``: deterministic in-process backends,
their config and the gateway app over them; ``FakeGuard``: a guard without an artifact ("bomb" → unsafe);
``bow_embed`` / ``cache_settings``: an embedder and example-cache settings for the example-cache tests;
``wait_until`` / ``wait_until_async``: wait on a condition (never on a fixed time);
``fake_local_real_remote`` / ``remote_cloud_app``: fake replicas for local pools, the real OpenAIUpstream for
remote ones (in front of ``bench.fake_upstream``).

``FakeBackend`` answers ``"<alias>: echo <words of the last user turn> done."`` one word per Delta, so
answers are checkable and stream == non-stream by construction of the *gateway's* framing. Words in the
prompt steer it:
  * ``unsure``  → every token has log-prob -3 (the cascade escalates); otherwise -0.05;
  * ``slow``    → 200 tokens, 20 ms apart (disconnect / deadline tests);
  * ``explode`` → fails after the first token (BackendError after_first_token).
``tools`` in the request → one ``tool_calls`` Delta with finish_reason ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.base import BackendError, Delta, GenerationRequest, TokenLogprob, Usage


def _last_user(request: GenerationRequest) -> str:
    if request.messages is None:
        return request.prompt if isinstance(request.prompt, str) else " ".join(map(str, request.prompt))
    for m in reversed(request.messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


class FakeBackend:
    def __init__(self, name: str, alias: str, *, fail_load: bool = False) -> None:
        self.name = name
        self.alias = alias
        self.fail_load = fail_load
        self.requests: list[GenerationRequest] = []
        self.num_aborted = 0
        self.num_active = 0

    async def load(self) -> None:
        if self.fail_load:
            raise RuntimeError("cannot load")

    async def close(self) -> None:
        return None

    async def health(self) -> bool:
        return not self.fail_load

    def num_prompt_tokens(self, request: GenerationRequest) -> int | None:
        return None

    def answer_tokens(self, text: str) -> list[str]:
        if "slow" in text:
            return [f" t{i}" for i in range(200)]
        return [f"{self.alias}:", " echo", *[" " + w for w in text.split()], " done."]

    async def generate(self, request: GenerationRequest, stream: bool = True):
        self.requests.append(request)
        text = _last_user(request)
        s = request.sampling
        lp_value = -3.0 if "unsure" in text else -0.05
        num_prompt = len(text.split()) + 1
        num_completion = 0
        self.num_active += 1
        finished = False
        try:
            if request.tools:
                call = {"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": request.tools[0]["function"]["name"], "arguments": "{}"}}
                yield Delta(index=0, tool_calls=[call], finish_reason="tool_calls", is_final=True,
                            usage=Usage(num_prompt, 1))
                finished = True
                return
            tokens = self.answer_tokens(text)
            for index in range(request.n):
                produced = ""
                count = 0
                finish = "stop"
                for tok in tokens:
                    if count >= s.max_tokens:
                        finish = "length"
                        break
                    cut = None
                    for stop in s.stop:
                        pos = (produced + tok).find(stop)
                        if pos != -1 and (cut is None or pos < cut):
                            cut = pos
                    if cut is not None:
                        piece = (produced + tok)[:cut][len(produced):]
                        if piece:
                            yield Delta(index=index, text=piece)
                        finish = "stop"
                        break
                    if "slow" in text:
                        await asyncio.sleep(0.02)
                    if "explode" in text and count == 1:
                        raise BackendError("replica died mid-answer", retryable=True, status_code=502,
                                           code="upstream_error", after_first_token=True)
                    lps: tuple[TokenLogprob, ...] = ()
                    if s.logprobs is not None:
                        tops = tuple((t, lp_value - k) for k, t in enumerate([tok, " x", " y", " z", " w"][: s.logprobs]))
                        lps = (TokenLogprob(token=tok, logprob=lp_value, token_id=count, top_logprobs=tops),)
                    produced += tok
                    count += 1
                    num_completion += 1
                    yield Delta(index=index, text=tok, token_ids=(count,), logprobs=lps)
                last = index == request.n - 1
                yield Delta(index=index, finish_reason=finish, is_final=last,
                            usage=Usage(num_prompt, num_completion) if last else None)
            finished = True
        finally:
            self.num_active -= 1
            if not finished:
                self.num_aborted += 1


class FakeGuard:
    """A guard (``pipeline.guard``) that says ``unsafe`` for texts with "bomb" and ``domain`` otherwise."""

    max_chars = 1000

    def classify(self, text: str):
        from routers.guard.verdict import GuardVerdict

        unsafe = "bomb" in text
        return GuardVerdict(label="unsafe" if unsafe else "domain", domain=None if unsafe else "general",
                            confidence=1.0, scores={})


class FakeFactory:
    """``backend_factory`` for ``PoolSet.from_settings``: FakeBackends, remembered by pool alias."""

    def __init__(self, fail_load: frozenset[str] = frozenset()) -> None:
        self.fail_load = fail_load
        self.backends: dict[str, list[FakeBackend]] = {}

    def __call__(self, cfg: Any, index: int) -> FakeBackend:
        b = FakeBackend(f"{cfg.name}/{index}", cfg.name, fail_load=cfg.name in self.fail_load)
        self.backends.setdefault(cfg.name, []).append(b)
        return b

    def requests(self, alias: str) -> list[GenerationRequest]:
        return [r for b in self.backends.get(alias, []) for r in b.requests]


def fake_settings(**overrides: Any):
    """Two local pools (slm, llm) + a remote-kind pool 'cloud' that can do tools and JSON mode."""
    from gateway.settings import settings_from_dict

    data: dict[str, Any] = {
        "pools": [
            {"name": "slm", "model": "fake-slm", "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}},
            {"name": "llm", "model": "fake-llm", "price": {"input_per_1m": 10.0, "output_per_1m": 20.0}},
            {"name": "cloud", "kind": "remote", "model": "fake-cloud", "urls": ["http://127.0.0.1:9/v1"],
             "supports_tools": True, "supports_json_mode": True},
        ],
        "routing": {"cascade": {"mode": "slm_then_escalate", "stream_mode": "buffer", "min_mean_logprob": -1.0}},
        "example_cache": {"enabled": False},
    }
    for key, value in overrides.items():
        data[key] = value
    return settings_from_dict(data)


def fake_app(settings, factory: FakeFactory, embed: Callable[[list[str]], np.ndarray] | None = None):
    """The gateway app over ``factory``'s FakeBackends; the example cache embeds with ``embed`` (default
    ``bow_embed``), never MiniLM."""
    from gateway.app import create_app
    from gateway.wiring import build_pipeline

    embed = embed or bow_embed
    return create_app(settings, pipeline_factory=lambda s: build_pipeline(s, backend_factory=factory, embed=embed))


# ------------------------------------------------------------------------------ example cache

EMBED_DIM = 64


def bow_embed(texts: list[str]) -> np.ndarray:
    """Deterministic bag-of-words embedding: shared words → high cosine, disjoint words → ~0."""
    out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % EMBED_DIM] += 1.0
        n = np.linalg.norm(out[i])
        out[i] /= n if n else 1.0
    return out


def cache_settings(**overrides: Any):
    """``ExampleCacheSettings`` for store tests: top 2, similarity >= 0.5, dedup at 0.97, 500 ms deadline."""
    from gateway.settings import ExampleCacheSettings

    base: dict[str, Any] = dict(top_k=2, min_similarity=0.5, dedup_similarity=0.97, max_example_tokens=512,
                                deadline_ms=500)
    return ExampleCacheSettings(**{**base, **overrides})


# ------------------------------------------------------------------------------------- waits


def wait_until(condition: Callable[[], Any], what: str = "condition", timeout_s: float = 15.0) -> Any:
    """Poll ``condition()`` until it is truthy and return its value; fail the test after ``timeout_s``
    (a bound for a hung test, never a measured time)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


async def wait_until_async(condition: Callable[[], Any], what: str = "condition", timeout_s: float = 15.0) -> Any:
    """``wait_until`` inside an event loop; ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def fake_local_real_remote(cfg: Any, index: int) -> Any:
    """``backend_factory``: FakeBackends for local pools, the real OpenAIUpstream for remote ones."""
    if cfg.kind == "remote":
        from backends.pool import default_backend

        return default_backend(cfg, index)
    return FakeFactory()(cfg, index)


def remote_cloud_app(upstream_url: str, **overrides: Any):
    """The gateway app over fake replicas for 'slm' and 'llm' and a real OpenAIUpstream for 'cloud' (tools and
    JSON mode on) in front of ``upstream_url`` (a live ``bench.fake_upstream.FakeUpstream``)."""
    from gateway.app import create_app

    pools = [{"name": "slm", "model": "fake-slm"}, {"name": "llm", "model": "fake-llm"},
             {"name": "cloud", "kind": "remote", "model": "fake-cloud", "urls": [upstream_url + "/v1"],
              "supports_tools": True, "supports_json_mode": True}]
    return create_app(fake_settings(pools=pools, **overrides), backend_factory=fake_local_real_remote)


def requests_total(base_url: str) -> dict[tuple[str, str, str], float]:
    """A live gateway's ``switchyard_requests_total`` as {(route, model, status): count}."""
    import httpx

    counts = {}
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith("switchyard_requests_total{"):
            labels, value = line[len("switchyard_requests_total{"):].split("} ")
            kv = dict(part.split("=", 1) for part in labels.split(","))
            counts[(kv["route"].strip('"'), kv["model"].strip('"'), kv["status"].strip('"'))] = float(value)
    return counts
