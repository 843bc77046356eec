"""``client.dlq``: the dead-letter queue, the jobs that ended without success (failed, timed
out, denied), kept for inspection and retry::

    async for entry in client.dlq.list(reason_code="safety_denied"):
        print(entry.job_id, entry.reason)
    retried = await client.dlq.retry(entry.job_id)   # a new job, linked by parent_job_id

A retry is a new job (``<id>-retry-<n>``) with the original's input, labels, metadata,
budget and priority; it passes the safety gate again. The entry is kept (its
``retry_job_ids`` name the retries) until deleted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import cast

from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.v1 import dlq_pb2, dlq_service_pb2, dlq_service_pb2_grpc

__all__ = ["AsyncDLQClient", "DLQClient"]

D = dlq_service_pb2
Stub = dlq_service_pb2_grpc.DLQServiceStub


def _list_request(
    topic: str | None, reason_code: str | None, page_size: int | None, page_token: str
) -> D.ListDLQEntriesRequest:
    return D.ListDLQEntriesRequest(
        topic=topic or "",
        reason_code=reason_code or "",
        page_size=page_size or 0,
        page_token=page_token,
    )


class AsyncDLQClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> dlq_service_pb2_grpc.DLQServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("dlq_service_pb2_grpc.DLQServiceAsyncStub", self._t.stub(Stub))

    async def list_page(
        self,
        *,
        topic: str | None = None,
        reason_code: str | None = None,
        page_size: int | None = None,
        page_token: str = "",
    ) -> D.ListDLQEntriesResponse:
        """One page of entries, newest first."""
        request = _list_request(topic, reason_code, page_size, page_token)
        return await self._t.unary(self._stub.ListDLQEntries, request)

    def list(
        self,
        *,
        topic: str | None = None,
        reason_code: str | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[dlq_pb2.DLQEntry]:
        """Every entry (of ``topic``, with ``reason_code`` such as ``safety_denied``,
        ``max_retries_exceeded``, ``timeout`` or a worker's error code), newest first."""

        async def fetch(token: str, size: int | None) -> D.ListDLQEntriesResponse:
            return await self.list_page(
                topic=topic, reason_code=reason_code, page_size=size, page_token=token
            )

        return apaginate(fetch, lambda p: p.entries, page_size=page_size, limit=limit)

    async def get(self, job_id: str) -> dlq_pb2.DLQEntry:
        return await self._t.unary(self._stub.GetDLQEntry, D.GetDLQEntryRequest(job_id=job_id))

    async def delete(self, job_id: str) -> None:
        await self._t.unary(self._stub.DeleteDLQEntry, D.DeleteDLQEntryRequest(job_id=job_id))

    async def retry(self, job_id: str) -> D.RetryDLQEntryResponse:
        """Submit a new job from the entry; the reply names it and holds it."""
        request = D.RetryDLQEntryRequest(job_id=job_id)
        return await self._t.unary(self._stub.RetryDLQEntry, request)


class DLQClient:
    """The blocking twin of :class:`AsyncDLQClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def list_page(
        self,
        *,
        topic: str | None = None,
        reason_code: str | None = None,
        page_size: int | None = None,
        page_token: str = "",
    ) -> D.ListDLQEntriesResponse:
        request = _list_request(topic, reason_code, page_size, page_token)
        return self._t.unary(self._stub.ListDLQEntries, request)

    def list(
        self,
        *,
        topic: str | None = None,
        reason_code: str | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[dlq_pb2.DLQEntry]:
        def fetch(token: str, size: int | None) -> D.ListDLQEntriesResponse:
            return self.list_page(
                topic=topic, reason_code=reason_code, page_size=size, page_token=token
            )

        return paginate(fetch, lambda p: p.entries, page_size=page_size, limit=limit)

    def get(self, job_id: str) -> dlq_pb2.DLQEntry:
        return self._t.unary(self._stub.GetDLQEntry, D.GetDLQEntryRequest(job_id=job_id))

    def delete(self, job_id: str) -> None:
        self._t.unary(self._stub.DeleteDLQEntry, D.DeleteDLQEntryRequest(job_id=job_id))

    def retry(self, job_id: str) -> D.RetryDLQEntryResponse:
        return self._t.unary(self._stub.RetryDLQEntry, D.RetryDLQEntryRequest(job_id=job_id))
