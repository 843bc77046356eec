"""Counts and times every RPC (Prometheus), whatever its outcome."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client import Counter

from cordum.server.metrics import Metrics


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # Per method: the inner handler and our wrapper of it. The inner handler is one object
        # per method (the inner interceptors wrap once), so a call costs a dict lookup here,
        # not a new closure and handler.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.unary_unary:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._timed(method, handler))
            self._wrapped[method] = cached
        return cached[1]

    def _timed(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        metrics = self._metrics
        # Label children resolved once per method (and status code), not per call.
        latency = metrics.rpc_latency.labels(method)
        counts: dict[str, Counter] = {}

        async def timed(request: object, context: grpc.aio.ServicerContext) -> object:
            start = time.perf_counter()
            code = "OK"
            try:
                return await behavior(request, context)
            except BaseException:
                code = "ERROR"
                raise
            finally:
                status = context.code()
                if status is not None and status is not grpc.StatusCode.OK:
                    code = status.name
                count = counts.get(code)
                if count is None:
                    count = counts[code] = metrics.rpc_requests.labels(method, code)
                count.inc()
                latency.observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
