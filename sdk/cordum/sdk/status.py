"""``client.status``: platform health and the workers it knows."""

from __future__ import annotations

from typing import cast

from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.v1 import status_pb2, status_service_pb2, status_service_pb2_grpc

__all__ = ["AsyncStatusClient", "StatusClient"]

St = status_service_pb2
Stub = status_service_pb2_grpc.StatusServiceStub


class AsyncStatusClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> status_service_pb2_grpc.StatusServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("status_service_pb2_grpc.StatusServiceAsyncStub", self._t.stub(Stub))

    async def get(self) -> St.GetStatusResponse:
        return await self._t.unary(self._stub.GetStatus, St.GetStatusRequest())

    async def workers(self, *, include_lost: bool = False) -> list[status_pb2.Worker]:
        """Workers known from heartbeats; ``include_lost`` adds those that went quiet."""
        reply = await self._t.unary(
            self._stub.ListWorkers, St.ListWorkersRequest(include_lost=include_lost)
        )
        return list(reply.workers)


class StatusClient:
    """The blocking twin of :class:`AsyncStatusClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def get(self) -> St.GetStatusResponse:
        return self._t.unary(self._stub.GetStatus, St.GetStatusRequest())

    def workers(self, *, include_lost: bool = False) -> list[status_pb2.Worker]:
        reply = self._t.unary(
            self._stub.ListWorkers, St.ListWorkersRequest(include_lost=include_lost)
        )
        return list(reply.workers)
