"""Open-loop HTTP load generator for the gateway benchmark (a separate process; asyncio + uvloop).

Requests are *scheduled* at a fixed rate (request i at ``start + i / rate``) whatever the server does, and
latency is measured from the scheduled time, so a server that falls behind is charged for the queue it
builds (no coordinated omission). It speaks minimal HTTP/1.1 over keep-alive connections (content-length
and chunked bodies) so that the client's own cost stays small and equal for every target.

It speaks three APIs (``--api``): ``chat`` (``/v1/chat/completions``), ``responses`` (``/v1/responses``) and
``messages`` (Anthropic's ``/v1/messages``). The bodies file holds chat bodies either way; ``api_body``
translates each one once, before the load starts, and ``is_complete`` says whether an answer is a whole
one in that API's shape (stream: its last event arrived).

``python -m bench.loadgen --url http://127.0.0.1:8000/v1/chat/completions --bodies F.jsonl --rate 100
--duration 5 [--warmup 1] [--stream] [--api chat|responses|messages] [--model NAME] [--json]`` prints one
JSON object (``LoadResult``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

APIS = ("chat", "responses", "messages")


@dataclass
class LoadResult:
    """Latencies in milliseconds over the measured window (warm-up excluded)."""

    url: str
    api: str  # chat | responses | messages
    rate: float
    stream: bool
    num_sent: int
    num_ok: int
    num_errors: int
    achieved_rps: float
    latency_ms_p50: float | None
    latency_ms_p90: float | None
    latency_ms_p99: float | None
    ttfb_ms_p50: float | None  # time to the first body byte (stream: the first SSE chunk)
    ttfb_ms_p99: float | None
    reported_overhead_ms_p50: float | None  # x-switchyard-overhead-ms, when the server sends it
    reported_overhead_ms_p99: float | None
    errors: list[str] = field(default_factory=list)  # up to 5 distinct messages


def api_body(api: str, chat: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The chat body ``chat`` (model, messages, max_tokens, sampling fields) as ``api`` sends it, streamed or
    not: Responses takes the messages as ``input`` and ``max_output_tokens``; Messages takes the system
    messages as ``system`` and requires ``max_tokens``. Raises ValueError for an unknown api."""
    if api not in APIS:
        raise ValueError(f"unknown api {api!r}; valid: {', '.join(APIS)}")
    body = dict(chat, stream=stream)
    if api == "chat":
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body
    messages = body.pop("messages")
    max_tokens = body.pop("max_tokens", None) or body.pop("max_completion_tokens", None) or 16
    if api == "responses":
        return dict(body, input=messages, max_output_tokens=max_tokens)
    system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    body.update(max_tokens=max_tokens, messages=[m for m in messages if m["role"] not in ("system", "developer")])
    if system:
        body["system"] = system
    return body


def is_complete(api: str, body: bytes, *, stream: bool) -> bool:
    """Whether ``body`` (a 200's) is a whole answer of ``api``: non-stream, the answer object; stream, the
    API's last event (chat ``[DONE]``, Responses ``response.completed`` / ``.incomplete``, Messages
    ``message_stop``)."""
    if not stream:
        return {"chat": b'"choices"', "responses": b'"output"', "messages": b'"stop_reason"'}[api] in body
    end = body.rstrip()
    if api == "chat":
        return end.endswith(b"data: [DONE]")
    if api == "messages":
        return end.endswith(b'data: {"type":"message_stop"}')
    last = end[end.rfind(b"event: "):].split(b"\n", 1)[0]
    return last in (b"event: response.completed", b"event: response.incomplete")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class _Client:
    """Keep-alive HTTP/1.1 connections to one host; at most ``max_connections`` open at once."""

    def __init__(self, url: str, max_connections: int, api_key: str = "sk-bench") -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, got {url!r}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path or "/"
        self.api_key = api_key
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(max_connections)

    def request_bytes(self, body: bytes) -> bytes:
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nAuthorization: Bearer {self.api_key}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def post(self, payload: bytes) -> tuple[int, dict[bytes, bytes], float, bytes]:
        """(status, headers, time of the first body byte, body). Raises on a broken connection."""
        async with self.slots:
            while self.idle and self.idle[-1][0].at_eof():  # the server closed it while it sat idle
                self.idle.pop()[1].close()
            conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            try:
                writer.write(payload)
                status_line = await reader.readline()
                if not status_line:
                    raise ConnectionError("server closed the connection")
                status = int(status_line.split()[1])
                headers: dict[bytes, bytes] = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    key, _, value = line.partition(b":")
                    headers[key.strip().lower()] = value.strip()
                first_byte = 0.0
                if b"content-length" in headers:
                    body = await reader.readexactly(int(headers[b"content-length"]))
                    first_byte = time.perf_counter()
                elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    chunks = []
                    while True:
                        size = int((await reader.readline()).split(b";")[0], 16)
                        if size == 0:
                            await reader.readline()
                            break
                        chunks.append((await reader.readexactly(size + 2))[:-2])
                        if not first_byte:
                            first_byte = time.perf_counter()
                    body = b"".join(chunks)
                else:
                    body = await reader.read()
                    first_byte = time.perf_counter()
                    headers[b"connection"] = b"close"
            except BaseException:
                writer.close()
                raise
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
            else:
                self.idle.append(conn)
            return status, headers, first_byte, body

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def run_load(url: str, bodies: list[dict], *, rate: float, duration_s: float, warmup_s: float = 1.0,
                   stream: bool = False, model: str | None = None, timeout_s: float = 30.0,
                   max_connections: int = 2000, api_key: str = "sk-bench", api: str = "chat") -> LoadResult:
    """Send ``rate`` requests/s for ``warmup_s + duration_s``; measure the last ``duration_s``. ``bodies``
    are chat bodies, sent as ``api`` speaks (``api_body``)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be > 0")
    client = _Client(url, max_connections, api_key)
    payloads = []
    for b in bodies:
        b = api_body(api, dict(b, model=model) if model is not None else b, stream=stream)
        payloads.append(client.request_bytes(json.dumps(b).encode()))
    latencies: list[float] = []
    ttfbs: list[float] = []
    overheads: list[float] = []
    errors: dict[str, int] = {}
    num_measured = 0

    async def one(payload: bytes, scheduled: float, measured: bool) -> None:
        try:
            status, headers, first_byte, body = await asyncio.wait_for(client.post(payload), timeout_s)
            ok = status == 200 and is_complete(api, body, stream=stream)
            error = None if ok else f"HTTP {status}: {body[:160]!r}"
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"[:200]
        done = time.perf_counter()
        if not measured:
            return
        if error is not None:
            errors[error] = errors.get(error, 0) + 1
            return
        latencies.append((done - scheduled) * 1e3)
        ttfbs.append((first_byte - scheduled) * 1e3)
        if b"x-switchyard-overhead-ms" in headers:
            overheads.append(float(headers[b"x-switchyard-overhead-ms"]))

    total = int((warmup_s + duration_s) * rate)
    first_measured = int(warmup_s * rate)
    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        measured = i >= first_measured
        num_measured += measured
        tasks.append(asyncio.ensure_future(one(payloads[i % len(payloads)], scheduled, measured)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - (start + first_measured / rate)
    client.close()
    ok = len(latencies)
    return LoadResult(
        url=url, api=api, rate=rate, stream=stream, num_sent=num_measured, num_ok=ok, num_errors=num_measured - ok,
        achieved_rps=round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        latency_ms_p50=_r(percentile(latencies, 50)), latency_ms_p90=_r(percentile(latencies, 90)),
        latency_ms_p99=_r(percentile(latencies, 99)),
        ttfb_ms_p50=_r(percentile(ttfbs, 50)), ttfb_ms_p99=_r(percentile(ttfbs, 99)),
        reported_overhead_ms_p50=_r(percentile(overheads, 50)), reported_overhead_ms_p99=_r(percentile(overheads, 99)),
        errors=[f"{n}x {msg}" for msg, n in sorted(errors.items(), key=lambda kv: -kv[1])[:5]],
    )


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description="open-loop HTTP load generator")
    p.add_argument("--url", required=True)
    p.add_argument("--bodies", required=True, help="JSONL of request bodies, sent round-robin")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--api", default="chat", choices=APIS, help="the API the URL speaks (bodies are chat bodies)")
    p.add_argument("--model", help="override each body's model")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--api-key", default="sk-bench", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    args = p.parse_args(argv)
    with open(args.bodies) as f:
        bodies = [json.loads(line) for line in f if line.strip()]
    try:
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    result = run_loop(run_load(args.url, bodies, rate=args.rate, duration_s=args.duration,
                                  warmup_s=args.warmup, stream=args.stream, model=args.model,
                                  timeout_s=args.timeout, api_key=args.api_key, api=args.api))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
