"""Each step type end to end (in-process app, real NATS and Valkey, SDK workers), with its
failure path: job, condition, delay, notify, approval, for_each; retries, timeouts and
parallelism."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from nats.aio.client import Client as NATS

from cordum.sdk import cap
from cordum.sdk.worker import JobContext, JobFailed
from cordum.server.app import App
from cordum.v1 import (
    approval_service_pb2,
    approval_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    run_service_pb2,
)

from support.waiting import eventually
from support.workflows import (
    Api,
    Recorder,
    make_worker,
    recording,
    run_status,
    status,
    value,
)


@pytest.fixture
def api(channel: grpc.aio.Channel) -> Api:
    return Api(channel)


async def echo(ctx: JobContext, data: Any) -> Any:
    return {"echo": data}


async def test_job_steps_chain_outputs_and_carry_tenant_labels_and_budget(
    cordum: App, api: Api, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.job"
    seen = Recorder()
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, echo)}):
        wf = await api.upsert(
            {
                "id": f"chain-{prefix}",
                "org_id": "acme",
                "steps": {
                    "fetch": {
                        "type": "http",
                        "topic": topic,
                        "timeout_sec": 30,
                        "route_labels": {"region": "eu"},
                        "input": {"url": "${input.url}", "n": "${input.n * 2}"},
                        "output_path": "fetched",
                    },
                    "use": {
                        "type": "llm",
                        "topic": topic,
                        "depends_on": ["fetch"],
                        "input": {
                            "text": "got ${steps.fetch.output.echo.url} (${ctx.fetched.echo.n})"
                        },
                    },
                },
            }
        )
        started = await api.start(wf.id, {"url": "http://x", "n": 21}, labels={"team": "blue"})
        run = await api.wait(started.run_id)
    assert run_status(run) == "SUCCEEDED"
    assert value(run.steps["use"].output) == {"echo": {"text": "got http://x (42)"}}
    assert value(run.output) == {"use": {"echo": {"text": "got http://x (42)"}}}
    fetch_job = run.steps["fetch"].job_id
    assert fetch_job == f"{run.id}:fetch@1"
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    job = await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=fetch_job))
    assert job.tenant_id == "acme" and run.tenant_id == "acme"
    assert job.trace_id == run.id
    assert job.max_retries == 0
    assert job.budget.deadline_ms == 30_000
    assert dict(job.labels) == {
        "team": "blue",
        "region": "eu",
        "workflow_id": wf.id,
        "run_id": run.id,
        "step_id": "fetch",
    }
    ctx = seen.contexts[fetch_job]
    assert ctx.env["run_id"] == run.id and ctx.env["step_id"] == "fetch"
    assert 25_000 < ctx.budget.deadline_ms <= 30_000  # the remaining time at dispatch


async def test_a_failing_job_fails_its_step_and_the_run(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.fail"

    async def broken(ctx: JobContext, data: Any) -> Any:
        raise JobFailed("no such table")

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: broken}):
        wf = await api.upsert({"id": f"fail-{prefix}", "steps": {"a": {"topic": topic}}})
        run = await api.wait((await api.start(wf.id)).run_id)
    assert run_status(run) == "FAILED"
    assert status(run, "a") == "FAILED"
    assert run.steps["a"].error.message == "handler failed: no such table"
    assert run.error.step_id == "a"


async def test_independent_steps_are_in_flight_together(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.par"
    seen = Recorder()

    async def meet(ctx: JobContext, data: Any) -> Any:
        # Each of the three waits until all three are in flight at once.
        async with asyncio.timeout(10):
            while seen.max_in_flight < 3:
                seen.changed.clear()
                await seen.changed.wait()
        return data

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, meet)}):
        wf = await api.upsert(
            {
                "id": f"par-{prefix}",
                "steps": {
                    "a": {"topic": topic},
                    "b": {"topic": topic},
                    "c": {"topic": topic},
                    "join": {"topic": topic, "depends_on": ["a", "b", "c"]},
                },
            }
        )
        run = await api.wait((await api.start(wf.id, {"k": 1})).run_id)
    assert run_status(run) == "SUCCEEDED"
    assert seen.max_in_flight == 3


async def test_conditions_branch_and_skip_what_only_they_feed(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.cond"
    seen = Recorder()
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, echo)}):
        wf = await api.upsert(
            {
                "id": f"cond-{prefix}",
                "steps": {
                    "is_big": {"type": "condition", "condition": "input.n > 10"},
                    "is_small": {"type": "condition", "condition": "!(input.n > 10)"},
                    "big": {"topic": topic, "depends_on": ["is_big"], "input": {"b": 1}},
                    "small": {"topic": topic, "depends_on": ["is_small"], "input": {"s": 1}},
                    "gated": {"topic": topic, "condition": "input.n == 99", "input": {"g": 1}},
                    "report": {
                        "topic": topic,
                        "depends_on": ["big", "small"],
                        "input": {"big": "${steps.big.status}", "small": "${steps.small.status}"},
                    },
                },
            }
        )
        run = await api.wait((await api.start(wf.id, {"n": 3})).run_id)
        # The failure path: an expression that cannot be evaluated fails the step.
        broken = await api.upsert(
            {
                "id": f"cond-bad-{prefix}",
                "steps": {"c": {"type": "condition", "condition": "input.n > 1"}},
            }
        )
        failed = await api.wait((await api.start(broken.id, {"m": 1})).run_id)
    assert run_status(run) == "SUCCEEDED"
    assert [status(run, s) for s in ("is_big", "big", "is_small", "small", "gated")] == [
        "SKIPPED",
        "SKIPPED",
        "SUCCEEDED",
        "SUCCEEDED",
        "SKIPPED",
    ]
    assert value(run.steps["report"].output) == {"echo": {"big": "SKIPPED", "small": "SUCCEEDED"}}
    received = list(seen.inputs.values())
    assert len(received) == 2
    assert {"s": 1} in received
    assert {"big": "SKIPPED", "small": "SUCCEEDED"} in received
    assert run_status(failed) == "FAILED"
    assert "no such key: n" in failed.steps["c"].error.message
    assert "step_condition_failed" in await api.event_types(failed.id)


async def test_a_delay_is_a_durable_timer(cordum: App, api: Api, prefix: str) -> None:
    wf = await api.upsert(
        {
            "id": f"delay-{prefix}",
            "steps": {
                "wait": {"type": "delay", "delay_sec": 1},
                "past": {"type": "delay", "delay_until": "2001-01-01T00:00:00Z"},
            },
        }
    )
    started = await api.start(wf.id)
    running = await api.wait_step(started.run_id, "wait", "RUNNING")
    due = running.steps["wait"].next_attempt_at.ToMilliseconds()
    assert due - running.steps["wait"].started_at.ToMilliseconds() == 1000
    assert status(running, "past") == "SUCCEEDED"  # a time already passed waits for nothing
    assert cordum.redis is not None
    score = await cordum.redis.zscore(f"{cordum.settings.namespace}wf:timers", started.run_id)
    assert score == due  # durable: in Redis, not in a task
    run = await api.wait(started.run_id)
    assert run_status(run) == "SUCCEEDED"
    assert run.steps["wait"].completed_at.ToMilliseconds() >= due
    # The failure path: a delay that cannot be computed is refused when saved.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.upsert(
            {"id": f"delay-bad-{prefix}", "steps": {"w": {"type": "delay", "delay_sec": -5}}}
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps.w.delay_sec" in info.value.details()


async def test_notify_publishes_an_alert_on_the_workflow_event_subject(
    cordum: App, api: Api, nats_url: str, prefix: str
) -> None:
    nc = NATS()
    await nc.connect(nats_url)
    alerts: list[bytes] = []

    async def collect(msg: Any) -> None:
        alerts.append(msg.data)

    await nc.subscribe(cordum.subjects.workflow_event, cb=collect)
    await nc.flush()  # the server has the SUB before the run publishes
    try:
        wf = await api.upsert(
            {
                "id": f"notify-{prefix}",
                "steps": {
                    "tell": {
                        "type": "notify",
                        "name": "Tell ops",
                        "input": {"level": "warn", "message": "order ${input.order} shipped"},
                    },
                    "broken": {
                        "type": "notify",
                        "depends_on": ["tell"],
                        "input": {"message": "${input.missing}"},
                    },
                },
            }
        )
        run = await api.wait((await api.start(wf.id, {"order": 7})).run_id)
        await eventually(lambda: _ready(alerts), within=5, what="the alert")
    finally:
        await nc.close()
    packet = cap.decode(alerts[0])
    assert packet.trace_id == run.id
    assert packet.alert.level == "WARN"
    assert packet.alert.message == "order 7 shipped"
    assert packet.alert.component == "workflow-engine"
    assert dict(packet.alert.details)["step_id"] == "tell"
    assert len(alerts) == 1
    assert status(run, "tell") == "SUCCEEDED"
    # The failure path: the second notify cannot build its message.
    assert status(run, "broken") == "FAILED"
    assert run_status(run) == "FAILED"
    assert "step_event_failed" in await api.event_types(run.id)


async def _ready(items: list[Any]) -> bool:
    return bool(items)


async def test_approval_pauses_and_approve_resumes_at_once(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.appr"
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: echo}):
        wf = await api.upsert(
            {
                "id": f"appr-{prefix}",
                "steps": {
                    "ok": {"type": "approval"},
                    "ship": {"topic": topic, "depends_on": ["ok"]},
                },
            }
        )
        started = await api.start(wf.id, {"x": 1})
        waiting = await api.wait_step(started.run_id, "ok", "WAITING")
        assert run_status(waiting) == "WAITING"
        assert status(waiting, "ship") == "PENDING"
        approved = await api.runs.ApproveStep(
            run_service_pb2.ApproveStepRequest(
                workflow_id=wf.id, run_id=started.run_id, step_id="ok", reason="fine"
            )
        )
        # Not on a reconciler tick: the answer already shows the dependent dispatched.
        assert status(approved, "ok") == "SUCCEEDED"
        assert status(approved, "ship") in ("RUNNING", "SUCCEEDED")
        run = await api.wait(started.run_id)
    assert run_status(run) == "SUCCEEDED"
    types = await api.event_types(run.id)
    assert types.index("step_waiting") < types.index("step_approved")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.runs.ApproveStep(run_service_pb2.ApproveStepRequest(run_id=run.id, step_id="ok"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_rejecting_an_approval_fails_the_run(api: Api, prefix: str) -> None:
    wf = await api.upsert(
        {
            "id": f"rej-{prefix}",
            "steps": {
                "ok": {"type": "approval"},
                "after": {"type": "notify", "depends_on": ["ok"]},
            },
        }
    )
    started = await api.start(wf.id)
    await api.wait_step(started.run_id, "ok", "WAITING")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.runs.ApproveStep(
            run_service_pb2.ApproveStepRequest(run_id=started.run_id, step_id="after")
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rejected = await api.runs.RejectStep(
        run_service_pb2.RejectStepRequest(run_id=started.run_id, step_id="ok", reason="no")
    )
    assert run_status(rejected) == "FAILED"
    assert status(rejected, "ok") == "FAILED"
    assert rejected.steps["ok"].error.message == "no"
    assert status(rejected, "after") == "CANCELLED"


async def test_for_each_200_items_never_exceeds_max_parallel_and_keeps_order(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.fan"
    seen = Recorder()

    async def double(ctx: JobContext, data: Any) -> Any:
        await asyncio.sleep(0.01 + 0.002 * (data["i"] % 5))
        return data["x"] * 2

    handler = recording(seen, double)
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: handler}, max_parallel=20):
        wf = await api.upsert(
            {
                "id": f"fan-{prefix}",
                "steps": {
                    "fan": {
                        "topic": topic,
                        "for_each": "input.items",
                        "max_parallel": 5,
                        "input": {"x": "${item}", "i": "${index}"},
                        "output_path": "doubled",
                    },
                    "sum": {
                        "type": "condition",
                        "depends_on": ["fan"],
                        "condition": "steps.fan.output.size() == 200",
                    },
                },
            }
        )
        items = list(range(200))
        run = await api.wait((await api.start(wf.id, {"items": items})).run_id, within=60)
    assert run_status(run) == "SUCCEEDED"
    assert len(seen.started) == 200
    assert 2 <= seen.max_in_flight <= 5
    assert value(run.steps["fan"].output) == [i * 2 for i in items]
    assert list(run.steps["fan"].children) == [f"fan[{i}]" for i in items]
    assert value(run.context.fields["doubled"]) == [i * 2 for i in items]
    assert status(run, "sum") == "SUCCEEDED"
    # A child failure fails the parent at once (fail-fast); its siblings are cancelled.
    topic_bad = f"job.t.ok.{prefix}.fanbad"

    async def picky(ctx: JobContext, data: Any) -> Any:
        if data["x"] == 3:
            raise JobFailed("three")
        await asyncio.sleep(0.5)
        return data

    async with make_worker(nats_url, redis_url, f"w2-{prefix}", {topic_bad: picky}):
        bad = await api.upsert(
            {
                "id": f"fanbad-{prefix}",
                "steps": {
                    "fan": {
                        "topic": topic_bad,
                        "for_each": "input.items",
                        "input": {"x": "${item}"},
                    }
                },
            }
        )
        failed = await api.wait((await api.start(bad.id, {"items": [1, 2, 3, 4]})).run_id)
    assert run_status(failed) == "FAILED"
    assert status(failed, "fan") == "FAILED"
    assert status(failed, "fan[2]") == "FAILED"
    assert {status(failed, f"fan[{i}]") for i in (0, 1, 3)} <= {"CANCELLED", "SUCCEEDED"}


async def test_retries_back_off_exponentially(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.retry"
    seen = Recorder()

    async def flaky(ctx: JobContext, data: Any) -> Any:
        if len(seen.started) < 3:
            raise JobFailed(f"attempt {ctx.env['attempt']} failed")
        return "finally"

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, flaky)}):
        wf = await api.upsert(
            {
                "id": f"retry-{prefix}",
                "steps": {
                    "a": {
                        "topic": topic,
                        "retry": {
                            "max_retries": 3,
                            "initial_backoff_sec": 0.2,
                            "multiplier": 2,
                            "jitter": 0.1,
                        },
                    }
                },
            }
        )
        run = await api.wait((await api.start(wf.id)).run_id)
    assert run_status(run) == "SUCCEEDED"
    assert run.steps["a"].attempts == 3
    assert seen.started == [f"{run.id}:a@{n}" for n in (1, 2, 3)]
    events = await api.timeline(run.id)
    retries = [e for e in events if e.type == "step_retry_scheduled"]
    delays = [e.data.fields["delay_ms"].number_value for e in retries]
    assert len(delays) == 2
    assert 180 <= delays[0] <= 220 and 360 <= delays[1] <= 440
    dispatched = {e.job_id: e.time.ToMilliseconds() for e in events if e.type == "step_dispatched"}
    for retry, delay in zip(retries, delays, strict=True):
        next_job = f"{run.id}:a@{int(retry.data.fields['next_attempt'].number_value)}"
        assert dispatched[next_job] - retry.time.ToMilliseconds() >= delay


async def test_a_step_timeout_times_the_job_out_and_retries_it(
    api: Api, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.slow"
    seen = Recorder()
    cancelled: list[str] = []

    async def slow(ctx: JobContext, data: Any) -> Any:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.job_id)
            raise
        return data

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, slow)}):
        wf = await api.upsert(
            {
                "id": f"slow-{prefix}",
                "steps": {
                    "a": {
                        "topic": topic,
                        "timeout_sec": 1,
                        "retry": {"max_retries": 1, "initial_backoff_sec": 0.1},
                    }
                },
            }
        )
        run = await api.wait((await api.start(wf.id)).run_id)
        await eventually(lambda: _ready(cancelled), what="the worker to be told")
    assert run_status(run) == "TIMED_OUT"
    assert status(run, "a") == "TIMED_OUT"
    assert run.steps["a"].attempts == 2
    assert len(seen.started) == 2
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    job = await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=f"{run.id}:a@1"))
    assert job.state == job_pb2.JOB_STATE_TIMEOUT


async def test_policy_decisions_reach_the_step(
    api: Api, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Step jobs pass the safety gate: a denied job fails its step (never retried), a held
    one waits for a human and then continues."""
    held_topic = f"job.t.approve.{prefix}"
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {held_topic: echo}):
        wf = await api.upsert(
            {
                "id": f"policy-{prefix}",
                "steps": {
                    "held": {"topic": held_topic, "input": {"v": 1}},
                    "denied": {
                        "topic": f"job.t.deny.{prefix}",
                        "depends_on": ["held"],
                        "retry": {"max_retries": 3, "initial_backoff_sec": 0.1},
                    },
                },
            }
        )
        started = await api.start(wf.id)

        async def held_noted() -> bool:
            return "step_job_approval_required" in await api.event_types(started.run_id)

        await eventually(held_noted, what="the held job to be noted")
        approvals = approval_service_pb2_grpc.ApprovalServiceStub(channel)
        await approvals.ApproveJob(
            approval_service_pb2.ApproveJobRequest(job_id=f"{started.run_id}:held@1")
        )
        run = await api.wait(started.run_id)
    assert status(run, "held") == "SUCCEEDED"
    assert status(run, "denied") == "FAILED"
    assert run.steps["denied"].attempts == 1
    assert run.steps["denied"].error.code == "DENIED"
    assert run_status(run) == "FAILED"
