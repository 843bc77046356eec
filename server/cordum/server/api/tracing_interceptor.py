"""A server span for every unary API call (installed only when tracing is on).

Hand-written rather than opentelemetry-instrumentation-grpc: it takes this App's tracer (no
global provider), sits outside the error interceptor so the span gets the final status code
of a domain error, and skips health checks and reflection. The caller's `traceparent`
metadata, when sent, makes the span a child of the caller's span.
"""

from __future__ import annotations

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from cordum.server.api.interceptors import WrappingInterceptor
from cordum.server.tracing import Tracing

# Infrastructure calls, polled often and of no interest in a trace.
_SKIPPED = ("/grpc.health.", "/grpc.reflection.")


class TracingInterceptor(WrappingInterceptor):
    def __init__(self, tracing: Tracing) -> None:
        super().__init__()
        self._tracing = tracing

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        if not behavior or method.startswith(_SKIPPED):
            return handler
        tracing = self._tracing
        name = method.removeprefix("/")
        service, _, rpc = name.rpartition("/")
        attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": rpc,
        }

        async def traced(request: object, context: grpc.aio.ServicerContext) -> object:
            metadata = {
                key: value
                for key, value in context.invocation_metadata() or ()
                if key in ("traceparent", "tracestate") and isinstance(value, str)
            }
            parent = tracing.extract(metadata)
            with tracing.span(name, parent, kind=SpanKind.SERVER, attributes=attributes) as span:
                code = grpc.StatusCode.OK
                try:
                    return await behavior(request, context)
                except BaseException:
                    code = grpc.StatusCode.UNKNOWN  # unless the handler set one (an abort)
                    raise
                finally:
                    code = context.code() or code
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code is not grpc.StatusCode.OK:
                        span.set_status(Status(StatusCode.ERROR, code.name))

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
