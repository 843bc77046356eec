"""Counts and times every RPC (Prometheus), whatever its outcome."""

from __future__ import annotations

import time

import grpc
from prometheus_client import Counter

from cordum.server.api.interceptors import WrappingInterceptor
from cordum.server.metrics import Metrics


class MetricsInterceptor(WrappingInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        if not behavior:
            return handler
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
