"""A server span for every unary API call (installed only when tracing is on).

Hand-written rather than opentelemetry-instrumentation-grpc: it takes this App's tracer (no
global provider), sits outside the error interceptor so the span gets the final status code
of a domain error, and skips health checks and reflection. The caller's `traceparent`
metadata, when sent, makes the span a child of the caller's span.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from cordum.server.tracing import Tracing

# Infrastructure calls, polled often and of no interest in a trace.
_SKIPPED = ("/grpc.health.", "/grpc.reflection.")


class TracingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tracing: Tracing) -> None:
        self._tracing = tracing

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not handler.unary_unary or method.startswith(_SKIPPED):
            return handler
        tracing = self._tracing
        behavior = handler.unary_unary
        name = method.removeprefix("/")
        service, _, rpc = name.rpartition("/")
        metadata = {
            key: value
            for key, value in handler_call_details.invocation_metadata or ()
            if key in ("traceparent", "tracestate") and isinstance(value, str)
        }
        parent = tracing.extract(metadata)
        attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": rpc,
        }

        async def traced(request: object, context: grpc.aio.ServicerContext) -> object:
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
