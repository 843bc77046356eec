"""CAP's `cordum.agent.v1.SafetyKernel` over gRPC: a thin adapter onto SafetyKernel.

Domain errors (`CordumError`, e.g. "policy not loaded") are turned into rich statuses by
the server's ErrorInterceptor, like every other service.
"""

from __future__ import annotations

import grpc

from cordum.agent.v1 import safety_pb2, safety_pb2_grpc
from cordum.server.api.metadata import caller
from cordum.server.safety.kernel import SafetyKernel


def _scoped(
    request: safety_pb2.PolicyCheckRequest, context: grpc.aio.ServicerContext
) -> safety_pb2.PolicyCheckRequest:
    """A key bound to one tenant asks about its own tenant only."""
    who = caller(context)
    who.check_tenant(request.tenant, "tenant")
    who.check_tenant(request.meta.tenant_id, "meta.tenant_id")
    if who.tenant is not None and not request.tenant:
        request.tenant = who.tenant
    return request


class SafetyKernelServicer(safety_pb2_grpc.SafetyKernelServicer):
    def __init__(self, kernel: SafetyKernel) -> None:
        self._kernel = kernel

    async def Check(
        self, request: safety_pb2.PolicyCheckRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.PolicyCheckResponse:
        return self._kernel.check(_scoped(request, context))

    async def Evaluate(
        self, request: safety_pb2.PolicyCheckRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.PolicyCheckResponse:
        return self._kernel.evaluate(_scoped(request, context))

    async def Explain(
        self, request: safety_pb2.PolicyCheckRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.PolicyCheckResponse:
        # CAP's response has no room for the trace; the platform API's explain endpoint
        # returns it (RuleEvaluation) from kernel.explain directly.
        return self._kernel.explain(_scoped(request, context)).response

    async def Simulate(
        self, request: safety_pb2.PolicyCheckRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.PolicyCheckResponse:
        return self._kernel.simulate(_scoped(request, context))

    async def ListSnapshots(
        self, request: safety_pb2.ListSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.ListSnapshotsResponse:
        return safety_pb2.ListSnapshotsResponse(snapshots=self._kernel.snapshots())
