"""Reading jobs back: list filters, page tokens (stable under ties), traces, watch streams,
decision pages."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cordum.server.app import App
from cordum.v1 import approval_service_pb2 as A
from cordum.v1 import job_pb2

from support.jobs import J, approvals, field_violations, jobs, make_worker, state, wait_state
from support.waiting import eventually


def ts(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


async def list_all(stub: Any, request: J.ListJobsRequest) -> list[job_pb2.Job]:
    out: list[job_pb2.Job] = []
    token = ""
    for _ in range(100):
        page_request = J.ListJobsRequest()
        page_request.CopyFrom(request)
        page_request.page_token = token
        page = await stub.ListJobs(page_request)
        assert len(page.jobs) <= request.page_size
        out.extend(page.jobs)
        token = page.next_page_token
        if not token:
            return out
    raise AssertionError("paging did not end")


async def test_list_filters_by_state_topic_tenant_trace_and_time(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    tenant = f"tl-{prefix}"
    denied_topic, held_topic = f"job.t.deny.{prefix}", f"job.t.approve.{prefix}"
    trace = f"trace-{prefix}"
    denied = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="x", topic=denied_topic, tenant_id=tenant, trace_id=trace)
    )
    held = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=held_topic, tenant_id=tenant))
    other_tenant = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="x", topic=held_topic, tenant_id=f"other-{prefix}")
    )
    await wait_state(stub, denied.job_id, "DENIED")
    held_job = await wait_state(stub, held.job_id, "APPROVAL_REQUIRED")
    await wait_state(stub, other_tenant.job_id, "APPROVAL_REQUIRED")

    async def ids(**filters: Any) -> set[str]:
        found = await list_all(stub, J.ListJobsRequest(page_size=10, tenant_id=tenant, **filters))
        return {j.id for j in found}

    assert await ids() == {denied.job_id, held.job_id}
    assert await ids(state="DENIED") == {denied.job_id}
    assert await ids(state="job_state_approval_required") == {held.job_id}
    assert await ids(topic=held_topic) == {held.job_id}
    assert await ids(trace_id=trace) == {denied.job_id}
    assert await ids(state="SUCCEEDED") == set()
    updated = held_job.updated_at.ToMilliseconds()
    assert held.job_id in await ids(updated_after=ts(updated - 1), updated_before=ts(updated + 1))
    assert await ids(updated_after=ts(updated + 60_000)) == set()
    assert await ids(updated_before=ts(1)) == set()

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListJobs(J.ListJobsRequest(state="ALMOST_DONE"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(info.value)) == {"state"}
    for job_id in (held.job_id, other_tenant.job_id):
        await stub.CancelJob(J.CancelJobRequest(job_id=job_id))


async def test_pages_have_no_duplicates_and_no_gaps_under_ties(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    tenant = f"tp-{prefix}"
    # Throttled jobs stay PENDING with the updated time of their (shared) submit batch.
    reply = await stub.BatchSubmitJobs(
        J.BatchSubmitJobsRequest(
            jobs=[
                J.SubmitJobRequest(prompt="x", topic=f"job.t.throttle.{prefix}", tenant_id=tenant)
                for _ in range(30)
            ]
        )
    )
    submitted = {r.job_id for r in reply.results}
    assert len(submitted) == 30
    try:
        found = await list_all(stub, J.ListJobsRequest(page_size=7, tenant_id=tenant))
        found_ids = [j.id for j in found]
        assert len(found_ids) == len(set(found_ids)), "a job was listed twice"
        assert set(found_ids) == submitted, "a job was skipped"
        times = [j.updated_at.ToMilliseconds() for j in found]
        assert len(set(times)) < len(times), "the test needs jobs that share updated_ms"
        # Newest first, ties by id (descending).
        keys = [(j.updated_at.ToMilliseconds(), j.id) for j in found]
        assert keys == sorted(keys, reverse=True)

        first = await stub.ListJobs(J.ListJobsRequest(page_size=7, tenant_id=tenant))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListJobs(
                J.ListJobsRequest(
                    page_size=7,
                    tenant_id=tenant,
                    state="PENDING",
                    page_token=first.next_page_token,
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(info.value)) == {"page_token"}
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await stub.ListJobs(J.ListJobsRequest(tenant_id=tenant, page_token="not-a-token"))
        assert set(field_violations(garbage.value)) == {"page_token"}
    finally:
        await asyncio.gather(
            *(stub.CancelJob(J.CancelJobRequest(job_id=job_id)) for job_id in submitted)
        )


async def test_trace_lists_every_job_of_the_trace(channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    trace = f"trace-{prefix}"
    submitted = [
        await stub.SubmitJob(
            J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}.n{i}", trace_id=trace)
        )
        for i in range(3)
    ]
    reply = await stub.GetTrace(J.GetTraceRequest(trace_id=trace))
    assert [j.id for j in reply.jobs] == [s.job_id for s in submitted]
    assert all(j.trace_id == trace for j in reply.jobs)
    paged = await list_all(stub, J.ListJobsRequest(page_size=2, trace_id=trace))
    assert {j.id for j in paged} == {s.job_id for s in submitted}
    empty = await stub.GetTrace(J.GetTraceRequest(trace_id=f"nothing-{prefix}"))
    assert list(empty.jobs) == []


async def test_watch_streams_state_changes_and_ends(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.watch.{prefix}"
    # The job waits PENDING until a worker with the placement label appears.
    reply = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="x", topic=topic, labels={"placement.zone": prefix})
    )
    seen: list[int] = []

    async def watch() -> None:
        async for event in stub.WatchJob(J.WatchJobRequest(job_id=reply.job_id)):
            seen.append(event.state)
            assert event.job.id == reply.job_id

    watcher = asyncio.create_task(watch())
    await eventually(lambda: _ready(seen), what="the first watch event")
    job = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
    assert job.state == state("PENDING")
    assert "waiting for a live worker" in job.pending_reason

    worker = make_worker(f"w-{prefix}", nats_url, redis_url, labels={"zone": prefix})

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"ok": True}

    async with worker:
        await asyncio.wait_for(watcher, 15)  # the stream ends by itself at SUCCEEDED
    distinct = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
    assert distinct == [state("PENDING"), state("DISPATCHED"), state("SUCCEEDED")]
    done = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
    assert done.worker_id == worker.worker_id


async def _ready(seen: list[int]) -> bool:
    return bool(seen)


async def test_watch_of_a_finished_job_sends_one_event(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}"))
    await wait_state(stub, reply.job_id, "DENIED")
    events = [e async for e in stub.WatchJob(J.WatchJobRequest(job_id=reply.job_id))]
    assert [e.state for e in events] == [state("DENIED")]


async def test_decisions_are_paged_newest_first(channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.throttle.{prefix}"))
    try:

        async def count() -> int:
            page = await stub.ListJobDecisions(
                J.ListJobDecisionsRequest(job_id=reply.job_id, page_size=50)
            )
            return len(page.decisions)

        await eventually(count, until=lambda n: n >= 4, what="4 decisions")
        first = await stub.ListJobDecisions(
            J.ListJobDecisionsRequest(job_id=reply.job_id, page_size=2)
        )
        assert len(first.decisions) == 2 and first.next_page_token
        times = [d.checked_at.ToMilliseconds() for d in first.decisions]
        assert times == sorted(times, reverse=True)
        second = await stub.ListJobDecisions(
            J.ListJobDecisionsRequest(
                job_id=reply.job_id, page_size=2, page_token=first.next_page_token
            )
        )
        assert second.decisions[0].checked_at.ToMilliseconds() <= times[-1]
    finally:
        await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))


async def test_watch_follows_a_job_through_its_approval(
    channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.approve.{prefix}"
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
    await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
    seen: list[int] = []

    async def watch() -> None:
        async for event in stub.WatchJob(J.WatchJobRequest(job_id=reply.job_id)):
            seen.append(event.state)

    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {}

    async with worker:
        watcher = asyncio.create_task(watch())
        await eventually(lambda: _ready(seen), what="the first watch event")
        await approvals(channel).ApproveJob(A.ApproveJobRequest(job_id=reply.job_id))
        await asyncio.wait_for(watcher, 30)
    assert seen == [
        state("APPROVAL_REQUIRED"),
        state("PENDING"),
        state("DISPATCHED"),
        state("SUCCEEDED"),
    ]
