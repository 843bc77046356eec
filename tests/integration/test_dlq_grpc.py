"""DLQService over native gRPC: denied and failed jobs appear, listing (newest first, page
tokens, filters), get, delete, and retry as a new linked job that keeps the original's
labels, metadata, budget and priority and passes the safety gate again."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk.worker import JobFailed
from cordum.server.app import App
from cordum.server.errors import CordumError
from cordum.server.services.caller import Caller
from cordum.v1 import dlq_service_pb2, dlq_service_pb2_grpc, job_pb2

from support.admin import error_reason, field_violations
from support.jobs import J, jobs, json_value, make_worker, wait_dlq, wait_state

D = dlq_service_pb2


def stub(channel: grpc.aio.Channel) -> dlq_service_pb2_grpc.DLQServiceStub:
    return dlq_service_pb2_grpc.DLQServiceStub(channel)


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def denied_job(channel: grpc.aio.Channel, cordum: App, topic: str, **fields: Any) -> str:
    reply = await jobs(channel).SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, **fields))
    await wait_state(jobs(channel), reply.job_id, "DENIED")
    await wait_dlq(cordum, reply.job_id)
    return reply.job_id


async def test_a_denied_job_is_listed_and_readable(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    dlq = stub(channel)
    topic = f"job.t.deny.{prefix}"
    job_id = await denied_job(channel, cordum, topic, trace_id=f"trace-{prefix}")

    page = await dlq.ListDLQEntries(D.ListDLQEntriesRequest(topic=topic))
    assert [e.job_id for e in page.entries] == [job_id]
    assert page.next_page_token == ""
    entry = page.entries[0]
    assert entry.topic == topic
    assert entry.status == agent.JOB_STATUS_DENIED
    assert (entry.reason_code, entry.reason) == ("safety_denied", "denied by the test policy")
    assert (entry.tenant_id, entry.trace_id) == ("default", f"trace-{prefix}")
    assert entry.last_state in ("", "PENDING")
    assert entry.created_at.seconds > 0
    assert list(entry.retry_job_ids) == []

    assert await dlq.GetDLQEntry(D.GetDLQEntryRequest(job_id=job_id)) == entry
    both = await dlq.ListDLQEntries(
        D.ListDLQEntriesRequest(topic=topic, reason_code="safety_denied")
    )
    assert [e.job_id for e in both.entries] == [job_id]
    other = await dlq.ListDLQEntries(D.ListDLQEntriesRequest(topic=topic, reason_code="broken"))
    assert list(other.entries) == []
    by_code = await dlq.ListDLQEntries(
        D.ListDLQEntriesRequest(reason_code="safety_denied", page_size=1000)
    )
    assert job_id in [e.job_id for e in by_code.entries]
    assert {e.reason_code for e in by_code.entries} == {"safety_denied"}


async def test_list_pages_newest_first_without_repeats(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    dlq = stub(channel)
    topic = f"job.t.deny.{prefix}"
    ids = [await denied_job(channel, cordum, topic) for _ in range(5)]
    seen: list[D.DLQEntry] = []
    token, pages = "", 0
    while True:
        page = await dlq.ListDLQEntries(
            D.ListDLQEntriesRequest(topic=topic, page_size=2, page_token=token)
        )
        pages += 1
        seen += list(page.entries)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert sorted(e.job_id for e in seen) == sorted(ids)
    order = [(e.created_at.ToMilliseconds(), e.job_id) for e in seen]
    assert order == sorted(order, reverse=True)

    first = await dlq.ListDLQEntries(D.ListDLQEntriesRequest(topic=topic, page_size=2))
    wrong = await failure(
        dlq.ListDLQEntries(
            D.ListDLQEntriesRequest(topic="job.other", page_token=first.next_page_token)
        )
    )
    assert set(field_violations(wrong)) == {"page_token"}


async def test_retry_creates_a_linked_job_that_keeps_what_the_original_asked_for(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """A job that failed on a worker is retried after the worker is fixed: the retry is a new
    job with the original's input, labels, priority, budget and memory, linked both ways."""
    assert cordum.redis is not None
    dlq, job_api = stub(channel), jobs(channel)
    topic = f"job.t.fixme.{prefix}"
    broken = make_worker(f"broken-{prefix}", nats_url, redis_url)

    @broken.handler(topic)
    async def fail(ctx: Any, data: Any) -> Any:
        raise JobFailed("not yet", code="broken")

    submit = J.SubmitJobRequest(
        topic=topic,
        labels={"team": "sre", "ticket": prefix},
        priority="batch",
        max_input_tokens=100,
        max_total_tokens=1000,
        deadline_ms=60_000,
        team_id="team-a",
        capability="fixing",
        risk_tags=["low"],
        trace_id=f"trace-{prefix}",
    )
    submit.input.CopyFrom(json_value({"n": 7, "who": prefix}))
    async with broken:
        reply = await job_api.SubmitJob(submit)
        original = await wait_state(job_api, reply.job_id, "FAILED")
    entry = await wait_dlq(cordum, reply.job_id)
    assert entry["reason_code"] == "broken"

    seen: list[tuple[Any, Any]] = []
    fixed = make_worker(f"fixed-{prefix}", nats_url, redis_url)

    @fixed.handler(topic)
    async def work(ctx: Any, data: Any) -> Any:
        seen.append((ctx, data))
        return {"ok": data["n"]}

    async with fixed:
        retried = await dlq.RetryDLQEntry(D.RetryDLQEntryRequest(job_id=reply.job_id))
        new_id = retried.job_id
        assert new_id == f"{reply.job_id}-retry-1"
        assert retried.trace_id == f"trace-{prefix}"
        done = await wait_state(job_api, new_id, "SUCCEEDED")

    assert done.parent_job_id == reply.job_id
    assert dict(done.labels) == {"team": "sre", "ticket": prefix, "retry_of": reply.job_id}
    assert done.priority == original.priority == agent.JOB_PRIORITY_BATCH
    assert done.budget == original.budget
    assert done.budget.max_total_tokens == 1000 and done.budget.deadline_ms == 60_000
    for name in ("topic", "tenant_id", "team_id", "capability", "memory_id", "max_retries"):
        assert getattr(done, name) == getattr(original, name), name
    assert list(done.risk_tags) == ["low"]
    assert done.trace_id == original.trace_id
    # The worker got the original input, labels and budget.
    ((ctx, data),) = seen
    assert data == {"n": 7, "who": prefix}
    assert ctx.labels == {"team": "sre", "ticket": prefix, "retry_of": reply.job_id}
    assert ctx.request.priority == agent.JOB_PRIORITY_BATCH
    assert ctx.request.parent_job_id == reply.job_id
    # The worker is given the time that remains of the retry's fresh 60 s deadline.
    assert ctx.budget.max_total_tokens == 1000
    assert 30_000 < ctx.budget.deadline_ms <= 60_000
    assert ctx.request.memory_id == f"mem:{reply.job_id}"
    assert await cordum.redis.get(f"ctx:{new_id}") == await cordum.redis.get(f"ctx:{reply.job_id}")
    trace = await job_api.GetTrace(J.GetTraceRequest(trace_id=f"trace-{prefix}"))
    assert {j.id for j in trace.jobs} == {reply.job_id, new_id}

    # The entry stays, linked to the retry; the original job is untouched.
    after = await dlq.GetDLQEntry(D.GetDLQEntryRequest(job_id=reply.job_id))
    assert list(after.retry_job_ids) == [new_id]
    still = await job_api.GetJob(J.GetJobRequest(job_id=reply.job_id))
    assert still.state == job_pb2.JOB_STATE_FAILED
    # A second retry is another job (no worker now: it just waits).
    again = await dlq.RetryDLQEntry(D.RetryDLQEntryRequest(job_id=reply.job_id))
    assert again.job_id == f"{reply.job_id}-retry-2"
    assert again.job.state == job_pb2.JOB_STATE_PENDING
    linked = await dlq.GetDLQEntry(D.GetDLQEntryRequest(job_id=reply.job_id))
    assert list(linked.retry_job_ids) == [new_id, again.job_id]
    await job_api.CancelJob(J.CancelJobRequest(job_id=again.job_id))


async def test_retry_passes_the_safety_gate_again(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    dlq, job_api = stub(channel), jobs(channel)
    job_id = await denied_job(channel, cordum, f"job.t.deny.{prefix}", labels={"k": "v"})
    retried = await dlq.RetryDLQEntry(D.RetryDLQEntryRequest(job_id=job_id))
    denied = await wait_state(job_api, retried.job_id, "DENIED")
    assert denied.safety.reason == "denied by the test policy"
    # The retry failed the same way: an entry of its own, linked to the original's.
    own = await wait_dlq(cordum, retried.job_id)
    assert own["reason_code"] == "safety_denied"
    entry = await dlq.GetDLQEntry(D.GetDLQEntryRequest(job_id=job_id))
    assert list(entry.retry_job_ids) == [retried.job_id]


async def test_delete_and_missing_entries(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    dlq = stub(channel)
    topic = f"job.t.deny.{prefix}"
    job_id = await denied_job(channel, cordum, topic)
    await dlq.DeleteDLQEntry(D.DeleteDLQEntryRequest(job_id=job_id))
    assert cordum.redis is not None
    ns = cordum.settings.namespace
    assert await cordum.redis.exists(f"{ns}dlq:{job_id}") == 0
    assert await cordum.redis.zscore(f"{ns}dlq:idx", job_id) is None
    assert await cordum.redis.zscore(f"{ns}dlq:idx:t:default", job_id) is None
    listed = await dlq.ListDLQEntries(D.ListDLQEntriesRequest(topic=topic))
    assert list(listed.entries) == []
    for call in (
        dlq.GetDLQEntry(D.GetDLQEntryRequest(job_id=job_id)),
        dlq.DeleteDLQEntry(D.DeleteDLQEntryRequest(job_id=job_id)),
        dlq.RetryDLQEntry(D.RetryDLQEntryRequest(job_id=job_id)),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(error) == "DLQ_ENTRY_NOT_FOUND"


async def test_retry_of_an_expired_job_or_input_is_refused_and_creates_nothing(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    assert cordum.redis is not None and cordum.store is not None
    dlq = stub(channel)
    no_input = await denied_job(channel, cordum, f"job.t.deny.{prefix}")
    await cordum.redis.delete(f"ctx:{no_input}")
    error = await failure(dlq.RetryDLQEntry(D.RetryDLQEntryRequest(job_id=no_input)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(error) == "MEMORY_NOT_FOUND"

    no_job = await denied_job(channel, cordum, f"job.t.deny.{prefix}")
    await cordum.redis.delete(cordum.store.job_key(no_job))
    error = await failure(dlq.RetryDLQEntry(D.RetryDLQEntryRequest(job_id=no_job)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(error) == "JOB_NOT_FOUND"
    for job_id in (no_input, no_job):
        assert await cordum.store.get(f"{job_id}-retry-1") is None
        entry = await dlq.GetDLQEntry(D.GetDLQEntryRequest(job_id=job_id))
        assert list(entry.retry_job_ids) == []


async def test_bad_input_names_the_field(channel: grpc.aio.Channel) -> None:
    dlq = stub(channel)
    bad = await failure(
        dlq.ListDLQEntries(D.ListDLQEntriesRequest(page_size=-1, page_token="not-a-token"))
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad)) == {"page_size", "page_token"}
    for call in (
        dlq.GetDLQEntry(D.GetDLQEntryRequest(job_id="")),
        dlq.DeleteDLQEntry(D.DeleteDLQEntryRequest(job_id="a b")),
        dlq.RetryDLQEntry(D.RetryDLQEntryRequest(job_id="x" * 201)),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(error)) == {"job_id"}


async def test_entries_are_scoped_to_the_tenant(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    topic = f"job.t.deny.{prefix}"
    job_id = await denied_job(channel, cordum, topic)
    mine, other = Caller(tenant="default"), Caller(tenant="other")
    assert (await cordum.dlq.get(job_id, mine)).tenant == "default"
    entries, _ = await cordum.dlq.list(100, "", topic, "", mine)
    assert [e.job_id for e in entries] == [job_id]
    assert (await cordum.dlq.list(100, "", topic, "", other))[0] == []
    for call in (
        cordum.dlq.get(job_id, other),
        cordum.dlq.delete(job_id, other),
        cordum.dlq.retry(job_id, other),
    ):
        with pytest.raises(CordumError) as hidden:
            await call
        assert hidden.value.reason_name == "DLQ_ENTRY_NOT_FOUND"
    assert (await cordum.dlq.get(job_id, mine)).retry_job_ids == []
