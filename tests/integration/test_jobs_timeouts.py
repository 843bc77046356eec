"""The reconciler: dispatch and running timeouts (timeouts.yaml), job deadlines, and jobs of
workers that stopped heartbeating. Every timeout ends with a DLQ entry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio

from cordum.server.app import App

from support.cordum import app_settings, running_app, write_config
from support.hand_worker import HandWorker
from support.jobs import J, events, jobs, make_worker, state, wait_dlq, wait_state
from support.waiting import eventually

# A topic with its own 1 s running timeout (the file is written before the app starts).
SLOW_TOPIC = "job.t.slowrun.timeouts"

TIMEOUTS = """\
reconciler:
  dispatch_timeout_seconds: 1
  running_timeout_seconds: 9000
  scan_interval_seconds: 30
"""
# Only the topic's own timeout is short: it alone must bring the job down.
RUNNING_TIMEOUTS = f"""\
topics:
  {SLOW_TOPIC}: {{timeout_seconds: 1}}
reconciler:
  dispatch_timeout_seconds: 300
  running_timeout_seconds: 9000
  scan_interval_seconds: 30
"""


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, tmp_path_factory: Any) -> AsyncIterator[App]:
    config = write_config(tmp_path_factory.mktemp("timeouts"), timeouts=TIMEOUTS)
    async with running_app(app_settings(nats_url, redis_url, config)) as running:
        yield running


@pytest_asyncio.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


async def wait_worker(app: App, worker_id: str) -> None:
    async def known() -> bool:
        assert app.registry is not None
        return any(w.worker_id == worker_id for w in app.registry.workers())

    await eventually(known, what=f"worker {worker_id} in the registry")


async def test_dispatch_timeout_when_no_worker_takes_the_job(
    app: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=f"job.t.nobody.{prefix}"))
    timed_out = await wait_state(stub, reply.job_id, "TIMEOUT", within=8)
    assert timed_out.attempts == 1
    entry = await wait_dlq(app, reply.job_id)
    assert entry["reason_code"] == "dispatch_timeout"
    assert entry["status"] == "JOB_STATUS_TIMEOUT"
    assert entry["last_state"] == "DISPATCHED"
    assert any("no worker took it" in m for _, _, m in await events(app, reply.job_id))


async def test_running_timeout_per_topic_ends_the_job_and_cancels_the_worker(
    nats_url: str, redis_url: str, tmp_path: Path, prefix: str
) -> None:
    config = write_config(tmp_path, timeouts=RUNNING_TIMEOUTS)
    async with (
        running_app(app_settings(nats_url, redis_url, config)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        await _run_into_the_topic_timeout(app, jobs(channel), nats_url, redis_url, prefix)


async def _run_into_the_topic_timeout(
    app: App, stub: Any, nats_url: str, redis_url: str, prefix: str
) -> None:
    started, told_to_stop = asyncio.Event(), asyncio.Event()
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(SLOW_TOPIC)
    async def slow(ctx: Any, data: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            told_to_stop.set()
            raise
        return {}

    async with worker:
        await wait_worker(app, worker.worker_id)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=SLOW_TOPIC))
        await asyncio.wait_for(started.wait(), 10)
        timed_out = await wait_state(stub, reply.job_id, "TIMEOUT", within=8)
        await asyncio.wait_for(told_to_stop.wait(), 10)
    assert timed_out.worker_id == worker.worker_id
    entry = await wait_dlq(app, reply.job_id)
    assert entry["reason_code"] == "timeout"
    assert any("no result within 1s" in m for _, _, m in await events(app, reply.job_id))


async def test_deadline_ends_a_job_held_for_approval(
    app: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    reply = await stub.SubmitJob(
        J.SubmitJobRequest(prompt="x", topic=f"job.t.approve.{prefix}", deadline_ms=300)
    )
    assert reply.job.HasField("deadline")
    timed_out = await wait_state(stub, reply.job_id, "TIMEOUT", within=8)
    assert timed_out.attempts == 0
    entry = await wait_dlq(app, reply.job_id)
    assert entry["reason_code"] == "deadline_exceeded"
    assert entry["last_state"] == "APPROVAL_REQUIRED"


async def test_deadline_ends_a_running_job(
    app: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    stub = jobs(channel)
    topic = f"job.t.slow.{prefix}"
    seen: dict[str, int] = {}
    stopped = asyncio.Event()
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(topic)
    async def slow(ctx: Any, data: Any) -> Any:
        seen["deadline_ms"] = ctx.deadline_ms
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return {}

    async with worker:
        await wait_worker(app, worker.worker_id)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, deadline_ms=500))
        await wait_state(stub, reply.job_id, "TIMEOUT", within=8)
        await asyncio.wait_for(stopped.wait(), 10)
    # The worker was given what was left of the deadline.
    assert 0 < seen["deadline_ms"] <= 500
    entry = await wait_dlq(app, reply.job_id)
    assert entry["status"] == "JOB_STATUS_TIMEOUT"


# -- a worker that stops heartbeating mid-job -------------------------------------------------


async def test_job_of_a_lost_worker_is_requeued_and_runs_on_another(
    nats_url: str, redis_url: str, tmp_path: Path, prefix: str
) -> None:
    topic = f"job.t.lost.{prefix}"
    async with running_app(app_settings(nats_url, redis_url, write_config(tmp_path))) as app:
        assert app.registry is not None
        app.registry.ttl_s = 1.0  # lost after 1 s of silence (CAP's default is 15 s)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
            HandWorker(f"silent-{prefix}", topic, nats_url, silent_after_job=True) as silent,
        ):
            stub = jobs(channel)
            await wait_worker(app, silent.worker_id)
            reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, max_retries=1))
            await asyncio.wait_for(silent.got_job.wait(), 10)
            first = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
            assert first.worker_id == silent.worker_id

            healthy = make_worker(f"healthy-{prefix}", nats_url, redis_url)

            @healthy.handler(topic)
            async def run(ctx: Any, data: Any) -> Any:
                return {"ran_on": ctx.worker_id}

            async with healthy:
                done = await wait_state(stub, reply.job_id, "SUCCEEDED", within=10)
        log = await events(app, reply.job_id)
    assert done.worker_id == healthy.worker_id
    assert done.attempts == 2
    states = [s for _, s, _ in log]
    assert states == ["PENDING", "DISPATCHED", "PENDING", "DISPATCHED", "SUCCEEDED"]
    assert f"worker {silent.worker_id} stopped heartbeating" in log[2][2]


async def test_job_of_a_lost_worker_times_out_without_retries(
    nats_url: str, redis_url: str, tmp_path: Path, prefix: str
) -> None:
    topic = f"job.t.lost.{prefix}"
    async with running_app(app_settings(nats_url, redis_url, write_config(tmp_path))) as app:
        assert app.registry is not None
        app.registry.ttl_s = 1.0
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
            HandWorker(f"silent-{prefix}", topic, nats_url, silent_after_job=True) as silent,
        ):
            stub = jobs(channel)
            await wait_worker(app, silent.worker_id)
            reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
            await asyncio.wait_for(silent.got_job.wait(), 10)
            timed_out = await wait_state(stub, reply.job_id, "TIMEOUT", within=10)
            entry = await wait_dlq(app, reply.job_id)
    assert timed_out.state == state("TIMEOUT")
    assert entry["reason_code"] == "worker_lost"
