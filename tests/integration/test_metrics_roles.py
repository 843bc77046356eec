"""Prometheus metrics of every role, scraped over HTTP from /metrics of five processes' worth of
apps (gateway, scheduler, safety, workflow, context: one role each, one namespace) while jobs,
a workflow run and context builds flow through them.

Each app has a registry of its own, created with it, so counters start at zero and the values
below are exact: a metric counted twice, in the wrong role, or not at all fails the test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio

from cordum.server.app import App
from cordum.v1 import job_service_pb2

from support.admin import own_app
from support.context import CHAT, C, engine, payload
from support.jobs import jobs, wait_state
from support.metrics import scrape, wait_metric
from support.workflows import Api, make_worker, run_status

J = job_service_pb2


@dataclass
class Roles:
    gateway: App
    scheduler: App
    safety: App
    workflow: App
    context: App


@pytest_asyncio.fixture
async def roles(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[Roles]:
    namespace = f"m{uuid.uuid4().hex[:8]}."
    async with AsyncExitStack() as stack:

        async def role(name: str, **extra: Any) -> App:
            return await stack.enter_async_context(
                own_app(nats_url, redis_url, config_dir, roles=[name], namespace=namespace, **extra)
            )

        safety = await role("safety")
        remote = {"safety_addr": f"127.0.0.1:{safety.grpc_port}"}
        yield Roles(
            scheduler=await role("scheduler", **remote),
            workflow=await role("workflow", **remote),
            context=await role("context", **remote),
            gateway=await role("gateway", **remote),
            safety=safety,
        )


async def test_every_role_exports_its_metrics_as_work_flows(
    roles: Roles, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic, wf_topic = f"job.t.ok.{prefix}", f"job.t.wf.{prefix}"
    release = asyncio.Event()

    async def echo(ctx: Any, data: Any) -> Any:
        return {"echo": data}

    async def held(ctx: Any, data: Any) -> Any:
        await release.wait()
        return {"done": True}

    async with grpc.aio.insecure_channel(f"127.0.0.1:{roles.gateway.grpc_port}") as channel:
        stub, api = jobs(channel), Api(channel)
        worker = make_worker(nats_url, redis_url, f"w-{prefix}", {topic: echo, wf_topic: held})
        async with worker:
            # -- jobs: one that runs, one denied, one waiting for approval, one whose
            # deadline passes while it waits (the reconciler times it out).
            ran = await stub.SubmitJobAndWait(
                J.SubmitJobAndWaitRequest(
                    job=J.SubmitJobRequest(topic=topic, prompt="hi"), timeout_ms=20_000
                )
            )
            assert ran.done
            denied = await stub.SubmitJob(
                J.SubmitJobRequest(topic=f"job.t.deny.{prefix}", prompt="x")
            )
            await stub.SubmitJob(J.SubmitJobRequest(topic=f"job.t.approve.{prefix}", prompt="x"))
            late = await stub.SubmitJob(
                J.SubmitJobRequest(topic=f"job.t.approve.{prefix}", prompt="x", deadline_ms=300)
            )
            await wait_state(stub, denied.job_id, "DENIED", within=30)
            await wait_state(stub, late.job_id, "TIMEOUT", within=30)

            # -- a workflow run, held in its step until the workflow role counts it active.
            await api.upsert({"id": f"m-{prefix}", "steps": {"one": {"topic": wf_topic}}})
            started = await api.start(f"m-{prefix}", {})
            await wait_metric(roles.workflow, "cordum_workflow_runs_active", 1)
            release.set()
            run = await api.wait(started.run_id, within=30)
            assert run_status(run) == "SUCCEEDED"

            # Workers are counted live by the processes that place jobs.
            for app in (roles.gateway, roles.scheduler):
                assert (await scrape(app)).value("cordum_workers_live") >= 1

        # -- the context engine: one CHAT window, one memory update.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{roles.context.grpc_port}") as ctx_ch:
            memory = f"metrics-{prefix}"
            await engine(ctx_ch).UpdateMemory(
                C.UpdateMemoryRequest(
                    memory_id=memory, mode=CHAT, logical_payload=payload(prompt="hello")
                )
            )
            window = await engine(ctx_ch).BuildWindow(
                C.BuildWindowRequest(
                    memory_id=memory, mode=CHAT, logical_payload=payload(prompt="again")
                )
            )
            assert window.input_tokens > 0

    # -- gateway: API calls, submissions, run starts.
    gw = await scrape(roles.gateway)
    submit_and_wait = "/cordum.v1.JobService/SubmitJobAndWait"
    assert gw.value("cordum_grpc_requests_total", method=submit_and_wait, code="OK") == 1
    assert gw.value("cordum_grpc_request_duration_seconds_count", method=submit_and_wait) == 1
    assert gw.value("cordum_grpc_requests_total", method="/cordum.v1.JobService/SubmitJob") == 3
    assert gw.value("cordum_jobs_submitted_total", topic=topic) == 1
    assert gw.value("cordum_jobs_submitted_total", topic=f"job.t.approve.{prefix}") == 2
    assert gw.value("cordum_workflow_runs_total", status="RUN_STATUS_PENDING") == 1
    assert not gw.has("cordum_jobs_queue_depth")  # a scheduler's gauge

    # -- scheduler: transitions by state and topic, dispatch latency, queue depths, DLQ,
    # reconciler actions (gauges are sampled at scrape time, so they are current now).
    sc = await scrape(roles.scheduler)
    moved = "cordum_jobs_transitions_total"
    assert sc.value(moved, state="DISPATCHED", topic=topic) == 1
    assert sc.value(moved, state="SUCCEEDED", topic=topic) == 1
    assert sc.value(moved, state="DENIED", topic=f"job.t.deny.{prefix}") == 1
    assert sc.value(moved, state="APPROVAL_REQUIRED", topic=f"job.t.approve.{prefix}") == 2
    assert sc.value(moved, state="TIMEOUT", topic=f"job.t.approve.{prefix}") == 1
    assert sc.value(moved, state="SUCCEEDED", topic=wf_topic) == 1
    # Dispatched straight from their submission: the job and the workflow step.
    assert sc.value("cordum_dispatch_latency_seconds_count") == 2
    assert sc.value("cordum_dispatch_latency_seconds_sum") > 0
    assert sc.value("cordum_jobs_queue_depth", state="APPROVAL_REQUIRED") == 1
    assert sc.value("cordum_jobs_queue_depth", state="DISPATCHED") == 0
    assert sc.value("cordum_dlq_entries") == 2  # the denied job and the timed-out one
    assert sc.value("cordum_reconciler_actions_total", reconciler="jobs", action="timed_out") == 1

    # -- safety kernel: one decision per check, by type; its Check calls.
    sf = await scrape(roles.safety)
    decisions = "cordum_safety_decisions_total"
    assert sf.value(decisions, decision="DECISION_TYPE_ALLOW") == 2
    assert sf.value(decisions, decision="DECISION_TYPE_DENY") == 1
    assert sf.value(decisions, decision="DECISION_TYPE_REQUIRE_HUMAN") == 2
    check = "/cordum.agent.v1.SafetyKernel/Check"
    assert sf.value("cordum_grpc_requests_total", method=check, code="OK") == 5
    assert sc.value(decisions) == 0  # counted where decided, not again by the scheduler

    # -- workflow engine: the run's status changes; nothing active any more.
    wf = await wait_metric(roles.workflow, "cordum_workflow_runs_active", 0)
    assert wf.value("cordum_workflow_runs_total", status="RUN_STATUS_RUNNING") == 1
    assert wf.value("cordum_workflow_runs_total", status="RUN_STATUS_SUCCEEDED") == 1

    # -- context engine: builds, tokens, memory updates.
    cx = await scrape(roles.context)
    assert cx.value("cordum_context_builds_total", mode="CHAT") == 1
    assert cx.value("cordum_context_window_tokens_count", mode="CHAT") == 1
    assert cx.value("cordum_context_window_tokens_sum", mode="CHAT") == window.input_tokens
    assert cx.value("cordum_context_memory_updates_total", mode="CHAT") == 1
    build = "/cordum.v1.ContextEngine/BuildWindow"
    assert cx.value("cordum_grpc_requests_total", method=build, code="OK") == 1


async def test_a_failing_sampler_does_not_fail_the_scrape(
    nats_url: str, redis_url: str, config_dir: Path
) -> None:
    """Gauges sampled from Redis keep their last value when a sampler fails; the scrape
    still answers (an exception would make it a 500) with every other metric."""
    async with own_app(nats_url, redis_url, config_dir, roles=["scheduler", "safety"]) as app:
        before = await scrape(app)
        assert before.has("cordum_dlq_entries") and before.has("cordum_jobs_queue_depth")

        async def broken() -> None:
            raise ConnectionError("redis is down")

        app.metrics.add_sampler(broken)
        after = await scrape(app)
        assert after.value("cordum_dlq_entries") == before.value("cordum_dlq_entries") == 0
        assert after.has("cordum_workers_live")
