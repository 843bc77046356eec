"""Each safety decision on the job path: allow, deny, require human, throttle, allow with
constraints, a CEL rule; and remediation of a denied job."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from cordum.agent.v1 import job_pb2 as agent
from cordum.agent.v1 import safety_pb2
from cordum.server.app import App

from support.jobs import (
    J,
    dlq_entry,
    jobs,
    make_worker,
    state,
    submit_packet,
    wait_dlq,
    wait_state,
)
from support.waiting import eventually

D = safety_pb2.DecisionType


async def test_allow_runs_the_job_to_succeeded(
    channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.ok.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def echo(ctx: Any, data: Any) -> Any:
        return {"ok": True}

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="hi", topic=topic))
        done = await wait_state(stub, reply.job_id, "SUCCEEDED")
    assert done.safety.decision == D.DECISION_TYPE_ALLOW
    decisions = await stub.ListJobDecisions(J.ListJobDecisionsRequest(job_id=reply.job_id))
    assert [d.decision for d in decisions.decisions] == [D.DECISION_TYPE_ALLOW]


async def test_deny_records_the_decision_and_a_dlq_entry(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}"))
    denied = await wait_state(stub, reply.job_id, "DENIED")
    assert denied.safety.decision == D.DECISION_TYPE_DENY
    assert denied.safety.rule_id == "deny-rule"
    assert denied.safety.reason == "denied by the test policy"
    assert cordum.kernel is not None
    assert denied.safety.policy_snapshot == cordum.kernel.snapshot
    assert [r.id for r in denied.safety.remediations] == ["use-safe"]
    assert denied.attempts == 0  # never dispatched

    decisions = await stub.ListJobDecisions(J.ListJobDecisionsRequest(job_id=reply.job_id))
    assert len(decisions.decisions) == 1
    assert decisions.decisions[0].rule_id == "deny-rule"

    entry = await wait_dlq(cordum, reply.job_id)
    assert entry["reason_code"] == "safety_denied"
    assert entry["status"] == "JOB_STATUS_DENIED"
    assert entry["reason"] == "denied by the test policy"
    assert entry["topic"] == f"job.t.deny.{prefix}"


async def test_require_human_holds_the_job_for_approval(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.approve.{prefix}"))
    held = await wait_state(stub, reply.job_id, "APPROVAL_REQUIRED")
    assert held.safety.decision == D.DECISION_TYPE_REQUIRE_HUMAN
    assert held.safety.approval_required
    assert held.safety.rule_id == "approve-rule"
    assert held.safety.job_hash
    assert held.attempts == 0
    assert await dlq_entry(cordum, reply.job_id) == {}  # waiting is not a failure
    await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))


async def test_throttle_keeps_the_job_pending_and_asks_again(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.throttle.{prefix}"))
    try:

        async def decisions() -> list[Any]:
            page = await stub.ListJobDecisions(J.ListJobDecisionsRequest(job_id=reply.job_id))
            return list(page.decisions)

        # retry_after_ms is 200: the kernel is asked again and again, each time recorded.
        seen = await eventually(decisions, until=lambda d: len(d) >= 3, what="3 decisions")
        assert all(d.decision == D.DECISION_TYPE_THROTTLE for d in seen)
        assert all(d.rule_id == "throttle-rule" for d in seen)
        job = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
        assert job.state == state("PENDING")
        assert "throttled" in job.pending_reason and "slow down" in job.pending_reason
        assert job.attempts == 0
        assert await dlq_entry(cordum, reply.job_id) == {}
    finally:
        await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))


async def test_allow_with_constraints_applies_them_to_the_dispatched_job(
    channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.constrained.{prefix}"
    seen: dict[str, Any] = {}
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def capture(ctx: Any, data: Any) -> Any:
        seen["env"] = dict(ctx.env)
        seen["deadline_ms"] = ctx.budget.deadline_ms
        return {"ok": True}

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, max_retries=3))
        done = await wait_state(stub, reply.job_id, "SUCCEEDED")

    assert done.safety.decision == D.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS
    assert done.safety.constraints.budgets.max_runtime_ms == 5000
    assert done.max_retries == 1  # capped by the constraint (asked for 3)
    env = seen["env"]
    constraints = json.loads(env["CORDUM_POLICY_CONSTRAINTS"])
    assert constraints["budgets"]["maxRuntimeMs"] == "5000"
    assert constraints["redactionLevel"] == "high"
    assert env["CORDUM_REDACTION_LEVEL"] == "high"
    assert env["CORDUM_MAX_RETRIES"] == "1"
    assert 0 < seen["deadline_ms"] <= 5000
    assert done.HasField("deadline")  # the runtime budget became the job's deadline


async def test_cel_rule_denies_by_label_and_allows_otherwise(
    channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.cel.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def echo(ctx: Any, data: Any) -> Any:
        return {"ok": True}

    async with worker:
        risky, calm = await asyncio.gather(
            stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, labels={"risk": "high"})),
            stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, labels={"risk": "low"})),
        )
        denied = await wait_state(stub, risky.job_id, "DENIED")
        done = await wait_state(stub, calm.job_id, "SUCCEEDED")
    assert denied.safety.rule_id == "cel-rule"
    assert denied.safety.reason == "high risk (CEL)"
    assert done.safety.decision == D.DECISION_TYPE_ALLOW


async def test_remediate_a_denied_job_runs_the_replacement(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    replacement = "job.t.safe.remediated"  # the remediation's topic in the test policy
    seen: dict[str, Any] = {}
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(replacement)
    async def run(ctx: Any, data: Any) -> Any:
        seen["data"] = data
        return {"remediated": True}

    reply = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="fix me", topic=f"job.t.deny.{prefix}", labels={"k": "v"})
    )
    await wait_state(stub, reply.job_id, "DENIED")
    async with worker:
        new = await stub.RemediateJob(J.RemediateJobRequest(job_id=reply.job_id))
        done = await wait_state(stub, new.job_id, "SUCCEEDED")
    assert new.job_id != reply.job_id
    assert done.topic == replacement
    assert done.parent_job_id == reply.job_id
    assert done.trace_id == reply.trace_id
    assert done.labels["remediation_of"] == reply.job_id
    assert done.labels["remediation_id"] == "use-safe"
    assert done.labels["remediated"] == "yes"
    assert done.labels["k"] == "v"
    assert seen["data"]["prompt"] == "fix me"
    # The original stays denied.
    original = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
    assert original.state == state("DENIED")
    # Unknown remediation ids are refused.
    try:
        await stub.RemediateJob(J.RemediateJobRequest(job_id=reply.job_id, remediation_id="nope"))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("an unknown remediation id was accepted")


async def test_cap_client_submit_on_the_bus_goes_through_the_same_gate(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """A CAP client publishes JobRequests on sys.job.submit with its own context pointer."""
    assert cordum.nats is not None and cordum.redis is not None
    stub = jobs(channel)
    topic = f"job.t.ok.{prefix}"
    ctx_key = f"client-ctx:{prefix}"
    await cordum.redis.set(ctx_key, json.dumps({"from": "client"}), ex=60)
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def echo(ctx: Any, data: Any) -> Any:
        return {"echo": data, "trace": ctx.trace_id}

    ok = agent.JobRequest(job_id=f"cap-ok-{prefix}", topic=topic, context_ptr=f"redis://{ctx_key}")
    denied = agent.JobRequest(
        job_id=f"cap-deny-{prefix}",
        topic=f"job.t.deny.{prefix}",
        context_ptr=f"redis://{ctx_key}",
    )
    async with worker:
        for request in (ok, denied):
            await cordum.nats.publish(
                cordum.subjects.submit, submit_packet(request, f"trace-{prefix}")
            )
        done = await wait_state(stub, ok.job_id, "SUCCEEDED")
        await wait_state(stub, denied.job_id, "DENIED")
    assert done.trace_id == f"trace-{prefix}"
    assert done.tenant_id == "default"
    result = await stub.GetJobResult(J.GetJobResultRequest(job_id=ok.job_id))
    fields = result.result.struct_value.fields
    assert fields["echo"].struct_value.fields["from"].string_value == "client"
    assert fields["trace"].string_value == f"trace-{prefix}"
    assert (await wait_dlq(cordum, denied.job_id))["reason_code"] == "safety_denied"
