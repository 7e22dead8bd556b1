"""`switchyard engine serve`: one model as an OpenAI-compatible server.

It is the gateway app (``create_app``) over ``engine_settings(...)``: one in-process local pool named after
the served model, no guard, no router, no cascade, no example cache, and limits that leave the engine's
own checks in charge (context length, ``max_model_len``). Requests, responses, errors and ``/metrics``
are therefore exactly the gateway's; ``model: "auto"`` also reaches the one pool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

from backends.engine.args import EngineArgs, SpeculationConfig
from gateway.settings import Settings, settings_from_dict

_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


def engine_settings(model: str, args: EngineArgs, *, served_name: str | None = None,
                    chat_template: str | None = None, tool_call_parser: str = "auto", host: str = "127.0.0.1",
                    port: int = 8001) -> Settings:
    """The Settings of a one-model server. The pool (= the model id clients send and ``/v1/models``
    lists) is ``served_name``, else ``model`` when it is a valid pool name, else the folder's name; the
    ``model`` string itself is accepted in requests too. Raises ConfigError (one line) for bad values."""
    name = served_name or (model if _POOL_NAME.match(model) else Path(model).name)
    return settings_from_dict({
        "host": host, "port": port,
        "pools": [{"name": name, "kind": "local", "model": model, "chat_template": chat_template, "engine": args,
                   "tool_call_parser": tool_call_parser}],
        "routing": {"slm_pool": name, "llm_pool": name, "cascade": {"mode": "off"}},
        "example_cache": {"enabled": False},
        # the engine answers context_length_exceeded and stops at max_model_len itself
        "limits": {"max_body_bytes": 64 << 20, "max_prompt_tokens": 1 << 30, "max_completion_tokens": 1_000_000,
                   "default_max_tokens": 256, "max_n": 16, "request_timeout_s": 3600},
    })


def engine_args_of(args: argparse.Namespace) -> EngineArgs:
    """The EngineArgs that ``switchyard engine serve``'s flags describe (every option the chart can set)."""
    return EngineArgs(
        dtype=args.dtype, quantization=args.quantization, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=getattr(args, "num_kv_blocks", None),
        kv_cache_memory_gb=args.kv_cache_memory_gb, enable_prefix_caching=not args.no_prefix_caching,
        num_threads=getattr(args, "num_threads", None), device=getattr(args, "device", "auto"),
        kv_retain_s=getattr(args, "kv_retain_s", 0.0), kv_retain_max_share=getattr(args, "kv_retain_max_share", 0.25),
        kv_offload_gb=getattr(args, "kv_offload_gb", 0.0),
        program_scheduling=getattr(args, "program_scheduling", False),
        program_max_wait_s=getattr(args, "program_max_wait_s", 5.0),
        speculation=speculation_of(getattr(args, "speculation", "none")),
    )


def speculation_of(flag: str) -> SpeculationConfig:
    """``--speculation``: a method name (``none``, ``ngram``: the other keys at their defaults) or a JSON object
    of ``SpeculationConfig`` keys (what the chart passes). Raises ValueError (one line) for bad values."""
    if not flag.lstrip().startswith("{"):
        return SpeculationConfig(method=flag)  # type: ignore[arg-type] - validated by SpeculationConfig
    try:
        values = json.loads(flag)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--speculation: not a JSON object ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError("--speculation: not a JSON object")
    known = {f.name for f in dataclasses.fields(SpeculationConfig)}
    if set(values) - known:
        raise ValueError(f"--speculation: unknown keys {sorted(set(values) - known)}; known: {sorted(known)}")
    return SpeculationConfig(**values)


def serve(args: argparse.Namespace) -> int:
    """Handler for ``switchyard engine serve``: bad flags fail here, in one line, before weights load."""
    import uvicorn

    from backends.local import BUILTIN_TEMPLATES
    from backends.models import resolve_model_path
    from gateway.app import create_app

    engine_args = engine_args_of(args)
    template = args.chat_template
    if template and template not in BUILTIN_TEMPLATES:
        path = Path(template)
        if not path.is_file():
            raise ValueError(f"--chat-template {template!r}: not one of {BUILTIN_TEMPLATES} and not a file")
        template = path.read_text()
    resolve_model_path(args.model)  # fail fast with a one-line error (prepares bundled models once)
    settings = engine_settings(args.model, engine_args, served_name=args.served_name, chat_template=template,
                               tool_call_parser=getattr(args, "tool_call_parser", "auto"), host=args.host,
                               port=args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = "uvloop" if sys.platform != "win32" else "auto"
    uvicorn.run(create_app(settings), host=args.host, port=args.port, loop=loop, http="httptools",
                log_level="info", access_log=False, timeout_graceful_shutdown=settings.drain_seconds(),
                timeout_keep_alive=settings.keep_alive_s)
    return 0
