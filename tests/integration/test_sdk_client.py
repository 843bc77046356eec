"""The SDK clients (`cordum.sdk.AsyncClient`, `cordum.sdk.Client`) against the session app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

import cordum.sdk
from cordum.agent.v1 import safety_pb2
from cordum.sdk import (
    AsyncClient,
    Client,
    CordumError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    WaitTimeout,
)
from cordum.sdk.convert import state_name
from cordum.sdk.worker import JobFailed, Worker
from cordum.server.app import App
from cordum.v1 import job_pb2, job_service_pb2, status_service_pb2, status_service_pb2_grpc

from support.waiting import eventually


class Topics:
    """This test's topics; the test policy gates `job.t.<kind>.*` by kind."""

    def __init__(self, prefix: str) -> None:
        self.ok = f"job.t.ok.{prefix}"
        self.fail = f"job.t.fail.{prefix}"
        self.slow = f"job.t.slow.{prefix}"
        self.approve = f"job.t.approve.{prefix}"
        self.deny = f"job.t.deny.{prefix}"


@pytest.fixture
def topics(prefix: str) -> Topics:
    return Topics(prefix)


@pytest.fixture
def release() -> asyncio.Event:
    """Set it to let the `slow` handler finish."""
    return asyncio.Event()


@pytest_asyncio.fixture
async def worker(
    nats_url: str, redis_url: str, prefix: str, topics: Topics, release: asyncio.Event
) -> AsyncIterator[Worker]:
    worker = Worker(
        worker_id=f"w-{prefix}", nats_url=nats_url, redis_url=redis_url, heartbeat_interval=0.2
    )

    async def echo(ctx: Any, data: Any) -> Any:
        return {"echo": data, "job_id": ctx.job_id}

    async def fail(ctx: Any, data: Any) -> Any:
        raise JobFailed("no luck", code="E_TEST")

    async def slow(ctx: Any, data: Any) -> Any:
        await release.wait()
        return {"slow": True}

    for topic, handler in (
        (topics.ok, echo),
        (topics.approve, echo),
        (topics.fail, fail),
        (topics.slow, slow),
    ):
        worker.add_handler(topic, handler)
    async with worker:
        yield worker
        release.set()


@pytest_asyncio.fixture
async def client(cordum: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cordum.grpc_port}", timeout=10.0) as client:
        yield client


async def state_of(client: AsyncClient, job_id: str, *names: str) -> job_pb2.Job:
    async def get() -> job_pb2.Job:
        return await client.jobs.get(job_id)

    return await eventually(
        get, until=lambda j: state_name(j.state) in names, what=f"{job_id} in {names}"
    )


# -- the public surface ----------------------------------------------------------------


def test_public_names_are_pinned() -> None:
    assert set(cordum.sdk.__all__) == {
        "DEFAULT_TARGET",
        "Aborted",
        "AlreadyExists",
        "AsyncClient",
        "Client",
        "CordumError",
        "DeadlineExceeded",
        "FailedPrecondition",
        "Internal",
        "InvalidArgument",
        "JobOutcome",
        "NotFound",
        "PermissionDenied",
        "PolicyCheckFields",
        "ResourceExhausted",
        "SubmitJobFields",
        "Unauthenticated",
        "Unavailable",
        "Unimplemented",
        "WaitTimeout",
        "load_workflow",
    }
    for name in cordum.sdk.__all__:
        assert hasattr(cordum.sdk, name)


def test_both_clients_have_the_same_namespaces_and_methods() -> None:
    namespaces = ("jobs", "approvals", "status", "workflows", "runs", "config", "policy", "schemas")
    async_client = AsyncClient("127.0.0.1:1")
    sync_client = Client("127.0.0.1:1")
    try:
        for name in namespaces:
            pairs = [(getattr(async_client, name), getattr(sync_client, name))]
            if name == "policy":
                pairs.append((async_client.policy.bundles, sync_client.policy.bundles))
            for aio, blocking in pairs:
                public = {m for m in dir(aio) if not m.startswith("_")}
                assert public == {m for m in dir(blocking) if not m.startswith("_")}, name
    finally:
        sync_client.close()


def test_submit_keywords_cover_every_submit_request_field() -> None:
    # SubmitJobFields types the keyword arguments of submit/run; it must not fall behind
    # the proto.
    fields = set(job_service_pb2.SubmitJobRequest.DESCRIPTOR.fields_by_name)
    assert set(cordum.sdk.SubmitJobFields.__annotations__) == fields


# -- submitting and following jobs ---------------------------------------------------------


async def test_run_returns_the_finished_job_and_its_decoded_result(
    client: AsyncClient, worker: Worker, topics: Topics
) -> None:
    outcome = await client.jobs.run(
        topic=topics.ok, input={"n": 1, "xs": [1.5, None, True]}, labels={"a": "b"}, timeout=10
    )
    assert outcome.done and outcome.succeeded
    assert outcome.job.worker_id == worker.worker_id
    assert outcome.job.labels["a"] == "b"
    # JSON integers come back as int, not as the double google.protobuf.Value stores.
    assert outcome.result == {"echo": {"n": 1, "xs": [1.5, None, True]}, "job_id": outcome.job_id}
    assert isinstance(outcome.result["echo"]["n"], int)


async def test_run_reports_a_failed_job_without_raising(
    client: AsyncClient, worker: Worker, topics: Topics
) -> None:
    outcome = await client.jobs.run(topic=topics.fail, prompt="x", timeout=10)
    assert outcome.done and not outcome.succeeded
    assert state_name(outcome.job.state) == "FAILED"
    assert outcome.result is None
    assert "no luck" in outcome.job.error_message


async def test_run_that_outlasts_its_timeout_is_not_done(
    client: AsyncClient, worker: Worker, topics: Topics, release: asyncio.Event
) -> None:
    outcome = await client.jobs.run(topic=topics.slow, prompt="x", timeout=0.3)
    assert not outcome.done
    assert outcome.result is None
    release.set()
    assert state_name((await client.jobs.wait(outcome.job_id, timeout=10)).state) == "SUCCEEDED"


async def test_submit_wait_get_and_result(
    client: AsyncClient, worker: Worker, topics: Topics
) -> None:
    submitted = await client.jobs.submit(
        topic=topics.ok, prompt="hello", context={"k": [1, 2]}, priority="batch", max_retries=2
    )
    assert state_name(submitted.job.state) == "PENDING"
    assert not submitted.idempotent_replay

    done = await client.jobs.wait(submitted.job_id, timeout=10)
    assert state_name(done.state) == "SUCCEEDED"
    fetched = await client.jobs.get(submitted.job_id)
    assert fetched.id == submitted.job_id and fetched.max_retries == 2
    assert fetched.state == done.state

    result = await client.jobs.result(submitted.job_id)
    assert result["job_id"] == submitted.job_id
    assert result["echo"]["prompt"] == "hello"
    assert result["echo"]["context"] == {"k": [1, 2]}
    record = await client.jobs.get_result(submitted.job_id)
    assert record.worker_id == worker.worker_id


async def test_idempotency_key_replays_the_first_submit(
    client: AsyncClient, worker: Worker, topics: Topics, prefix: str
) -> None:
    first = await client.jobs.submit(topic=topics.ok, prompt="a", idempotency_key=f"k-{prefix}")
    again = await client.jobs.submit(topic=topics.ok, prompt="a", idempotency_key=f"k-{prefix}")
    assert again.idempotent_replay
    assert again.job_id == first.job_id


async def test_watch_streams_each_state_change_until_terminal(
    client: AsyncClient, worker: Worker, topics: Topics, release: asyncio.Event
) -> None:
    submitted = await client.jobs.submit(topic=topics.slow, prompt="x")
    seen: list[str] = []
    async for event in client.jobs.watch(submitted.job_id, timeout=10):
        assert event.job_id == submitted.job_id
        assert event.job.id == submitted.job_id
        seen.append(state_name(event.state))
        if state_name(event.state) in ("DISPATCHED", "RUNNING"):
            release.set()
    assert seen[-1] == "SUCCEEDED"
    order = ["PENDING", "SCHEDULED", "DISPATCHED", "RUNNING", "SUCCEEDED"]
    positions = [order.index(s) for s in seen]
    assert positions == sorted(positions), seen


async def test_wait_times_out_then_cancel_ends_the_job(
    client: AsyncClient, worker: Worker, topics: Topics
) -> None:
    submitted = await client.jobs.submit(topic=topics.slow, prompt="x")
    await state_of(client, submitted.job_id, "DISPATCHED", "RUNNING")
    with pytest.raises(WaitTimeout) as info:
        await client.jobs.wait(submitted.job_id, timeout=0.3)
    assert isinstance(info.value, DeadlineExceeded)
    assert info.value.reason == "WAIT_TIMEOUT"
    assert info.value.job_id == submitted.job_id

    cancelled = await client.jobs.cancel(submitted.job_id, reason="enough")
    assert state_name(cancelled.state) == "CANCELLED"
    # Cancelling again is harmless, and waiting on an ended job returns at once.
    assert state_name((await client.jobs.cancel(submitted.job_id)).state) == "CANCELLED"
    assert state_name((await client.jobs.wait(submitted.job_id, timeout=5)).state) == "CANCELLED"
    assert await client.jobs.result(submitted.job_id) is None


async def test_cancel_of_a_finished_job_is_a_failed_precondition(
    client: AsyncClient, worker: Worker, topics: Topics
) -> None:
    outcome = await client.jobs.run(topic=topics.ok, prompt="x", timeout=10)
    with pytest.raises(FailedPrecondition) as info:
        await client.jobs.cancel(outcome.job_id)
    assert info.value.reason == "JOB_TERMINAL"


async def test_list_follows_page_tokens(
    client: AsyncClient, worker: Worker, topics: Topics, prefix: str
) -> None:
    answers = await client.jobs.submit_many(
        [{"topic": topics.ok, "prompt": f"p{i}", "job_id": f"{prefix}-{i}"} for i in range(5)]
    )
    ids = [a.job_id for a in answers if not isinstance(a, CordumError)]
    assert ids == [f"{prefix}-{i}" for i in range(5)]
    # Page only once the jobs have stopped changing: the server orders by update time, so a
    # job that changes state between two pages moves (see the note on ListJobs paging).
    for job_id in ids:
        await client.jobs.wait(job_id, timeout=10)

    first = await client.jobs.list_page(topic=topics.ok, page_size=2)
    assert len(first.jobs) == 2 and first.next_page_token

    listed = [j async for j in client.jobs.list(topic=topics.ok, page_size=2)]
    assert sorted(j.id for j in listed) == ids
    assert [j.id for j in listed[:2]] == [j.id for j in first.jobs]

    limited = [j async for j in client.jobs.list(topic=topics.ok, page_size=2, limit=3)]
    assert [j.id for j in limited] == [j.id for j in listed[:3]]
    assert [j async for j in client.jobs.list(topic=topics.ok, limit=0)] == []

    succeeded = [j async for j in client.jobs.list(topic=topics.ok, state="SUCCEEDED")]
    assert sorted(j.id for j in succeeded) == ids
    assert [j async for j in client.jobs.list(topic=topics.ok, state="RUNNING")] == []


async def test_submit_many_answers_each_job_on_its_own(
    client: AsyncClient, worker: Worker, topics: Topics
) -> None:
    good = job_service_pb2.SubmitJobRequest(topic=topics.ok, prompt="proto form")
    answers = await client.jobs.submit_many([good, {"topic": "nope", "prompt": "x"}])
    assert not isinstance(answers[0], CordumError) and answers[0].job_id
    bad = answers[1]
    assert isinstance(bad, InvalidArgument)
    assert "topic" in bad.field_violations


async def test_trace_returns_every_job_of_the_trace(
    client: AsyncClient, worker: Worker, topics: Topics, prefix: str
) -> None:
    trace_id = f"tr-{prefix}"
    a = await client.jobs.submit(topic=topics.ok, prompt="a", trace_id=trace_id)
    b = await client.jobs.submit(topic=topics.ok, prompt="b", trace_id=trace_id)
    jobs = await client.jobs.trace(trace_id)
    assert {j.id for j in jobs} == {a.job_id, b.job_id}


# -- safety decisions, remediation, approvals ----------------------------------------------


async def test_decisions_and_remediation_of_a_denied_job(
    client: AsyncClient, topics: Topics
) -> None:
    submitted = await client.jobs.submit(topic=topics.deny, prompt="x", labels={"k": "v"})
    await state_of(client, submitted.job_id, "DENIED")
    decisions = await client.jobs.decisions(submitted.job_id)
    assert decisions[0].decision == safety_pb2.DECISION_TYPE_DENY
    assert decisions[0].rule_id == "deny-rule"

    remediated = await client.jobs.remediate(submitted.job_id)
    assert remediated.job_id != submitted.job_id
    job = await client.jobs.get(remediated.job_id)
    assert job.topic == "job.t.safe.remediated"
    assert job.parent_job_id == submitted.job_id
    assert job.labels["remediated"] == "yes"


async def test_approve_runs_a_held_job_and_reject_denies_one(
    client: AsyncClient, worker: Worker, topics: Topics
) -> None:
    held = await client.jobs.submit(topic=topics.approve, prompt="deploy")
    other = await client.jobs.submit(topic=topics.approve, prompt="drop tables")
    await state_of(client, held.job_id, "APPROVAL_REQUIRED")
    await state_of(client, other.job_id, "APPROVAL_REQUIRED")

    waiting = {a.job.id: a async for a in client.approvals.list()}
    assert {held.job_id, other.job_id} <= waiting.keys()
    assert waiting[held.job_id].decision.rule_id == "approve-rule"

    approved = await client.approvals.approve(held.job_id, reason="fine", note="ticket 1")
    assert approved.id == held.job_id
    done = await client.jobs.wait(held.job_id, timeout=10)
    assert state_name(done.state) == "SUCCEEDED"
    assert done.approval.approved and done.approval.note == "ticket 1"

    rejected = await client.approvals.reject(other.job_id, reason="no")
    assert state_name(rejected.state) == "DENIED"
    assert not rejected.approval.approved

    with pytest.raises(FailedPrecondition) as info:
        await client.approvals.approve(held.job_id)
    assert info.value.reason == "JOB_NOT_AWAITING_APPROVAL"


# -- status ---------------------------------------------------------------------------------


async def test_status_and_workers(client: AsyncClient, worker: Worker) -> None:
    status = await client.status.get()
    assert status.nats.connected and status.redis.ok
    assert status.policy_snapshot

    async def ids() -> set[str]:
        return {w.worker_id for w in await client.status.workers()}

    await eventually(ids, until=lambda found: worker.worker_id in found)
    mine = [w for w in await client.status.workers() if w.worker_id == worker.worker_id]
    assert mine[0].live


# -- typed errors ---------------------------------------------------------------------------


async def test_unknown_job_is_not_found(client: AsyncClient, prefix: str) -> None:
    with pytest.raises(NotFound) as info:
        await client.jobs.get(f"missing-{prefix}")
    error = info.value
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "JOB_NOT_FOUND"
    assert error.status is not None
    with pytest.raises(NotFound):
        await client.jobs.result(f"missing-{prefix}")
    with pytest.raises(NotFound):
        await client.jobs.wait(f"missing-{prefix}", timeout=5)


async def test_bad_input_is_invalid_argument_naming_each_field(
    client: AsyncClient, prefix: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await client.jobs.submit(
            topic="not-a-topic", job_id=f"bad id {prefix}", priority="urgent", prompt="x"
        )
    error = info.value
    assert error.reason == "INVALID_ARGUMENT"
    assert {"topic", "job_id", "priority"} <= error.field_violations.keys()
    assert all(error.field_violations.values())
    with pytest.raises(InvalidArgument) as listing:
        await client.jobs.list_page(state="SLEEPING")
    assert "state" in listing.value.field_violations


async def test_unreachable_server_is_unavailable_with_connection_failed() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(Unavailable) as info:
            await client.status.get()
    assert info.value.connection_failed
    assert info.value.reason == ""


class _RecordingStatus(status_service_pb2_grpc.StatusServiceServicer):
    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}

    async def GetStatus(
        self, request: status_service_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> status_service_pb2.GetStatusResponse:
        self.metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        return status_service_pb2.GetStatusResponse(roles=["recording"])


async def test_api_key_and_metadata_go_with_every_call() -> None:
    # A stand-in StatusService: the session app does not check API keys yet.
    server = grpc.aio.server()
    recorder = _RecordingStatus()
    status_service_pb2_grpc.add_StatusServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(
            f"127.0.0.1:{port}", api_key="secret", metadata={"X-Tenant-Id": "t1"}
        ) as client:
            assert list((await client.status.get()).roles) == ["recording"]
        assert recorder.metadata["x-api-key"] == "secret"
        assert recorder.metadata["x-tenant-id"] == "t1"
    finally:
        await server.stop(None)


# -- the blocking client ----------------------------------------------------------------------


async def test_sync_client_from_a_thread(
    cordum: App, worker: Worker, topics: Topics, prefix: str, release: asyncio.Event
) -> None:
    # Sync calls block; run them in a thread so the in-process app keeps serving.
    target = f"127.0.0.1:{cordum.grpc_port}"

    def blocking_calls() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Client(target, timeout=10) as client:
            outcome = client.jobs.run(topic=topics.ok, input={"n": 2}, timeout=10)
            seen["run"] = (outcome.done, outcome.result["echo"])
            submitted = client.jobs.submit(topic=topics.ok, prompt="sync")
            seen["wait"] = state_name(client.jobs.wait(submitted.job_id, timeout=10).state)
            seen["result"] = client.jobs.result(submitted.job_id)["echo"]["prompt"]
            seen["watch"] = [state_name(e.state) for e in client.jobs.watch(submitted.job_id)]
            seen["list"] = {j.id for j in client.jobs.list(topic=topics.ok, page_size=1)}
            seen["decisions"] = len(client.jobs.decisions(submitted.job_id))
            seen["workers"] = {w.worker_id for w in client.status.workers()}
            slow = client.jobs.submit(topic=topics.slow, prompt="x")
            try:
                client.jobs.wait(slow.job_id, timeout=0.2)
            except WaitTimeout as error:
                seen["timeout"] = error.reason
            seen["cancel"] = state_name(client.jobs.cancel(slow.job_id).state)
            try:
                client.jobs.get(f"missing-{prefix}")
            except NotFound as error:
                seen["missing"] = error.reason
            try:
                client.jobs.submit(topic="bad", prompt="x")
            except InvalidArgument as error:
                seen["invalid"] = sorted(error.field_violations)
            seen["approvals"] = isinstance(list(client.approvals.list()), list)
            seen["submitted"] = submitted.job_id
        return seen

    seen = await asyncio.to_thread(blocking_calls)
    assert seen["run"] == (True, {"n": 2})
    assert seen["wait"] == "SUCCEEDED"
    assert seen["result"] == "sync"
    assert seen["watch"] == ["SUCCEEDED"]
    assert seen["submitted"] in seen["list"]
    assert seen["decisions"] >= 1
    assert worker.worker_id in seen["workers"]
    assert seen["timeout"] == "WAIT_TIMEOUT"
    assert seen["cancel"] == "CANCELLED"
    assert seen["missing"] == "JOB_NOT_FOUND"
    assert seen["invalid"] == ["topic"]
    assert seen["approvals"]
