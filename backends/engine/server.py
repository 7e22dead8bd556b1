"""`switchyard engine serve`: one model as an OpenAI-compatible server (what a pool replica runs).

Thin routes over LocalBackend: /v1/chat/completions, /v1/completions (stream and non-stream),
/v1/models, /healthz, /metrics. Errors use OpenAI's envelope {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from backends.base import BackendError, Delta, GenerationRequest
from backends.engine.protocol import ChatRequest, CompletionRequest
from backends.local import BUILTIN_TEMPLATES, LocalBackend
from gateway.settings import EngineOptions

_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 503: "service_unavailable"}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status)


def _usage(delta: Delta | None) -> dict | None:
    if delta is None or delta.usage is None:
        return None
    u = delta.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _chat_logprobs(delta: Delta) -> dict:
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top_logprobs]}
        for lp in delta.logprobs
    ]}


def _completion_logprobs(delta: Delta, offset: int) -> dict:
    offsets, pos = [], offset
    for lp in delta.logprobs:
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": [lp.token for lp in delta.logprobs], "token_logprobs": [lp.logprob for lp in delta.logprobs],
            "top_logprobs": [dict(lp.top_logprobs) for lp in delta.logprobs], "text_offset": offsets}


def _merge_logprobs(acc: dict | None, new: dict, chat: bool) -> dict:
    if acc is None:
        return new
    if chat:
        acc["content"].extend(new["content"])
    else:
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            acc[key].extend(new[key])
    return acc


def create_engine_app(backend: LocalBackend, served_name: str | None = None) -> FastAPI:
    """FastAPI app serving ``backend``; the lifespan loads the weights (in a thread) and closes the engine."""
    model_id = served_name or backend.model
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.load()
        yield
        await backend.close()

    app = FastAPI(title="switchyard engine", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        return error_response(400, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}",
                              param=".".join(loc) or None)

    @app.exception_handler(BackendError)
    async def _backend(request: Request, exc: BackendError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, code=exc.code)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = await backend.health()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "switchyard", "max_model_len": backend.max_model_len}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(backend, model_id), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        req = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}", model=model_id, messages=body.messages,
            sampling=body.sampling(), n=body.n, tools=body.tools, tool_choice=body.tool_choice, user=body.user,
            priority=body.priority,
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _respond(backend, req, chat=True, stream=body.stream, include_usage=include_usage)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                return error_response(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        req = GenerationRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}", model=model_id, prompt=prompt, sampling=body.sampling(),
            n=body.n, user=body.user, priority=body.priority,
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _respond(backend, req, chat=False, stream=body.stream, include_usage=include_usage)

    return app


async def _respond(backend: LocalBackend, req: GenerationRequest, *, chat: bool, stream: bool,
                   include_usage: bool):
    gen = backend.generate(req)
    try:
        first = await gen.__anext__()  # errors before the first token become a proper HTTP error
    except StopAsyncIteration:
        return error_response(500, "the engine produced no output")
    except BackendError as exc:
        await gen.aclose()
        return error_response(exc.status_code, exc.message, code=exc.code)
    created = int(time.time())
    if stream:
        return StreamingResponse(_sse(gen, first, req, chat, include_usage, created), media_type="text/event-stream")
    return await _collect(gen, first, req, chat, created)


async def _collect(gen: AsyncIterator[Delta], first: Delta, req: GenerationRequest, chat: bool, created: int):
    texts = [""] * req.n
    reasons: list[str | None] = [None] * req.n
    logprobs: list[dict | None] = [None] * req.n
    last = first
    try:
        delta: Delta | None = first
        while delta is not None:
            last = delta
            texts[delta.index] += delta.text
            if delta.finish_reason:
                reasons[delta.index] = delta.finish_reason
            if req.sampling.logprobs and delta.logprobs:
                offset = len(texts[delta.index]) - len(delta.text)
                new = _chat_logprobs(delta) if chat else _completion_logprobs(delta, offset)
                logprobs[delta.index] = _merge_logprobs(logprobs[delta.index], new, chat)
            delta = await anext(gen, None)
    except BackendError as exc:
        return error_response(exc.status_code if exc.status_code < 500 else 500, exc.message, code=exc.code)
    finally:
        await gen.aclose()
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": logprobs[i] if req.sampling.logprobs else None, "finish_reason": reasons[i]}
                   for i in range(req.n)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": logprobs[i] if req.sampling.logprobs else None,
                    "finish_reason": reasons[i]} for i in range(req.n)]
        obj = "text_completion"
    return {"id": req.request_id, "object": obj, "created": created, "model": req.model, "choices": choices,
            "usage": _usage(last)}


def _sse_line(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _sse(gen: AsyncIterator[Delta], first: Delta, req: GenerationRequest, chat: bool, include_usage: bool,
               created: int) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * req.n
    started = [False] * req.n

    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        body = {"id": req.request_id, "object": obj, "created": created, "model": req.model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return _sse_line(body)

    try:
        delta: Delta | None = first
        final_usage = None
        while delta is not None:
            i = delta.index
            lp = None
            if req.sampling.logprobs and delta.logprobs:
                lp = _chat_logprobs(delta) if chat else _completion_logprobs(delta, offsets[i])
            if chat:
                d: dict = {"content": delta.text} if (delta.text or not started[i]) else {}
                if not started[i]:
                    d["role"] = "assistant"
                    started[i] = True
                choice = {"index": i, "delta": d, "logprobs": lp, "finish_reason": delta.finish_reason}
            else:
                choice = {"index": i, "text": delta.text, "logprobs": lp, "finish_reason": delta.finish_reason}
            offsets[i] += len(delta.text)
            if delta.text or delta.finish_reason or lp or (chat and "role" in choice["delta"]):
                yield chunk([choice])
            if delta.is_final:
                final_usage = _usage(delta)
            delta = await anext(gen, None)
        if include_usage:
            yield chunk([], final_usage)
    except BackendError as exc:
        yield _sse_line({"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}})
    finally:
        await gen.aclose()
    yield b"data: [DONE]\n\n"


def _prometheus(backend: LocalBackend, model_id: str) -> str:
    if backend.engine is None:
        return "# engine not loaded\n"
    s = backend.engine.stats()
    label = f'{{model="{model_id}"}}'
    rows = [
        ("switchyard_engine_num_requests_running", "gauge", "sequences running", s.num_running),
        ("switchyard_engine_num_requests_waiting", "gauge", "sequences waiting", s.num_waiting),
        ("switchyard_engine_kv_blocks_total", "gauge", "KV cache blocks", s.num_kv_blocks),
        ("switchyard_engine_kv_blocks_used", "gauge", "KV cache blocks in use", s.num_used_blocks),
        ("switchyard_engine_kv_cache_usage_ratio", "gauge", "fraction of KV blocks in use", s.kv_usage),
        ("switchyard_engine_prefix_cache_hit_ratio", "gauge", "prompt tokens served from the prefix cache",
         s.prefix_hit_rate),
        ("switchyard_engine_preemptions_total", "counter", "sequences preempted", s.num_preemptions),
        ("switchyard_engine_prompt_tokens_total", "counter", "prompt tokens received", s.num_prompt_tokens_total),
        ("switchyard_engine_generation_tokens_total", "counter", "tokens generated", s.num_generation_tokens_total),
        ("switchyard_engine_generation_tokens_per_second", "gauge", "generation throughput (last 10 s)",
         s.generation_tokens_per_s),
        ("switchyard_engine_requests_finished_total", "counter", "sequences finished", s.num_requests_finished),
        ("switchyard_engine_time_to_first_token_ms_p50", "gauge", "median TTFT, last 256 sequences", s.ttft_ms_p50),
        ("switchyard_engine_inter_token_latency_ms_p50", "gauge", "median inter-token latency", s.itl_ms_p50),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{label} {value}"]
    return "\n".join(lines) + "\n"


def engine_options(args) -> EngineOptions:
    """The EngineOptions that ``switchyard engine serve``'s flags describe."""
    return EngineOptions(
        dtype=args.dtype, quantization=args.quantization, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=getattr(args, "num_kv_blocks", None),
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        enable_prefix_caching=not args.no_prefix_caching, num_threads=getattr(args, "num_threads", None),
    )


def serve(args) -> int:
    """Handler for ``switchyard engine serve``."""
    from pathlib import Path

    import uvicorn

    options = engine_options(args)
    template = args.chat_template
    if template and template not in BUILTIN_TEMPLATES:
        path = Path(template)
        if not path.is_file():
            raise ValueError(f"--chat-template {template!r}: not one of {BUILTIN_TEMPLATES} and not a file")
        template = path.read_text()
    from backends.engine.loader import resolve_model_path

    resolve_model_path(args.model)  # fail fast with a one-line error (prepares bundled models once)
    device = None if args.device == "auto" else args.device
    backend = LocalBackend(args.served_name or args.model, args.model, options, chat_template=template,
                           device=device)
    app = create_engine_app(backend, args.served_name or args.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
