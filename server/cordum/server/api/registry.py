"""Which gRPC services exist, and a stand-in for the ones this build does not serve yet.

A service that is in the contract but not implemented answers UNIMPLEMENTED with reason
NOT_IMPLEMENTED (HTTP 501 through Envoy) instead of being unknown, so reflection, Envoy
and clients see the whole surface from day one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from cordum.agent.v1 import safety_pb2
from cordum.server.errors import CordumError
from cordum.v1 import (
    approval_service_pb2,
    artifact_service_pb2,
    config_service_pb2,
    context_service_pb2,
    dlq_service_pb2,
    error_reason_pb2,
    event_service_pb2,
    job_service_pb2,
    lock_service_pb2,
    memory_service_pb2,
    policy_service_pb2,
    run_service_pb2,
    schema_service_pb2,
    status_service_pb2,
    workflow_service_pb2,
)

_PLATFORM_MODULES: tuple[ModuleType, ...] = (
    approval_service_pb2,
    artifact_service_pb2,
    config_service_pb2,
    context_service_pb2,
    dlq_service_pb2,
    event_service_pb2,
    job_service_pb2,
    lock_service_pb2,
    memory_service_pb2,
    policy_service_pb2,
    run_service_pb2,
    schema_service_pb2,
    status_service_pb2,
    workflow_service_pb2,
)


def platform_services() -> list[ServiceDescriptor]:
    """Every `cordum.v1` service, sorted by full name."""
    services = [s for m in _PLATFORM_MODULES for s in m.DESCRIPTOR.services_by_name.values()]
    return sorted(services, key=lambda s: s.full_name)


def safety_kernel_service() -> ServiceDescriptor:
    return safety_pb2.DESCRIPTOR.services_by_name["SafetyKernel"]


def _error(method: str) -> CordumError:
    return CordumError(
        grpc.StatusCode.UNIMPLEMENTED,
        error_reason_pb2.ERROR_REASON_NOT_IMPLEMENTED,
        f"{method} is not served by this build yet",
    )


def unimplemented_handler(service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        name = f"/{service.full_name}/{method.name}"
        if method.server_streaming:

            async def stream(request: Any, context: Any, _name: str = name) -> AsyncIterator[Any]:
                raise _error(_name)
                yield  # pragma: no cover - makes this an async generator

            handler = (
                grpc.stream_stream_rpc_method_handler(stream)
                if method.client_streaming
                else grpc.unary_stream_rpc_method_handler(stream)
            )
        else:

            async def unary(request: Any, context: Any, _name: str = name) -> Any:
                raise _error(_name)

            handler = (
                grpc.stream_unary_rpc_method_handler(unary)
                if method.client_streaming
                else grpc.unary_unary_rpc_method_handler(unary)
            )
        handlers[method.name] = handler
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
