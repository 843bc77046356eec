"""Optional OpenTelemetry tracing for the worker runtime.

With ``opentelemetry-api`` installed (``pip install 'cordum[tracing]'``), each job gets a
``cordum.job.handle`` span: a child of the dispatch span whose W3C ``traceparent`` the control
plane sends in the NATS message headers, current while the handler runs (so the handler's own
spans nest under it), and sent on in the headers of the job's result. The CAP payload is
never touched. Without the package every call here is a no-op.

The tracer comes from the ``tracer_provider`` given to the Worker, else from OTel's global
provider: a library must not configure exporters, the application does (and until it does,
the global provider records nothing, though the incoming context is still passed on, so the
control plane's trace stays connected).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # tracing is optional
    trace = None  # type: ignore[assignment]


class WorkerTracing:
    def __init__(self, tracer_provider: Any | None, version: str) -> None:
        self.enabled = trace is not None
        if trace is None:
            return
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self._tracer = provider.get_tracer("cordum.sdk.worker", version)
        self._propagator = TraceContextTextMapPropagator()

    def start_job(self, headers: Mapping[str, str] | None, attributes: dict[str, Any]) -> Any:
        """The job's span (not yet current), child of the context in `headers` if any."""
        if trace is None:
            return None
        parent = self._propagator.extract(headers) if headers else Context()
        return self._tracer.start_span(
            "cordum.job.handle", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )

    def use(self, span: Any) -> AbstractContextManager[Any]:
        """Make `span` current in a `with` block (ended at its exit)."""
        if span is None:
            return nullcontext()
        return trace.use_span(span, end_on_exit=True)  # type: ignore[union-attr]

    def finish(self, span: Any, status_name: str, error: str = "") -> None:
        """Record the job's outcome on its span (it ends with `use`'s block)."""
        if span is None:
            return
        span.set_attribute("cordum.job.status", status_name)
        if status_name != "JOB_STATUS_SUCCEEDED":
            span.set_status(Status(StatusCode.ERROR, error or status_name))

    def headers(self, span: Any) -> dict[str, str] | None:
        """NATS headers carrying `span` (the job's result continues its trace)."""
        if span is None or not span.get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))  # type: ignore[union-attr]
        return carrier or None
