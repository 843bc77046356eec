"""Upstream Cordum's scheduler/safety sharp edges (reference note §10), each shown fixed.

Every test is named `test_upstream_sharp_edge_<what>` and its docstring cites what upstream
does; the test asserts what we do instead.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import grpc

from cordum.agent.v1 import job_pb2 as agent
from cordum.agent.v1 import safety_pb2_grpc
from cordum.sdk import cap
from cordum.sdk.worker import JobFailed
from cordum.server.api.interceptors import ErrorInterceptor
from cordum.server.app import App
from cordum.server.safety.kernel import SafetyKernel
from cordum.server.safety.servicer import SafetyKernelServicer
from cordum.server.services.caller import Caller
from cordum.server.services.scheduler import now_ms
from cordum.server.stack.process import pick_free_port
from cordum.v1 import approval_service_pb2 as A

from support.cordum import TEST_POLICY, app_settings, running_app, write_config
from support.jobs import (
    J,
    approvals,
    dlq_entry,
    events,
    jobs,
    make_worker,
    raw_fields,
    result_packet,
    state,
    submit_packet,
    wait_dlq,
    wait_state,
)
from support.waiting import eventually


async def wait_worker(app: App, worker_id: str) -> None:
    async def known() -> bool:
        assert app.registry is not None
        return any(w.worker_id == worker_id for w in app.registry.workers())

    await eventually(known, what=f"worker {worker_id} in the registry")


async def ignored_results(app: App, job_id: str) -> list[str]:
    return [m for _, _, m in await events(app, job_id) if m.startswith("ignored late result")]


# -- safety ------------------------------------------------------------------------------------


async def test_upstream_sharp_edge_kernel_outage_is_a_retry_not_a_deny(
    nats_url: str, redis_url: str, tmp_path: Path, prefix: str
) -> None:
    """Upstream: kernel unavailability is fail-closed *and terminal* — an RPC error or an
    open circuit becomes DENIED + DLQ `safety_denied` (§1.19, §10 Safety). Here the job
    waits in PENDING, saying why, and runs once the kernel answers."""
    port = pick_free_port()  # nothing listens here yet
    config = write_config(tmp_path)
    settings = app_settings(
        nats_url, redis_url, config, roles=["gateway", "scheduler"], safety_addr=f"127.0.0.1:{port}"
    )
    topic = f"job.t.ok.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"ok": True}

    async with (
        running_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        worker,
    ):
        assert app.kernel is None
        stub = jobs(channel)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))

        async def job() -> Any:
            return await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))

        waiting = await eventually(
            job, until=lambda j: "safety kernel" in j.pending_reason, what="kernel outage noted"
        )
        assert waiting.state == state("PENDING")
        assert "unavailable" in waiting.pending_reason
        assert await dlq_entry(app, reply.job_id) == {}

        kernel = SafetyKernel(config / "safety.yaml", watch_interval_s=0)
        await kernel.start()
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        safety_pb2_grpc.add_SafetyKernelServicer_to_server(SafetyKernelServicer(kernel), server)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        await server.start()
        try:
            done = await wait_state(stub, reply.job_id, "SUCCEEDED", within=30)
        finally:
            await server.stop(None)
            await kernel.stop()
    assert done.safety.policy_snapshot == kernel.snapshot
    assert done.attempts == 1


# -- placement ----------------------------------------------------------------------------------


async def test_upstream_sharp_edge_system_labels_never_block_placement(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream: every job label not on a short reserved list is a hard placement constraint,
    so labels the system itself adds (`approval_reason`, `retry`, `dlq_entry`,
    `remediation_of`, `mcp.*`, ...) make a job unplaceable on plain workers; it then retries
    `no_workers` forever (§1.8, §10 Routing). Only `placement.*` labels constrain here."""
    stub = jobs(channel)
    topic = f"job.t.ok.{prefix}"
    labels = {
        "approval_reason": "ok",
        "approval_note": "n",
        "retry": "true",
        "dlq_entry": "x",
        "retry_of_job": "j0",
        "remediation_of": "j1",
        "remediation_id": "r1",
        "mcp.server": "github",
        "mcp.tool": "create_issue",
        "team": "sre",
    }
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)  # no labels at all

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"labels": dict(ctx.labels)}

    async with worker:
        await wait_worker(cordum, worker.worker_id)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, labels=labels))
        done = await wait_state(stub, reply.job_id, "SUCCEEDED")
    assert done.worker_id == worker.worker_id
    result = await stub.GetJobResult(J.GetJobResultRequest(job_id=reply.job_id))
    seen = result.result.struct_value.fields["labels"].struct_value.fields
    assert {k: v.string_value for k, v in seen.items()} == labels


async def test_upstream_sharp_edge_default_cap_worker_with_empty_pool_is_placed(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream: least-loaded placement maps topics to pools through the heartbeat `pool`,
    which a default CAP Agent leaves empty, and then dispatches to `worker.<id>.jobs`, which
    the shipped runtimes never subscribe (§9 item 10, §10 Routing). Here the worker's
    handshake topics place it, directly."""
    stub = jobs(channel)
    topic = f"job.t.ok.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url, pool="")

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"ok": True}

    async with worker:
        await wait_worker(cordum, worker.worker_id)
        assert cordum.registry is not None
        registered = next(w for w in cordum.registry.workers() if w.worker_id == worker.worker_id)
        assert registered.heartbeat.pool == ""
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        done = await wait_state(stub, reply.job_id, "SUCCEEDED")
    assert done.worker_id == worker.worker_id
    fields = await raw_fields(cordum, reply.job_id)
    assert fields["subject"] == cap.direct_subject(worker.worker_id)


async def test_upstream_sharp_edge_dispatches_spread_between_heartbeats(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream: the scheduler never counts its own dispatches between heartbeats, so every
    job goes to the same "least loaded" worker until its next heartbeat, ties broken by map
    order (§1.8, §10 Routing). Here local load accounting spreads them."""
    stub = jobs(channel)
    topic = f"job.t.spread.{prefix}"
    release = asyncio.Event()
    ran: collections.Counter[str] = collections.Counter()
    workers = [
        make_worker(f"w{i}-{prefix}", nats_url, redis_url, max_parallel=4, heartbeat_interval=60)
        for i in range(2)
    ]
    for worker in workers:

        @worker.handler(topic)
        async def hold(ctx: Any, data: Any) -> Any:
            ran[ctx.worker_id] += 1
            await release.wait()
            return {}

    async with workers[0], workers[1]:
        for worker in workers:
            await wait_worker(cordum, worker.worker_id)
        ids = []
        for _ in range(6):  # one at a time: no heartbeat comes between them
            reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
            await wait_state(stub, reply.job_id, "DISPATCHED")
            ids.append(reply.job_id)
        await eventually(lambda: _total(ran), until=lambda n: n == 6, what="6 jobs running")
        assert sorted(ran.values()) == [3, 3], ran
        release.set()
        for job_id in ids:
            await wait_state(stub, job_id, "SUCCEEDED")


async def _total(counter: collections.Counter[str]) -> int:
    return sum(counter.values())


# -- results ------------------------------------------------------------------------------------


async def test_upstream_sharp_edge_late_duplicate_result_is_ignored_not_looped(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream: a result whose transition is illegal makes the handler return a retryable
    error, which under JetStream is NAKed and redelivered forever (§10 State machine). Here
    a result for a terminal job is recorded in its event log once and ignored."""
    assert cordum.nats is not None
    stub = jobs(channel)
    topic = f"job.t.ok.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"first": True}

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        done = await wait_state(stub, reply.job_id, "SUCCEEDED")

    late = result_packet(
        reply.job_id, agent.JOB_STATUS_FAILED, worker_id=worker.worker_id, error_message="late"
    )
    await cordum.nats.publish(cap.SUBJECT_RESULT, late)
    notes = await eventually(lambda: ignored_results(cordum, reply.job_id), what="ignored")
    assert notes == [f"ignored late result FAILED from {worker.worker_id}"]
    duplicate = result_packet(
        reply.job_id,
        agent.JOB_STATUS_SUCCEEDED,
        worker_id=worker.worker_id,
        result_ptr=f"redis://res:{reply.job_id}",
    )
    await cordum.nats.publish(cap.SUBJECT_RESULT, duplicate)
    notes = await eventually(
        lambda: ignored_results(cordum, reply.job_id), until=lambda n: len(n) == 2, what="two"
    )
    after = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
    assert after.state == state("SUCCEEDED")
    assert after.updated_at == done.updated_at
    assert after.error_message == ""
    assert await dlq_entry(cordum, reply.job_id) == {}
    # Each message was handled once: nothing is redelivered or re-queued.
    assert len(await ignored_results(cordum, reply.job_id)) == 2


async def test_upstream_sharp_edge_result_for_a_pending_job_does_not_crash(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream: a SUCCEEDED/CANCELLED result for a job still PENDING (or with no state) is
    an illegal transition and loops forever under JetStream (§10 State machine). Here it is
    ignored: a job never dispatched cannot have a result. Results for unknown jobs too."""
    assert cordum.nats is not None and cordum.redis is not None
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.throttle.{prefix}"))
    try:
        for status in (agent.JOB_STATUS_SUCCEEDED, agent.JOB_STATUS_FAILED):
            await cordum.nats.publish(cap.SUBJECT_RESULT, result_packet(reply.job_id, status))
        notes = await eventually(
            lambda: ignored_results(cordum, reply.job_id),
            until=lambda n: len(n) == 2,
            what="both results ignored",
        )
        assert notes == [
            "ignored late result SUCCEEDED from hand-made",
            "ignored late result FAILED from hand-made",
        ]
        job = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
        assert job.state == state("PENDING")
        assert job.attempts == 0
        # An unknown job id creates nothing.
        unknown = f"unknown-{prefix}"
        await cordum.nats.publish(
            cap.SUBJECT_RESULT, result_packet(unknown, agent.JOB_STATUS_SUCCEEDED)
        )
        # The scheduler goes on: the throttled job keeps being asked about.
        before = len(
            (await stub.ListJobDecisions(J.ListJobDecisionsRequest(job_id=job.id))).decisions
        )

        async def decisions() -> int:
            page = await stub.ListJobDecisions(J.ListJobDecisionsRequest(job_id=job.id))
            return len(page.decisions)

        await eventually(decisions, until=lambda n: n > before, what="another decision")
        assert await cordum.redis.keys(f"*{unknown}*") == []
    finally:
        await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id))


async def test_upstream_sharp_edge_max_retries_not_reset_by_redelivery(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream: `SetJobMeta` runs on every submit delivery and resets `attempts` to 0 before
    the max_retries check, so `max_retries_exceeded` practically never fires (§1.4 step 6,
    §10 State machine). Here redelivered submits keep the attempt count."""
    assert cordum.nats is not None and cordum.store is not None
    stub = jobs(channel)
    topic = f"job.t.flaky.{prefix}"
    calls: list[str] = []
    first_failed = asyncio.Event()
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def fail(ctx: Any, data: Any) -> Any:
        calls.append(ctx.job_id)
        first_failed.set()
        raise JobFailed("always")

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, max_retries=1))
        await asyncio.wait_for(first_failed.wait(), 10)
        # Failed once, waiting out its retry backoff: attempts is 1.
        waiting = await wait_state(stub, reply.job_id, "PENDING")
        assert waiting.attempts == 1
        record = await cordum.store.get(reply.job_id)
        assert record is not None
        # The submit message is delivered again, several times (redelivery, replays).
        for _ in range(3):
            await cordum.nats.publish(
                cordum.subjects.submit, submit_packet(record.request, reply.trace_id)
            )
        failed = await wait_state(stub, reply.job_id, "FAILED", within=15)
        entry = await wait_dlq(cordum, reply.job_id)
    assert failed.attempts == 2
    assert len(calls) == 2
    assert entry["attempts"] == "2"


async def test_upstream_sharp_edge_result_key_gets_a_ttl(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream: `res:<job_id>` written by workers has no TTL and nothing ever expires it
    (§9 item 15, §10 Storage). Here it gets the job TTL when the result arrives."""
    assert cordum.redis is not None
    stub = jobs(channel)
    topic = f"job.t.ok.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)  # writes res:<id> without expiry

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {"ok": True}

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        await wait_state(stub, reply.job_id, "SUCCEEDED")
    ttl = await cordum.redis.ttl(f"res:{reply.job_id}")
    assert 0 < ttl <= cordum.settings.job_ttl_s
    assert 0 < await cordum.redis.ttl(f"ctx:{reply.job_id}") <= cordum.settings.job_ttl_s


async def test_upstream_sharp_edge_dlq_does_not_overwrite_the_worker_result(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    """Upstream: the gateway's DLQ tap overwrites the worker's own `res:<job_id>` with a
    synthetic error body (§10 Storage). Here the DLQ entry lives at `dlq:<id>` and the
    worker's output stays as written."""
    assert cordum.nats is not None and cordum.redis is not None
    stub = jobs(channel)
    # No worker serves this topic: the job waits DISPATCHED on the topic subject.
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.nobody.{prefix}"))
    await wait_state(stub, reply.job_id, "DISPATCHED")
    partial = b'{"partial": true, "rows": 12}'
    await cordum.redis.set(f"res:{reply.job_id}", partial)
    await cordum.nats.publish(
        cap.SUBJECT_RESULT,
        result_packet(
            reply.job_id,
            agent.JOB_STATUS_FAILED,
            worker_id="cap-agent",
            result_ptr=f"redis://res:{reply.job_id}",
            error_message="handler failed",
            error_code="boom",
        ),
    )
    await wait_state(stub, reply.job_id, "FAILED")
    entry = await wait_dlq(cordum, reply.job_id)
    assert entry["reason_code"] == "boom"
    assert entry["reason"] == "handler failed"
    assert await cordum.redis.get(f"res:{reply.job_id}") == partial
    assert await cordum.redis.ttl(f"res:{reply.job_id}") > 0


# -- the state machine and the reconciler --------------------------------------------------------


async def test_upstream_sharp_edge_timed_out_jobs_get_dlq_entries(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    """Upstream: the reconciler only changes state to TIMEOUT: no DLQ entry, no cancel, no
    result (§1.11, §10 State machine). Here a timeout writes `dlq:<id>` and announces it on
    the DLQ subject like every other non-success."""
    assert cordum.nats is not None
    stub = jobs(channel)
    announced: list[agent.JobResult] = []

    async def on_dlq(msg: Any) -> None:
        announced.append(cap.decode(msg.data).job_result)

    sub = await cordum.nats.subscribe(cordum.subjects.dlq, cb=on_dlq)
    try:
        reply = await stub.SubmitJob(
            J.SubmitJobRequest(prompt="x", topic=f"job.t.approve.{prefix}", deadline_ms=200)
        )
        await wait_state(stub, reply.job_id, "TIMEOUT")
        entry = await wait_dlq(cordum, reply.job_id)
        assert entry["reason_code"] == "deadline_exceeded"
        assert entry["status"] == "JOB_STATUS_TIMEOUT"
        mine = await eventually(lambda: _mine(announced, reply.job_id), what="the DLQ announcement")
        assert mine[0].status == agent.JOB_STATUS_TIMEOUT
        assert mine[0].error_code == "deadline_exceeded"
    finally:
        await sub.unsubscribe()


async def _mine(announced: list[agent.JobResult], job_id: str) -> list[agent.JobResult]:
    return [r for r in announced if r.job_id == job_id]


async def test_upstream_sharp_edge_dlq_announcement_does_not_break_the_batch(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream publishes DLQ results with an empty `worker_id` (§1.13), which CAP's own
    validation (worker_id must equal sender_id) refuses; a scheduler that builds its DLQ
    packet that way fails half-way through a batch. Denied, allowed and held jobs submitted
    together all reach their state, and the denial is announced."""
    assert cordum.nats is not None
    stub = jobs(channel)
    topic = f"job.t.ok.{prefix}"
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        return {}

    announced: list[agent.JobResult] = []

    async def on_dlq(msg: Any) -> None:
        announced.append(cap.decode(msg.data).job_result)

    sub = await cordum.nats.subscribe(cordum.subjects.dlq, cb=on_dlq)
    try:
        async with worker:
            await wait_worker(cordum, worker.worker_id)
            reply = await stub.BatchSubmitJobs(
                J.BatchSubmitJobsRequest(
                    jobs=[
                        J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}"),
                        J.SubmitJobRequest(prompt="x", topic=topic),
                        J.SubmitJobRequest(prompt="x", topic=f"job.t.deny.{prefix}.b"),
                        J.SubmitJobRequest(prompt="x", topic=topic),
                    ]
                )
            )
            denied, ok, denied_b, ok_b = (r.job_id for r in reply.results)
            for job_id in (ok, ok_b):
                await wait_state(stub, job_id, "SUCCEEDED")
            for job_id in (denied, denied_b):
                await wait_state(stub, job_id, "DENIED")
        dead = await eventually(
            lambda: _mine(announced, denied), what="the denial on the DLQ subject"
        )
        assert dead[0].error_code == "safety_denied"
        assert dead[0].worker_id == cordum.settings.sender_id
    finally:
        await sub.unsubscribe()


async def test_upstream_sharp_edge_pending_replayer_keeps_the_trace(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream: the pending replayer re-submits stuck PENDING jobs with an empty trace id
    (§1.12, §10 State machine). Here a job whose submit message was lost is replayed with
    its own trace id."""
    assert cordum.jobs is not None and cordum.store is not None
    topic = f"job.t.ok.{prefix}"
    trace = f"trace-{prefix}"
    seen: dict[str, str] = {}
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        seen["trace_id"] = ctx.trace_id
        return {}

    # Stored, but its sys.job.submit message is never published (lost).
    built = cordum.jobs.build(J.SubmitJobRequest(prompt="x", topic=topic, trace_id=trace), Caller())
    outcome = await cordum.store.submit_many([built.new], now_ms())
    assert outcome[0].status == "ok"
    job_id = built.new.job.id
    async with worker:
        done = await wait_state(jobs(channel), job_id, "SUCCEEDED", within=20)
    assert done.trace_id == trace
    assert seen["trace_id"] == trace


async def test_upstream_sharp_edge_running_means_the_worker_reported_progress(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream writes DISPATCHED and RUNNING back to back right after publishing, so RUNNING
    never means a worker acknowledged anything (§1.3, §10 Routing). Here a job is DISPATCHED
    until its worker reports progress."""
    stub = jobs(channel)
    topic = f"job.t.ok.{prefix}"
    started, reported, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def run(ctx: Any, data: Any) -> Any:
        started.set()
        await reported.wait()
        await ctx.progress(50, "half way")
        await release.wait()
        return {}

    async with worker:
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        await asyncio.wait_for(started.wait(), 10)
        job = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
        assert job.state == state("DISPATCHED")
        reported.set()
        await wait_state(stub, reply.job_id, "RUNNING")
        release.set()
        await wait_state(stub, reply.job_id, "SUCCEEDED")
    states = [s for _, s, _ in await events(cordum, reply.job_id)]
    assert states == ["PENDING", "DISPATCHED", "RUNNING", "SUCCEEDED"]


# -- tenant concurrency --------------------------------------------------------------------------

CONCURRENCY_POLICY = TEST_POLICY.replace(
    "rules:\n",
    """rules:
  - id: one-at-a-time
    match: {topics: ["job.t.conc.*"]}
    decision: allow
    constraints:
      budgets: {max_concurrent_jobs: 1}
  - id: one-at-a-time-approved
    match: {topics: ["job.t.concheld.*"]}
    decision: require_approval
    reason: held
    constraints:
      budgets: {max_concurrent_jobs: 1}
""",
    1,
)


async def test_upstream_sharp_edge_tenant_concurrency_counts_only_in_flight_jobs(
    nats_url: str, redis_url: str, tmp_path: Path, prefix: str
) -> None:
    """Upstream: `CancelJob` never removes the job from `job:tenant:active:<tenant>` (the
    count leaks), and approved jobs are already in that set when `max_concurrent_jobs` is
    checked, so they count themselves and a limit of 1 blocks them forever (§10 State
    machine). Here only dispatched, unfinished jobs count, and a cancel frees the slot."""
    config = write_config(tmp_path, policy=CONCURRENCY_POLICY)
    topic, held_topic = f"job.t.conc.{prefix}", f"job.t.concheld.{prefix}"
    gates: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
    running: set[str] = set()
    worker = make_worker(f"w-{prefix}", nats_url, redis_url, max_parallel=4)

    async def hold(ctx: Any, data: Any) -> Any:
        running.add(ctx.job_id)
        try:
            await gates[ctx.job_id].wait()
        finally:
            running.discard(ctx.job_id)
        return {}

    worker.add_handler(topic, hold)
    worker.add_handler(held_topic, hold)

    async with (
        running_app(app_settings(nats_url, redis_url, config)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        worker,
    ):
        stub, approval = jobs(channel), approvals(channel)
        tenant = f"tc-{prefix}"

        def submit(topic: str, tenant: str = tenant) -> Any:
            return stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, tenant_id=tenant))

        # An approved job does not count itself against the limit.
        held = await submit(held_topic)
        await wait_state(stub, held.job_id, "APPROVAL_REQUIRED")
        await approval.ApproveJob(A.ApproveJobRequest(job_id=held.job_id))
        await eventually(lambda: _has(running, held.job_id), what="the approved job running")
        gates[held.job_id].set()
        await wait_state(stub, held.job_id, "SUCCEEDED")

        first = await submit(topic)
        await eventually(lambda: _has(running, first.job_id), what="the first job running")
        second = await submit(topic)
        blocked = await eventually(
            lambda: stub.GetJob(J.GetJobRequest(job_id=second.job_id)),
            until=lambda j: "concurrency limit" in j.pending_reason,
            what="the second job waiting for a slot",
        )
        assert blocked.state == state("PENDING")
        # Another tenant is not affected.
        other = await submit(topic, tenant=f"other-{prefix}")
        await eventually(lambda: _has(running, other.job_id), what="another tenant's job")
        gates[other.job_id].set()

        await stub.CancelJob(J.CancelJobRequest(job_id=first.job_id))
        await eventually(lambda: _has(running, second.job_id), what="the slot freed by cancel")
        gates[second.job_id].set()
        await wait_state(stub, second.job_id, "SUCCEEDED")


async def _has(items: set[str], item: str) -> bool:
    return item in items
