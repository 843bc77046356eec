"""Turns domain errors into rich gRPC statuses, for unary and streaming handlers alike."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import redis.exceptions
from grpc_status import rpc_status

from cordum.server.errors import CordumError, unavailable

logger = logging.getLogger(__name__)

# A store that cannot be reached (Redis down, restarting, or replaying its AOF) is a
# retryable UNAVAILABLE for the caller, not an UNKNOWN server error, whichever service hit it.
_UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def _unreachable(error: BaseException) -> CordumError:
    logger.warning("dependency unavailable: %r", error)
    return unavailable(f"dependency unavailable: {error}")


async def _abort(context: grpc.aio.ServicerContext, error: CordumError) -> None:
    await context.abort_with_status(rpc_status.to_status(error.to_status_proto()))


def _wrap_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except CordumError as error:
            await _abort(context, error)
        except _UNREACHABLE as error:
            await _abort(context, _unreachable(error))

    return wrapper


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except CordumError as error:
            await _abort(context, error)
        except _UNREACHABLE as error:
            await _abort(context, _unreachable(error))

    return wrapper


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once, not on every call: the inner handler is one object
    per method (the servicer's, wrapped once by the inner interceptors), so a call costs a
    dict lookup here, not a new closure and handler."""

    def __init__(self) -> None:
        # Per method: the inner handler and our wrapper of it.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self.wrap(method, handler))
        return cached[1]


class ErrorInterceptor(WrappingInterceptor):
    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return _wrap(handler)


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary), **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(_wrap_stream(handler.stream_stream), **kwargs)
    return handler
