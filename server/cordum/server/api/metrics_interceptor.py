"""Counts and times every RPC (Prometheus), whatever its outcome."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc

from cordum.server.metrics import Metrics


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.unary_unary:
            return handler
        method = handler_call_details.method
        behavior = handler.unary_unary
        metrics = self._metrics

        async def timed(request: object, context: grpc.aio.ServicerContext) -> object:
            start = time.perf_counter()
            code = "OK"
            try:
                return await behavior(request, context)
            except BaseException:
                code = "ERROR"
                raise
            finally:
                if context.code() not in (None, grpc.StatusCode.OK):
                    code = context.code().name
                metrics.rpc_requests.labels(method, code).inc()
                metrics.rpc_latency.labels(method).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
