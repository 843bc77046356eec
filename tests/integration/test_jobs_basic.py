"""The job path end to end, in process: submit → safety → scheduler → worker → result."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf import json_format, struct_pb2

from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

from support.waiting import eventually

J = job_service_pb2


def json_value(data: object) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


@pytest_asyncio.fixture
async def echo_worker(nats_url: str, redis_url: str, prefix: str) -> AsyncIterator[Worker]:
    worker = Worker(
        worker_id=f"w-{prefix}", nats_url=nats_url, redis_url=redis_url, heartbeat_interval=0.2
    )

    @worker.handler(f"job.t.ok.{prefix}")
    async def echo(ctx, data):  # type: ignore[no-untyped-def]
        return {"echo": data, "job_id": ctx.job_id}

    async with worker:
        yield worker


async def test_submit_runs_on_a_worker_and_the_result_is_readable(
    cordum: App, channel: grpc.aio.Channel, echo_worker: Worker, prefix: str
) -> None:
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    reply = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="hello", topic=f"job.t.ok.{prefix}", labels={"a": "b"})
    )
    assert reply.job.state == job_pb2.JOB_STATE_PENDING

    async def job() -> job_pb2.Job:
        return await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))

    done = await eventually(job, until=lambda j: j.state == job_pb2.JOB_STATE_SUCCEEDED)
    assert done.worker_id == echo_worker.worker_id
    assert done.attempts == 1
    assert done.result_ptr == f"redis://res:{reply.job_id}"
    result = await stub.GetJobResult(J.GetJobResultRequest(job_id=reply.job_id))
    assert result.result.struct_value.fields["job_id"].string_value == reply.job_id
    echoed = result.result.struct_value.fields["echo"].struct_value.fields
    assert echoed["prompt"].string_value == "hello"


async def test_submit_and_wait_returns_the_result_in_one_call(
    channel: grpc.aio.Channel, echo_worker: Worker, prefix: str
) -> None:
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    reply = await stub.SubmitJobAndWait(
        J.SubmitJobAndWaitRequest(
            job=J.SubmitJobRequest(topic=f"job.t.ok.{prefix}", input=json_value({"n": 1})),
            timeout_ms=10_000,
        )
    )
    assert reply.done
    assert reply.job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert reply.result.struct_value.fields["echo"].struct_value.fields["n"].number_value == 1


async def test_bad_input_is_refused_naming_each_field_and_nothing_is_written(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitJob(
            J.SubmitJobRequest(
                job_id=f"bad id {prefix}", topic="not-a-topic", priority="urgent", prompt="x"
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    for name in ("job_id", "topic", "priority"):
        assert name in details
    assert cordum.redis is not None
    assert not await cordum.redis.keys(f"*{prefix}*")
