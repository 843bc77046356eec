"""max_retries: a failing job runs exactly 1 + max_retries times, then FAILED with a DLQ
entry; without retries it runs once."""

from __future__ import annotations

from typing import Any

import grpc

from cordum.sdk.worker import JobFailed
from cordum.server.app import App

from support.jobs import J, events, jobs, make_worker, wait_dlq, wait_state


async def test_failing_job_is_retried_max_retries_times_then_dead_lettered(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.flaky.{prefix}"
    calls: list[str] = []
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def fail(ctx: Any, data: Any) -> Any:
        calls.append(ctx.job_id)
        raise JobFailed(f"attempt {len(calls)} broke", code="broken")

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, max_retries=2))
        failed = await wait_state(stub, reply.job_id, "FAILED", within=15)
    assert calls == [reply.job_id] * 3
    assert failed.attempts == 3
    assert failed.max_retries == 2
    assert failed.error_code == "broken"
    assert failed.error_message == "handler failed: attempt 3 broke"
    entry = await wait_dlq(cordum, reply.job_id)
    assert entry["reason_code"] == "broken"
    assert entry["status"] == "JOB_STATUS_FAILED"
    assert entry["attempts"] == "3"
    assert entry["reason"] == "handler failed: attempt 3 broke"
    states = [s for _, s, _ in await events(cordum, reply.job_id)]
    assert states == [
        "PENDING",
        "DISPATCHED",
        "PENDING",
        "DISPATCHED",
        "PENDING",
        "DISPATCHED",
        "FAILED",
    ]


async def test_failing_job_without_retries_runs_once(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.flaky.{prefix}"
    calls: list[str] = []
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def fail(ctx: Any, data: Any) -> Any:
        calls.append(ctx.job_id)
        raise RuntimeError("secret detail that must not leak")

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        failed = await wait_state(stub, reply.job_id, "FAILED")
        entry = await wait_dlq(cordum, reply.job_id)
    assert calls == [reply.job_id]
    assert failed.attempts == 1
    assert failed.error_message == "handler failed"
    assert entry["reason_code"] == "RuntimeError"
    assert entry["attempts"] == "1"
    assert entry["last_state"] == "DISPATCHED"


async def test_constraint_caps_the_retries_a_job_asked_for(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.constrained.{prefix}"  # the policy caps max_retries at 1
    calls: list[str] = []
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def fail(ctx: Any, data: Any) -> Any:
        calls.append(ctx.job_id)
        raise JobFailed("no")

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, max_retries=5))
        failed = await wait_state(stub, reply.job_id, "FAILED", within=15)
    assert len(calls) == 2
    assert failed.attempts == 2
    assert failed.max_retries == 1
    assert (await wait_dlq(cordum, reply.job_id))["reason_code"] == "JobFailed"
