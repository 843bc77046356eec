"""Cancelling jobs: before dispatch, while running (the worker is told, its late result is
discarded), after the end (refused), twice (idempotent)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from cordum.server.app import App

from support.jobs import J, dlq_entry, events, jobs, make_worker, state, wait_state
from support.waiting import eventually


async def test_cancel_before_dispatch(cordum: App, channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.approve.{prefix}"))
    await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
    cancelled = await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id, reason="changed mind"))
    assert cancelled.state == state("CANCELLED")
    assert cancelled.attempts == 0
    log = await events(cordum, reply.job_id)
    assert [s for _, s, _ in log] == ["PENDING", "APPROVAL_REQUIRED", "CANCELLED"]
    assert "changed mind" in log[-1][2]


async def test_cancel_while_running_stops_the_worker_and_discards_its_result(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.slow.{prefix}"
    started = asyncio.Event()
    stopped = asyncio.Event()
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def slow(ctx: Any, data: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return {"never": True}

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        await asyncio.wait_for(started.wait(), 10)
        cancelled = await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id, reason="stop"))
        assert cancelled.state == state("CANCELLED")
        # The worker got the cancel and stopped its handler...
        await asyncio.wait_for(stopped.wait(), 10)

        # ...and its (CANCELLED) result, arriving after the end, is recorded and ignored.
        async def ignored() -> list[str]:
            return [m for _, _, m in await events(cordum, reply.job_id) if "ignored" in m]

        notes = await eventually(ignored, what="the late result in the event log")
        assert f"from w-{prefix}" in notes[0]
    job = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
    assert job.state == state("CANCELLED")
    assert job.attempts == 1
    assert await dlq_entry(cordum, reply.job_id) == {}


async def test_cancelling_a_finished_job_is_refused(channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}"))
    await wait_state(stub, reply.job_id, "DENIED")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    job = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
    assert job.state == state("DENIED")


async def test_cancelling_twice_is_idempotent(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.approve.{prefix}"))
    await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
    first = await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))
    second = await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))
    assert first.state == second.state == state("CANCELLED")
    assert first.updated_at == second.updated_at
    cancels = [s for _, s, _ in await events(cordum, reply.job_id) if s == "CANCELLED"]
    assert len(cancels) == 1


async def test_cancelling_an_unknown_job_is_not_found(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await jobs(channel).CancelJob(J.CancelJobRequest(job_id=f"missing-{prefix}"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
