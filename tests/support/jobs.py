"""Helpers for the job-path tests: stubs, state waits, error details, DLQ and workers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cordum.agent.v1 import buspacket_pb2
from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.v1 import (
    approval_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

from support.waiting import eventually

J = job_service_pb2
S = job_pb2


def jobs(channel: grpc.aio.Channel) -> job_service_pb2_grpc.JobServiceStub:
    return job_service_pb2_grpc.JobServiceStub(channel)


def approvals(channel: grpc.aio.Channel) -> approval_service_pb2_grpc.ApprovalServiceStub:
    return approval_service_pb2_grpc.ApprovalServiceStub(channel)


def state(name: str) -> int:
    return job_pb2.JobState.Value(f"JOB_STATE_{name}")


def json_value(data: object) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


async def wait_state(
    stub: job_service_pb2_grpc.JobServiceStub,
    job_id: str,
    *names: str,
    within: float = 10.0,
) -> job_pb2.Job:
    """Poll GetJob until the job is in one of `names` (a job not stored yet, e.g. one
    submitted on the bus, counts as not there yet)."""
    wanted = {state(n) for n in names}

    async def get() -> job_pb2.Job | None:
        try:
            return await stub.GetJob(J.GetJobRequest(job_id=job_id))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    job = await eventually(
        get,
        until=lambda j: j is not None and j.state in wanted,
        within=within,
        what=f"{job_id} in {names}",
    )
    assert job is not None
    return job


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations carried by a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin in the trailing metadata"
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def dlq_entry(app: App, job_id: str) -> dict[str, str]:
    """The `dlq:<id>` hash under the app's namespace ({} when there is none)."""
    assert app.redis is not None
    raw = await app.redis.hgetall(f"{app.settings.namespace}dlq:{job_id}")
    return {k.decode(): v.decode() for k, v in raw.items()}


async def wait_dlq(app: App, job_id: str, within: float = 10.0) -> dict[str, str]:
    return await eventually(lambda: dlq_entry(app, job_id), within=within, what=f"dlq:{job_id}")


async def events(app: App, job_id: str) -> list[tuple[int, str, str]]:
    assert app.store is not None
    return await app.store.events(job_id)


async def raw_fields(app: App, job_id: str) -> dict[str, str]:
    assert app.store is not None
    raw = await app.redis.hgetall(app.store.job_key(job_id))  # type: ignore[union-attr]
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}


def make_worker(worker_id: str, nats_url: str, redis_url: str, **kwargs: Any) -> Worker:
    kwargs.setdefault("heartbeat_interval", 0.2)
    return Worker(worker_id=worker_id, nats_url=nats_url, redis_url=redis_url, **kwargs)


def result_packet(
    job_id: str,
    status: int,
    *,
    worker_id: str = "hand-made",
    result_ptr: str = "",
    error_message: str = "",
    error_code: str = "",
) -> bytes:
    """A JobResult as a worker would publish it on sys.job.result."""
    result = agent.JobResult(
        job_id=job_id,
        status=status,  # type: ignore[arg-type]
        worker_id=worker_id,
        result_ptr=result_ptr,
        error_message=error_message,
        error_code=error_code,
    )
    packet = cap.envelope(sender_id=worker_id, trace_id=job_id, job_result=result)
    return cap.encode(packet)


def submit_packet(request: agent.JobRequest, trace_id: str) -> bytes:
    packet: buspacket_pb2.BusPacket = cap.envelope(
        sender_id="test-client", trace_id=trace_id, job_request=request
    )
    return cap.encode(packet)


def labels_of(job: job_pb2.Job) -> Mapping[str, str]:
    return dict(job.labels)
