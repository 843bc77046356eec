"""DLQService over gRPC: proto in, DLQService call, proto out."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cordum.agent.v1 import job_pb2 as agent
from cordum.server.api.metadata import caller
from cordum.server.services.dlq import DLQService
from cordum.server.stores.dlq import DLQRecord
from cordum.v1 import dlq_pb2, dlq_service_pb2, dlq_service_pb2_grpc

Ctx = grpc.aio.ServicerContext
D = dlq_service_pb2


def _status(name: str) -> agent.JobStatus.ValueType:
    try:
        return agent.JobStatus.Value(name)
    except ValueError:
        return agent.JOB_STATUS_UNSPECIFIED


def entry_proto(record: DLQRecord) -> dlq_pb2.DLQEntry:
    created = Timestamp()
    created.FromMilliseconds(record.created_ms)
    return dlq_pb2.DLQEntry(
        job_id=record.job_id,
        topic=record.topic,
        status=_status(record.status),
        reason=record.reason,
        reason_code=record.reason_code,
        last_state=record.last_state,
        attempts=record.attempts,
        created_at=created,
        tenant_id=record.tenant,
        trace_id=record.trace_id,
        retry_job_ids=record.retry_job_ids,
    )


class DLQServicer(dlq_service_pb2_grpc.DLQServiceServicer):
    def __init__(self, service: DLQService) -> None:
        self._dlq = service

    async def ListDLQEntries(
        self, request: D.ListDLQEntriesRequest, context: Ctx
    ) -> D.ListDLQEntriesResponse:
        entries, token = await self._dlq.list(
            request.page_size,
            request.page_token,
            request.topic,
            request.reason_code,
            caller(context),
        )
        return D.ListDLQEntriesResponse(
            entries=[entry_proto(e) for e in entries], next_page_token=token
        )

    async def GetDLQEntry(self, request: D.GetDLQEntryRequest, context: Ctx) -> dlq_pb2.DLQEntry:
        return entry_proto(await self._dlq.get(request.job_id, caller(context)))

    async def DeleteDLQEntry(
        self, request: D.DeleteDLQEntryRequest, context: Ctx
    ) -> D.DeleteDLQEntryResponse:
        await self._dlq.delete(request.job_id, caller(context))
        return D.DeleteDLQEntryResponse()

    async def RetryDLQEntry(
        self, request: D.RetryDLQEntryRequest, context: Ctx
    ) -> D.RetryDLQEntryResponse:
        submitted = await self._dlq.retry(request.job_id, caller(context))
        job = submitted.job
        return D.RetryDLQEntryResponse(job_id=job.id, trace_id=job.trace_id, job=job)
