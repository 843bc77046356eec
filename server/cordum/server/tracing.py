"""OpenTelemetry tracing of one process: off unless an OTLP endpoint is configured
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `CORDUM_OTEL_ENDPOINT`, e.g. `http://collector:4317`).

Spans of a job: the API call (gRPC server span, api/tracing_interceptor.py), then in the
scheduler the safety check, the dispatch and the handling of the worker's result; the SDK
worker (cordum.sdk.worker) adds its handling of the job in between.

How the context crosses the bus: W3C `traceparent` (and `tracestate`) in NATS message
headers, never in the CAP payload, so the bytes a CAP worker decodes are unchanged (CAP
workers ignore headers). The CAP `trace_id` is not used as the OTel trace id (it is any
string of up to 200 characters); every job span carries it as the `cordum.trace_id`
attribute instead, so a CAP trace can be found among the OTel ones. Jobs that are picked up
again later from Redis (after an approval, a throttle, a retry, by the reconciler) carry no
context there and start a new trace, found by the same attribute.

Each App owns its TracerProvider and hands its tracer to the pieces that make spans; it is
never installed as OTel's global provider, so apps in one process (tests) export apart and
an App's teardown flushes just its own spans. Only the propagation format is shared (the
stateless W3C propagator).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cordum.server.settings import ALL_ROLES, Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

logger = logging.getLogger(__name__)

Context = otel_context.Context
# The CAP trace id on every job span.
CAP_TRACE_ID = "cordum.trace_id"
JOB_ID = "cordum.job_id"
TOPIC = "cordum.topic"

_PROPAGATOR = TraceContextTextMapPropagator()
# What `Tracing.span` gives when tracing is off (reusable: it holds no state).
_NO_SPAN: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)


def service_name(settings: Settings) -> str:
    """OTEL_SERVICE_NAME if set, else `cordum` (every role) or `cordum-<roles>`."""
    if settings.otel_service_name:
        return settings.otel_service_name
    if set(settings.roles) == set(ALL_ROLES):
        return "cordum"
    return "cordum-" + "-".join(sorted(settings.roles))


class Tracing:
    """The tracer of one App (a no-op one when tracing is off) and the helpers that carry
    span contexts over NATS headers and gRPC metadata."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.tracer: Tracer = (
            provider.get_tracer("cordum.server") if provider is not None else NoOpTracer()
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        if not settings.otel_endpoint:
            return cls()
        # Imported only when tracing is on: the exporter pulls in its own gRPC stubs.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {
                "service.name": service_name(settings),
                "service.instance.id": settings.instance_id,
                "cordum.roles": ",".join(settings.roles),
            }
        )
        provider = TracerProvider(resource=resource)
        # `http://` = plaintext, `https://` = TLS; the exporter reads the other
        # OTEL_EXPORTER_OTLP_* variables (headers, certificates) itself.
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otel_endpoint))
        )
        logger.info("tracing: OTLP spans to %s", settings.otel_endpoint)
        return cls(provider)

    def span(
        self,
        name: str,
        parent: Context | None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, str | int] | None = None,
        start_time_ns: int | None = None,
    ) -> AbstractContextManager[Span]:
        """A span that is current while the block runs, child of `parent` (a context taken
        from headers or captured earlier; None: a new trace). Next to free when tracing is
        off (a shared no-op context manager)."""
        if not self.enabled:
            return _NO_SPAN
        return self.tracer.start_as_current_span(
            name,
            context=parent if parent is not None else Context(),
            kind=kind,
            attributes=attributes,
            start_time=start_time_ns,
        )

    def current(self) -> Context | None:
        """The caller's context, to parent spans made later in another task (a batch)."""
        return otel_context.get_current() if self.enabled else None

    def headers(self, parent: Context | None = None) -> dict[str, str] | None:
        """NATS headers carrying the current span (or `parent`); None when there is none."""
        if not self.enabled:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=parent)
        return carrier or None

    def extract(self, headers: Mapping[str, str] | None) -> Context | None:
        """The span context sent in NATS headers or gRPC metadata, if any."""
        if not self.enabled or not headers or "traceparent" not in headers:
            return None
        found = _PROPAGATOR.extract(headers)
        return found if trace.get_current_span(found).get_span_context().is_valid else None

    async def force_flush(self) -> None:
        if self.provider is not None:
            await asyncio.to_thread(self.provider.force_flush)

    async def shutdown(self) -> None:
        """Export what is buffered, then stop (bounded by the exporter's own timeout)."""
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)


def trace_metadata(
    metadata: Sequence[tuple[str, str]] | None,
) -> Sequence[tuple[str, str]] | None:
    """gRPC call metadata plus the current span's `traceparent`, so a remote safety kernel's
    server span joins the job's trace. Unchanged when no span is being recorded."""
    if not trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return [*(metadata or ()), *carrier.items()]
