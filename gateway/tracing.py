"""OpenTelemetry spans of the request path (``opentelemetry: true``; the ``otel`` extra).

One span per request, ``switchyard.request``, with a child span per stage that ran:

  switchyard.admission   model resolved, key admitted, limits, budget reserved  (switchyard.key, .model)
  switchyard.guard       the guard's verdict                                   (switchyard.guard)
  switchyard.routing     route and pool                                        (switchyard.route, .pool, .score,
                                                                                .threshold)
  switchyard.cache       example-cache lookup (requests bound for the SLM)     (switchyard.num_examples)
  switchyard.backend     one backend call, first to last Delta; two when the   (switchyard.pool, gen_ai.usage.*)
                         cascade escalates (the SLM's, then the LLM's)

The request span ends when the request is counted (``Pipeline.record``) and carries the decision-log record:
route, pool, guard verdict, escalated, status, tokens (``gen_ai.usage.input_tokens`` / ``output_tokens``),
cost. Its parent is the current span when there is one (FastAPI's HTTP server span, itself a child of the
incoming ``traceparent``), else the client's ``traceparent``, else none (a new trace).

Spans go to the ``TracerProvider`` given (tests: an in-memory exporter), else to the global one when the
application configured one (e.g. ``opentelemetry-instrument``), else to a provider of our own that exports
over OTLP/HTTP to the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
(default ``http://localhost:4318/v1/traces``, a collector beside the gateway), ``OTEL_SERVICE_NAME`` naming
the service (default ``switchyard``). ``OTEL_SDK_DISABLED=true`` turns the spans off.

With the flag off nothing here is imported and the pipeline's hooks are one ``is None`` check each; with
the flag on and the extra missing, start-up fails with one line naming the extra.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from gateway.settings import ConfigError

log = logging.getLogger("switchyard")

MISSING_EXTRA = ("opentelemetry: true needs the OpenTelemetry SDK and OTLP exporter: "
                 "pip install 'switchyard[otel]'")


class Tracing:
    """The tracer of one app. ``begin(job)`` opens a request's spans; ``close()`` flushes what we own."""

    def __init__(self, provider: Any, *, owned: bool = False) -> None:
        from opentelemetry import trace

        from gateway import __version__

        self.provider = provider
        self.tracer = provider.get_tracer("switchyard", __version__)
        self._owned = owned
        self._trace = trace

    @classmethod
    def from_settings(cls, settings: Any, provider: Any = None) -> Tracing | None:
        """None when ``settings.opentelemetry`` is off (or ``OTEL_SDK_DISABLED=true``); ConfigError (one
        line) when it is on and the ``otel`` extra is not installed."""
        if not settings.opentelemetry or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ConfigError(MISSING_EXTRA) from None
        if provider is not None:
            return cls(provider)
        current = trace.get_tracer_provider()
        if not isinstance(current, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return cls(current)  # the application configured one (and its exporters)
        provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get(
            "OTEL_SERVICE_NAME", "switchyard")}), shutdown_on_exit=False)
        exporter = OTLPSpanExporter()  # reads the OTEL_EXPORTER_OTLP_* environment
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("OpenTelemetry: spans exported over OTLP/HTTP to %s",
                 os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                 or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318 (the default)")
        return cls(provider, owned=True)

    def begin(self, job: Any) -> RequestSpans:
        """Open the request span of ``job`` (a ``gateway.pipeline.Job``)."""
        trace = self._trace
        parent = None  # the current context: FastAPI's server span
        if not trace.get_current_span().get_span_context().is_valid:
            from opentelemetry.context import Context

            parent = Context()  # no current span: a new trace, or the client's
            if job.traceparent is not None:
                from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

                parent = TraceContextTextMapPropagator().extract({"traceparent": job.traceparent})
        span = self.tracer.start_span("switchyard.request", context=parent, attributes={
            "switchyard.request_id": job.correlation_id or job.request_id, "switchyard.kind": job.kind,
            "switchyard.stream": job.stream, "gen_ai.request.model": job.model})
        return RequestSpans(self, span)

    def close(self) -> None:
        if self._owned:
            self.provider.shutdown()


class RequestSpans:
    """The spans of one request: the request span and the stage spans still open. Stage hooks in the
    pipeline: ``span = spans.start(stage)`` ... ``spans.end(span, name=value, ...)`` (attributes
    ``switchyard.<name>``; None values are left out); a failure leaves its stage open, ``error(exc)`` marks
    it and ``finish(status, record)`` ends everything."""

    __slots__ = ("_context", "_open", "_tracing", "request")

    def __init__(self, tracing: Tracing, request: Any) -> None:
        self._tracing = tracing
        self.request = request
        self._context = tracing._trace.set_span_in_context(request)
        self._open: list[Any] = []

    def start(self, stage: str, **attributes: Any) -> Any:
        span = self._tracing.tracer.start_span(f"switchyard.{stage}", context=self._context,
                                               attributes=_attributes(attributes))
        self._open.append(span)
        return span

    def end(self, span: Any, **attributes: Any) -> None:
        span.set_attributes(_attributes(attributes))
        span.end()
        self._open.remove(span)

    def error(self, exc: BaseException) -> None:
        """Mark the stages ``exc`` interrupted (they end with the request)."""
        from opentelemetry.trace import Status, StatusCode

        for span in self._open:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))

    async def backend(self, deltas: AsyncIterator[Any], pool: str, model: str) -> AsyncIterator[Any]:
        """``deltas`` inside a ``switchyard.backend`` span: from the first request for a Delta to the last
        (or to the close of a stream the client left), with the call's token usage."""
        span = self.start("backend", pool=pool)
        span.set_attribute("gen_ai.request.model", model)
        usage = None
        try:
            async for delta in deltas:
                if delta.usage is not None:
                    usage = delta.usage
                yield delta
        except Exception as e:
            self.error(e)
            raise
        finally:
            await deltas.aclose()
            if usage is not None:
                span.set_attributes({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                                     "gen_ai.usage.output_tokens": usage.completion_tokens})
            self.end(span)

    def finish(self, status: int, record: dict[str, Any]) -> None:
        """End the request (and any stage a failure left open) with its decision-log ``record``."""
        from opentelemetry.trace import Status, StatusCode

        for span in list(self._open):
            self.end(span)
        span = self.request
        span.set_attributes(_attributes({k: record.get(k) for k in _RECORD_ATTRIBUTES}))
        if record.get("prompt_tokens") is not None:
            span.set_attributes({"gen_ai.usage.input_tokens": record["prompt_tokens"],
                                 "gen_ai.usage.output_tokens": record.get("completion_tokens") or 0})
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, str(status)))
        span.end()


_RECORD_ATTRIBUTES = ("route", "pool", "guard", "escalated", "key", "cost_usd", "num_examples", "score",
                      "threshold", "endpoint")


def _attributes(values: dict[str, Any]) -> dict[str, Any]:
    return {f"switchyard.{k}": v for k, v in values.items() if v is not None}
