"""The approval flow: held jobs are listed, approved (and run at once) or rejected; an
approval is bound to the job's hash and to the policy in force."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from cordum.server.app import App
from cordum.v1 import approval_service_pb2 as A

from support.cordum import TEST_POLICY, app_settings, running_app, write_config
from support.jobs import (
    J,
    approvals,
    error_reason,
    jobs,
    make_worker,
    state,
    submit_packet,
    wait_dlq,
    wait_state,
)
from support.waiting import eventually


async def test_held_job_is_listed_and_approval_runs_it_at_once(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub, approval = jobs(channel), approvals(channel)
    topic = f"job.t.approve.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"approved_run": True}

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="deploy", topic=topic))
        held = await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")

        listed = await approval.ListApprovals(A.ListApprovalsRequest(page_size=500))
        mine = [a for a in listed.approvals if a.job.id == reply.job_id]
        assert len(mine) == 1
        assert mine[0].decision.rule_id == "approve-rule"
        assert mine[0].decision.reason == "needs a human"

        started = time.monotonic()
        approved = await approval.ApproveJob(
            A.ApproveJobRequest(job_id=reply.job_id, reason="looks fine", note="n")
        )
        assert approved.job.state in (state("PENDING"), state("DISPATCHED"), state("SUCCEEDED"))
        # Straight back to the scheduler, not on a reconciler or replayer tick.
        done = await wait_state(stub, reply.job_id, "SUCCEEDED", within=1.0)
        assert time.monotonic() - started < 1.0
    assert done.approval.approved
    assert done.approval.reason == "looks fine"
    assert done.approval.job_hash == held.safety.job_hash
    assert done.approval.policy_snapshot == held.safety.policy_snapshot
    assert done.attempts == 1
    listed = await approval.ListApprovals(A.ListApprovalsRequest(page_size=500))
    assert reply.job_id not in {a.job.id for a in listed.approvals}


async def test_reject_denies_the_job_with_a_dlq_entry(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub, approval = jobs(channel), approvals(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.approve.{prefix}"))
    await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
    rejected = await approval.RejectJob(A.RejectJobRequest(job_id=reply.job_id, reason="no way"))
    assert rejected.job.state == state("DENIED")
    assert not rejected.job.approval.approved
    assert rejected.job.approval.reason == "no way"
    entry = await wait_dlq(cordum, reply.job_id)
    assert entry["reason_code"] == "approval_rejected"
    assert entry["status"] == "JOB_STATUS_DENIED"
    # Once rejected, it cannot be approved.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await approval.ApproveJob(A.ApproveJobRequest(job_id=reply.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_approving_a_job_not_awaiting_approval_is_refused(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    stub, approval = jobs(channel), approvals(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}"))
    await wait_state(stub, reply.job_id, "DENIED")
    for call in (approval.ApproveJob, approval.RejectJob):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(A.ApproveJobRequest(job_id=reply.job_id))  # type: ignore[operator]
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(info.value) == "JOB_NOT_AWAITING_APPROVAL"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await approval.ApproveJob(A.ApproveJobRequest(job_id=f"nope-{prefix}"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# -- an approval is bound to the policy snapshot ---------------------------------------------


@pytest_asyncio.fixture
async def policy_app(
    nats_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[App, Path]]:
    config = write_config(tmp_path)
    async with running_app(app_settings(nats_url, redis_url, config)) as app:
        yield app, config


async def test_approval_after_the_policy_now_denies_is_refused(
    policy_app: tuple[App, Path], prefix: str
) -> None:
    app, config = policy_app
    topic = f"job.t.approve.{prefix}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub, approval = jobs(channel), approvals(channel)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        held = await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
        assert app.kernel is not None
        old = app.kernel.snapshot
        assert held.safety.policy_snapshot == old

        # The policy now denies this topic (first rule wins); the kernel hot-reloads it.
        deny_first = TEST_POLICY.replace(
            "rules:\n",
            f'rules:\n  - id: now-denied\n    match: {{topics: ["{topic}"]}}\n'
            "    decision: deny\n    reason: no longer allowed\n",
            1,
        )
        (config / "safety.yaml").write_text(deny_first)
        await eventually(
            lambda: _snapshot(app), until=lambda s: s not in ("", old), what="policy reload"
        )

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await approval.ApproveJob(A.ApproveJobRequest(job_id=reply.job_id))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no longer allowed" in (info.value.details() or "")
        job = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
        assert job.state == state("APPROVAL_REQUIRED")
        await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))


async def _snapshot(app: App) -> str:
    assert app.kernel is not None
    return app.kernel.snapshot


async def test_approval_is_refused_when_the_stored_request_changed(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    assert cordum.store is not None and cordum.redis is not None
    stub, approval = jobs(channel), approvals(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.approve.{prefix}"))
    await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
    # Someone rewrites the stored request after the decision (an extra label).
    record = await cordum.store.get(reply.job_id)
    assert record is not None
    record.request.labels["sneaked"] = "in"
    await cordum.redis.hset(
        cordum.store.job_key(reply.job_id), "req", record.request.SerializeToString()
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await approval.ApproveJob(A.ApproveJobRequest(job_id=reply.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "JOB_REQUEST_CHANGED"
    job = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
    assert job.state == state("APPROVAL_REQUIRED")
    await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))


async def test_scheduler_honours_an_approval_only_under_its_snapshot(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """The approval travels with the job as (hash, snapshot); a re-check under another
    policy snapshot holds the job again instead of running it."""
    assert cordum.store is not None and cordum.nats is not None and cordum.kernel is not None
    stub = jobs(channel)
    topic = f"job.t.approve.{prefix}"
    ran: list[str] = []
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        ran.append(ctx.job_id)
        return {}

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        held = await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
        # As if approved under a policy that has since been replaced.
        await cordum.store.transition(
            reply.job_id,
            allowed_from=["APPROVAL_REQUIRED"],
            to="PENDING",
            message="approved under an older policy",
            now_ms=int(time.time() * 1000),
            fields={"approved_hash": held.safety.job_hash, "approved_snapshot": "older"},
        )
        record = await cordum.store.get(reply.job_id)
        assert record is not None
        await cordum.nats.publish(
            cordum.subjects.submit, submit_packet(record.request, reply.trace_id)
        )
        again = await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
        assert again.attempts == 0
        decisions = await stub.ListJobDecisions(J.ListJobDecisionsRequest(job_id=reply.job_id))
        assert len(decisions.decisions) == 2
        # Approved under the current policy, it runs.
        await approvals(channel).ApproveJob(A.ApproveJobRequest(job_id=reply.job_id))
        await wait_state(stub, reply.job_id, "SUCCEEDED")
    assert ran == [reply.job_id]
