"""create_app(settings): the FastAPI app.

The lifespan builds the ``Pipeline`` once through ``gateway/wiring.py`` (pools, guard, router policy, cascade
rule, example store, admission) and closes it at shutdown; routes reach it through ``gateway.routes.deps.get_pipeline``.
Its ``gateway/lifecycle.py`` ``Lifecycle`` starts it, answers readiness and reloads, and closes it.
SIGHUP reloads the guard and router artifacts, as ``POST /admin/reload`` does (``Lifecycle.reload``).
Every error leaves in OpenAI's envelope through ``gateway.edge.error_response``: pydantic validation
errors are 400 ``invalid_request_error`` (not FastAPI's 422), unknown paths 404 (a trailing slash too:
never a redirect), a client that left 499, anything unexpected 500.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import __version__
from gateway.edge import Edge, error_response
from gateway.errors import ClientGone, GatewayError, InvalidRequest, NotFound, ServiceUnavailable
from gateway.responder import invalid_request
from gateway.settings import Settings

log = logging.getLogger("switchyard")

PipelineFactory = Callable[[Settings], Any]  # settings -> Pipeline (tests inject fakes through it)
SETTINGS_ENV = "SWITCHYARD_SETTINGS_JSON"  # `serve` with workers > 1: the validated settings, for each worker


def create_app_from_env() -> FastAPI:
    """The app of one worker process of ``switchyard serve`` with ``workers`` > 1 (uvicorn's factory): the
    settings the parent validated, read from ``$SWITCHYARD_SETTINGS_JSON``."""
    import os

    return create_app(Settings.model_validate_json(os.environ[SETTINGS_ENV]))


def create_app(settings: Settings, *, pipeline_factory: PipelineFactory | None = None,
               backend_factory: Any = None, resolver: Any = None, tracer_provider: Any = None) -> FastAPI:
    """The gateway app. ``pipeline_factory`` / ``backend_factory`` / ``resolver`` replace the real pipeline /
    replicas / DNS resolver (tests); by default ``gateway.wiring.build_pipeline(settings)`` makes everything from
    the settings.
    ``tracer_provider``: where spans go when ``opentelemetry`` is on (default: gateway/tracing.py's choice).
    Raises ConfigError when ``opentelemetry`` is on and the ``otel`` extra is not installed."""
    tracing = None
    if settings.opentelemetry:
        from gateway.tracing import Tracing

        tracing = Tracing.from_settings(settings, tracer_provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from gateway.lifecycle import Lifecycle
        from gateway.wiring import build_pipeline

        if pipeline_factory is not None:
            pipeline = pipeline_factory(settings)
        else:
            pipeline = build_pipeline(settings, backend_factory=backend_factory, resolver=resolver)
        if not settings.api_keys:
            log.warning("no api_keys configured: the gateway is OPEN to anyone who can reach %s:%s",
                        settings.host, settings.port)
        lifecycle = Lifecycle(pipeline)
        await lifecycle.start()
        from gateway.response_store import build_response_store

        app.state.response_store = build_response_store(settings)
        from gateway.embeddings import Embeddings

        app.state.embeddings = Embeddings(settings)
        from gateway.dashboard import Dashboard

        app.state.dashboard = Dashboard(pipeline.metrics, pipeline.decision_log)
        app.state.dashboard.start()
        pipeline.tracing = tracing
        # Everything built so far (modules, models, artifacts) lives as long as the process: move it out
        # of the cyclic GC's reach, or every young-generation collection walks it (≈40% of the CPU a
        # request costs, measured with fake replicas).
        gc.collect()
        gc.freeze()
        app.state.pipeline, app.state.lifecycle = pipeline, lifecycle
        sighup = _reload_on_sighup(lifecycle)
        try:
            yield
        finally:
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            app.state.pipeline = app.state.lifecycle = None
            await lifecycle.close()
            await app.state.response_store.close()
            await app.state.embeddings.close()
            await app.state.dashboard.close()
            if tracing is not None:
                tracing.close()
            gc.unfreeze()

    # FastAPI's native OpenTelemetry checks for a configured provider on every request (~3% of a routed
    # request's CPU); it runs only when the deployment asks for it, with our provider (its HTTP span is the
    # parent of switchyard.request) and without exporters of its own (they would export every span twice).
    # /ui is left out: a `?key=` there must not become a span attribute.
    telemetry: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}
    if tracing is not None:
        telemetry = {"tracer_provider": tracing.provider, "auto_configure": False,
                     "exclude": lambda scope: scope.get("path", "").startswith("/ui")}
    # redirect_slashes off: "/v1/chat/completions/" is a 404, never a redirect built from the Host header.
    app = FastAPI(title="switchyard", version=__version__, lifespan=lifespan, telemetry=telemetry,
                  redirect_slashes=False,
                  description="OpenAI-compatible LLM gateway: guard, router, cascade, example cache, model pools.")
    app.state.settings = settings
    app.state.pipeline = app.state.lifecycle = None

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(request.scope, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request.scope, invalid_request(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err: GatewayError = NotFound(f"No route {request.method} {request.url.path}", code="not_found")
        else:
            err = GatewayError(str(exc.detail), code=None, headers=getattr(exc, "headers", None))
            err.status_code = exc.status_code
            err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(request.scope, err)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return error_response(request.scope, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(request.scope, exc)

    from gateway.routes import admin, chat, completions, embeddings, health, messages, models, responses, ui

    for module in (chat, completions, responses, messages, embeddings, models, health, ui, admin):
        app.include_router(module.router)
    app.add_middleware(FastLane)
    app.add_middleware(Edge, self_headed=_FAST_ROUTES,  # outermost: key, body, t_start, x-request-id
                       max_body_bytes=settings.limits.max_body_bytes,
                       body_read_timeout_s=settings.limits.body_read_timeout_s,
                       max_header_bytes=settings.limits.max_header_bytes)
    app.openapi = lambda: _openapi_schema(app, settings)  # type: ignore[method-assign]
    return app


def _reload_on_sighup(lifecycle: Any) -> bool:
    """SIGHUP reloads the artifacts (``Lifecycle.reload``; the outcome is logged). Only where the loop can
    take signals (the main thread, as ``switchyard serve`` runs); False elsewhere (a server in a test thread)."""
    if not hasattr(signal, "SIGHUP"):
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lifecycle.reload_in_background)
    except (ValueError, RuntimeError, NotImplementedError):
        return False
    return True


class FastLane:
    """ASGI middleware: the generation routes (``POST /v1/chat/completions``, ``/v1/completions``,
    ``/v1/responses``, ``/v1/messages``) without FastAPI's per-request machinery.

    FastAPI's routing, dependency solving and exception middleware cost about 470k instructions per request
    (callgrind; BENCHMARKS.md "Gateway") — as much as the guard. For these routes FastLane parses the
    body with pydantic's JSON validator, runs the same handler as the FastAPI route, and maps errors with
    the same ``error_response``. Every other path or method goes on to FastAPI, whose route definitions
    still produce the OpenAPI schema of these routes.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _FAST_ROUTES:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await _fast_completion(request, scope["path"], receive)
        except Exception as e:  # noqa: BLE001 - the same mapping as the app's exception handlers
            response = error_response(scope, e)
        request_id = scope["state"].get("request_id") if "state" in scope else None
        if request_id is not None:  # the Edge leaves x-request-id to these routes (no wrapper per chunk)
            response.raw_headers.append((b"x-request-id", request_id.encode()))
        await response(scope, receive, send)


_FAST_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"})
_FAST_HANDLERS: dict[str, tuple[Any, Any]] = {}  # filled on the first request (no imports at module load)


def _is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, parameters ignored (FastAPI's rule)."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _fast_routes() -> dict[str, tuple[Any, Any]]:
    """path → (request model, handler(pipeline, body, request)): the same handlers as the FastAPI routes."""
    from gateway.anthropic import MessagesRequest
    from gateway.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
    from gateway.responder import complete
    from gateway.routes.messages import messages
    from gateway.routes.responses import responses

    return {"/v1/chat/completions": (ChatCompletionRequest, complete), "/v1/completions": (CompletionRequest, complete),
            "/v1/messages": (MessagesRequest, messages), "/v1/responses": (ResponsesRequest, responses)}


async def _body(receive: Any) -> bytes:
    """The request body straight from ``receive`` (the edge has buffered it: usually one message)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _fast_completion(request: Request, path: str, receive: Any) -> Response:
    from pydantic import ValidationError

    if not _is_json(request.headers.get("content-type")):
        # As FastAPI's strict content type: a browser can send text/plain cross-site without a preflight,
        # so a body is only read as JSON when it says it is (a gateway on localhost is not a CSRF target).
        raise InvalidRequest("Invalid request: the body must be JSON sent with Content-Type: application/json.")
    raw = await _body(receive)
    pipeline = request.app.state.pipeline
    if pipeline is None:
        raise ServiceUnavailable("The gateway is starting up.", code="starting")
    if not _FAST_HANDLERS:
        _FAST_HANDLERS.update(_fast_routes())
    model, handler = _FAST_HANDLERS[path]
    try:
        body = model.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise invalid_request(list(e.errors())) from None
    return await handler(pipeline, body, request)


def _openapi_schema(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's schema with what this deployment enforces beyond the wire types, so that the schema and
    the server agree: the configured limits on ``n`` and ``max_tokens``, top_logprobs ⇒ logprobs, and the
    bearer key on /v1/ (and /ui/data, an admin key) when keys are configured."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    limits = settings.limits
    components = schema.get("components", {}).get("schemas", {})
    for name in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest", "MessagesRequest"):
        props = components.get(name, {}).get("properties", {})
        for field, maximum in (("n", limits.max_n), ("max_tokens", limits.max_completion_tokens),
                               ("max_completion_tokens", limits.max_completion_tokens),
                               ("max_output_tokens", limits.max_completion_tokens)):
            for branch in props.get(field, {}).get("anyOf", [props.get(field, {})]):
                if branch.get("type") == "integer":
                    branch["maximum"] = min(branch.get("maximum", maximum), maximum)
    chat = components.get("ChatCompletionRequest")
    if chat is not None:
        chat["if"] = {"required": ["top_logprobs"],
                      "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}}
        chat["then"] = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
    if settings.api_keys:  # every /v1/ operation needs a key: say so, so clients and checkers know
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "a configured API key (also accepted: api-key header)"}
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/v1/") or path == "/ui/data":
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema
