"""``client.approvals``: jobs waiting for a human decision, and that decision."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import cast

from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.v1 import approval_pb2, approval_service_pb2, approval_service_pb2_grpc, job_pb2

__all__ = ["ApprovalsClient", "AsyncApprovalsClient"]

A = approval_service_pb2
Stub = approval_service_pb2_grpc.ApprovalServiceStub


class AsyncApprovalsClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> approval_service_pb2_grpc.ApprovalServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("approval_service_pb2_grpc.ApprovalServiceAsyncStub", self._t.stub(Stub))

    async def list_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> A.ListApprovalsResponse:
        request = A.ListApprovalsRequest(page_size=page_size or 0, page_token=page_token)
        return await self._t.unary(self._stub.ListApprovals, request)

    def list(self, *, page_size: int | None = None) -> AsyncIterator[approval_pb2.Approval]:
        """Every job awaiting approval, oldest first, with the decision that asked for it."""

        async def fetch(token: str, size: int | None) -> A.ListApprovalsResponse:
            return await self.list_page(page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.approvals, page_size=page_size)

    async def approve(self, job_id: str, reason: str = "", note: str = "") -> job_pb2.Job:
        """Approve the job; the server re-checks it against the current policy first."""
        request = A.ApproveJobRequest(job_id=job_id, reason=reason, note=note)
        return (await self._t.unary(self._stub.ApproveJob, request)).job

    async def reject(self, job_id: str, reason: str = "", note: str = "") -> job_pb2.Job:
        """Reject the job: it becomes DENIED."""
        request = A.RejectJobRequest(job_id=job_id, reason=reason, note=note)
        return (await self._t.unary(self._stub.RejectJob, request)).job


class ApprovalsClient:
    """The blocking twin of :class:`AsyncApprovalsClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def list_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> A.ListApprovalsResponse:
        request = A.ListApprovalsRequest(page_size=page_size or 0, page_token=page_token)
        return self._t.unary(self._stub.ListApprovals, request)

    def list(self, *, page_size: int | None = None) -> Iterator[approval_pb2.Approval]:
        def fetch(token: str, size: int | None) -> A.ListApprovalsResponse:
            return self.list_page(page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.approvals, page_size=page_size)

    def approve(self, job_id: str, reason: str = "", note: str = "") -> job_pb2.Job:
        request = A.ApproveJobRequest(job_id=job_id, reason=reason, note=note)
        return self._t.unary(self._stub.ApproveJob, request).job

    def reject(self, job_id: str, reason: str = "", note: str = "") -> job_pb2.Job:
        request = A.RejectJobRequest(job_id=job_id, reason=reason, note=note)
        return self._t.unary(self._stub.RejectJob, request).job
