"""JobService and ApprovalService over gRPC: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import struct_pb2

from cordum.server.api.metadata import caller, idempotency_key
from cordum.server.errors import CordumError
from cordum.server.services.approvals import ApprovalService
from cordum.server.services.jobs import JobService, Submitted, result_value
from cordum.server.stores.jobs import JobRecord
from cordum.v1 import (
    approval_pb2,
    approval_service_pb2,
    approval_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

Ctx = grpc.aio.ServicerContext


def _value(raw: object | None) -> struct_pb2.Value | None:
    if raw is None:
        return None
    # ListValue.append converts any JSON value (Struct's own conversion), ~3x faster than
    # json_format.ParseDict: it runs once per SubmitJobAndWait and GetJobResult.
    holder = struct_pb2.ListValue()
    holder.append(raw)
    return holder.values[0]


def _submit_response(s: Submitted) -> job_service_pb2.SubmitJobResponse:
    return job_service_pb2.SubmitJobResponse(
        job_id=s.job.id, trace_id=s.job.trace_id, job=s.job, idempotent_replay=s.replay
    )


def _result(record: JobRecord, raw: bytes | None) -> job_pb2.JobResult:
    job = record.job
    return job_pb2.JobResult(
        job_id=job.id,
        state=job.state,
        result=_value(result_value(raw)),
        result_ptr=job.result_ptr,
        artifact_ptrs=job.artifact_ptrs,
        worker_id=job.worker_id,
        execution_ms=job.execution_ms,
        error_code=job.error_code,
        error_message=job.error_message,
    )


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, service: JobService) -> None:
        self._jobs = service

    async def SubmitJob(
        self, request: job_service_pb2.SubmitJobRequest, context: Ctx
    ) -> job_service_pb2.SubmitJobResponse:
        submitted = await self._jobs.submit(request, caller(context), idempotency_key(context))
        return _submit_response(submitted)

    async def BatchSubmitJobs(
        self, request: job_service_pb2.BatchSubmitJobsRequest, context: Ctx
    ) -> job_service_pb2.BatchSubmitJobsResponse:
        outcomes = await self._jobs.submit_batch(list(request.jobs), caller(context))
        results = []
        for outcome in outcomes:
            if isinstance(outcome, CordumError):
                results.append(
                    job_service_pb2.BatchSubmitJobResult(error=outcome.to_status_proto())
                )
            else:
                results.append(
                    job_service_pb2.BatchSubmitJobResult(
                        job_id=outcome.job.id,
                        trace_id=outcome.job.trace_id,
                        idempotent_replay=outcome.replay,
                    )
                )
        return job_service_pb2.BatchSubmitJobsResponse(results=results)

    async def SubmitJobAndWait(
        self, request: job_service_pb2.SubmitJobAndWaitRequest, context: Ctx
    ) -> job_service_pb2.SubmitJobAndWaitResponse:
        submitted, record, raw = await self._jobs.submit_and_wait(
            request.job, request.timeout_ms, caller(context), idempotency_key(context)
        )
        job = record.job if record is not None else submitted.job
        done = record is not None and record.state in (
            "SUCCEEDED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "DENIED",
        )
        return job_service_pb2.SubmitJobAndWaitResponse(
            job_id=job.id,
            trace_id=job.trace_id,
            job=job,
            result=_value(result_value(raw)) if record and record.state == "SUCCEEDED" else None,
            done=done,
            idempotent_replay=submitted.replay,
        )

    async def GetJob(self, request: job_service_pb2.GetJobRequest, context: Ctx) -> job_pb2.Job:
        return (await self._jobs.get(request.job_id, caller(context))).job

    async def ListJobs(
        self, request: job_service_pb2.ListJobsRequest, context: Ctx
    ) -> job_service_pb2.ListJobsResponse:
        page = await self._jobs.list(request, caller(context))
        return job_service_pb2.ListJobsResponse(
            jobs=[r.job for r in page.records], next_page_token=page.next_token
        )

    async def CancelJob(
        self, request: job_service_pb2.CancelJobRequest, context: Ctx
    ) -> job_pb2.Job:
        return (await self._jobs.cancel(request.job_id, request.reason, caller(context))).job

    async def GetJobResult(
        self, request: job_service_pb2.GetJobResultRequest, context: Ctx
    ) -> job_pb2.JobResult:
        record, raw = await self._jobs.result(request.job_id, caller(context))
        return _result(record, raw)

    async def ListJobDecisions(
        self, request: job_service_pb2.ListJobDecisionsRequest, context: Ctx
    ) -> job_service_pb2.ListJobDecisionsResponse:
        decisions, token = await self._jobs.decisions(request, caller(context))
        return job_service_pb2.ListJobDecisionsResponse(decisions=decisions, next_page_token=token)

    async def RemediateJob(
        self, request: job_service_pb2.RemediateJobRequest, context: Ctx
    ) -> job_service_pb2.SubmitJobResponse:
        submitted = await self._jobs.remediate(
            request.job_id, request.remediation_id, caller(context)
        )
        return _submit_response(submitted)

    async def GetTrace(
        self, request: job_service_pb2.GetTraceRequest, context: Ctx
    ) -> job_service_pb2.GetTraceResponse:
        records = await self._jobs.trace(request.trace_id, caller(context))
        return job_service_pb2.GetTraceResponse(jobs=[r.job for r in records])

    async def WatchJob(
        self, request: job_service_pb2.WatchJobRequest, context: Ctx
    ) -> AsyncIterator[job_pb2.JobEvent]:
        async for event, record in self._jobs.watch(request.job_id, caller(context)):
            out = job_pb2.JobEvent()
            out.CopyFrom(event)
            out.job.CopyFrom(record.job)
            yield out


class ApprovalServicer(approval_service_pb2_grpc.ApprovalServiceServicer):
    def __init__(self, service: ApprovalService) -> None:
        self._approvals = service

    async def ListApprovals(
        self, request: approval_service_pb2.ListApprovalsRequest, context: Ctx
    ) -> approval_service_pb2.ListApprovalsResponse:
        page = await self._approvals.list(request.page_size, request.page_token, caller(context))
        return approval_service_pb2.ListApprovalsResponse(
            approvals=[
                approval_pb2.Approval(job=r.job, decision=r.job.safety) for r in page.records
            ],
            next_page_token=page.next_token,
        )

    async def ApproveJob(
        self, request: approval_service_pb2.ApproveJobRequest, context: Ctx
    ) -> approval_service_pb2.ApproveJobResponse:
        record = await self._approvals.approve(
            request.job_id, request.reason, request.note, caller(context)
        )
        return approval_service_pb2.ApproveJobResponse(
            job_id=record.job.id, trace_id=record.job.trace_id, job=record.job
        )

    async def RejectJob(
        self, request: approval_service_pb2.RejectJobRequest, context: Ctx
    ) -> approval_service_pb2.RejectJobResponse:
        record = await self._approvals.reject(
            request.job_id, request.reason, request.note, caller(context)
        )
        return approval_service_pb2.RejectJobResponse(job_id=record.job.id, job=record.job)
