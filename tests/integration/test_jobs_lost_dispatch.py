"""Dispatches that never reach their worker (services/lost_dispatches.py).

Plain NATS drops a dispatch its worker is not subscribed for at that moment (reconnecting after
a nats-server restart, restarting, ...). CAP workers never report RUNNING; what they do report
is `active_jobs` in every heartbeat. A job sent to a worker that then reports no active jobs in
two heartbeats in a row was lost: it is re-queued without charging the attempt and runs again.
Timeouts here are the shipped ones (running 9000 s), and the reconciler's scan only looks at
dispatches older than the registry TTL (15 s), so what recovers a job within seconds is the
scheduler's own check, except in the test that switches it off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from cordum.agent.v1 import buspacket_pb2
from cordum.sdk import cap
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.server.services.lost_dispatches import Dispatch, LostDispatches
from cordum.server.services.workers import WorkerRegistry, WorkerState
from cordum.server.stores.jobs import Completion

from support.cordum import app_settings, running_app, write_config
from support.hand_worker import HandWorker
from support.jobs import (
    J,
    events,
    jobs,
    make_worker,
    raw_fields,
    state,
    wait_state,
)
from support.waiting import eventually

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "DENIED"}
# The reconciler's scan sees DISPATCHED jobs after 1 s (the shortest timeout that applies).
FAST_SCAN_TIMEOUTS = """\
reconciler:
  dispatch_timeout_seconds: 1
  running_timeout_seconds: 9000
  scan_interval_seconds: 30
"""


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, tmp_path_factory: Any) -> AsyncIterator[App]:
    config = write_config(tmp_path_factory.mktemp("lost"))
    async with running_app(app_settings(nats_url, redis_url, config)) as running:
        yield running


@pytest_asyncio.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


def registry_of(app: App) -> WorkerRegistry:
    assert app.registry is not None
    return app.registry


def tracker_of(app: App) -> LostDispatches:
    assert app.scheduler is not None
    return app.scheduler.lost_dispatches


@contextlib.contextmanager
def tuned(obj: object, **values: Any) -> Iterator[None]:
    """Set attributes of the module's app for one test, and put them back."""
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


async def worker_state(app: App, worker_id: str) -> WorkerState | None:
    return next((w for w in registry_of(app).workers() if w.worker_id == worker_id), None)


async def wait_serving(app: App, worker_id: str, topic: str) -> None:
    async def serving() -> bool:
        return any(w.worker_id == worker_id for w in registry_of(app).live_for_topic(topic))

    await eventually(serving, within=15, what=f"{worker_id} serving {topic}")


async def dispatched_s(app: App, job_id: str) -> float:
    return int((await raw_fields(app, job_id))["dispatched_ms"]) / 1000


async def wait_checked(app: App, worker_id: str, job_id: str, sent_at: float) -> None:
    """Until the worker's heartbeats judged a dispatch sent at `sent_at` and this scheduler's
    check of it has run (or its memory of it was dropped earlier, by its result)."""
    tracker = tracker_of(app)

    async def checked() -> bool:
        return (
            tracker.judge(worker_id, sent_at)
            and job_id not in tracker
            and tracker.checks_running == 0
        )

    await eventually(checked, within=20, what=f"the idle-heartbeat check of {job_id}")


def completions(log: list[tuple[int, str, str]]) -> int:
    return sum(1 for _, s, m in log if s in TERMINAL and not m.startswith("ignored"))


class LosesDeliveries(Worker):
    """Our worker runtime, except that the first `lose` jobs sent to its own subject never
    reach it: as with a dispatch published while the worker was reconnecting."""

    def __init__(self, *args: Any, lose: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose = lose
        self.lost: list[str] = []

    async def _on_direct_message(self, msg: Msg) -> None:
        if len(self.lost) < self.lose:
            self.lost.append(buspacket_pb2.BusPacket.FromString(msg.data).job_request.job_id)
            return
        await super()._on_direct_message(msg)


def losing_worker(prefix: str, nats_url: str, redis_url: str, lose: int = 1) -> LosesDeliveries:
    return LosesDeliveries(
        worker_id=f"lossy-{prefix}",
        nats_url=nats_url,
        redis_url=redis_url,
        heartbeat_interval=0.2,
        lose=lose,
    )


# -- a lost dispatch ----------------------------------------------------------------------------


async def test_a_lost_dispatch_is_requeued_after_two_idle_heartbeats_and_succeeds(
    app: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.lost.{prefix}"
    ran: list[str] = []
    worker = losing_worker(prefix, nats_url, redis_url)

    @worker.handler(topic)
    async def echo(ctx: Any, data: Any) -> Any:
        ran.append(ctx.job_id)
        return {"ran_on": ctx.worker_id}

    stub = jobs(channel)
    async with worker:
        await wait_serving(app, worker.worker_id, topic)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic, max_retries=0))
        done = await wait_state(stub, reply.job_id, "SUCCEEDED", "FAILED", "TIMEOUT", within=15)
    log = await events(app, reply.job_id)
    fields = await raw_fields(app, reply.job_id)
    assert worker.lost == [reply.job_id]
    assert ran == [reply.job_id]  # run once, by the second dispatch
    assert done.worker_id == worker.worker_id
    # The lost attempt was not charged: with max_retries=0 the job could not have run again.
    assert done.attempts == 1
    assert fields["lost_dispatches"] == "1"
    states = [s for _, s, _ in log]
    assert states == ["PENDING", "DISPATCHED", "PENDING", "DISPATCHED", "SUCCEEDED"]
    assert completions(log) == 1
    why = log[2][2]
    assert why.startswith(f"re-queued: dispatch lost: worker {worker.worker_id} reported no ")
    assert "after attempt 1 was sent" in why


async def test_a_busy_worker_keeps_its_job_while_a_lost_one_is_recovered(
    app: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    busy_topic, lossy_topic = f"job.t.busy.{prefix}", f"job.t.lossy.{prefix}"
    started, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []
    busy = make_worker(f"busy-{prefix}", nats_url, redis_url)
    lossy = losing_worker(prefix, nats_url, redis_url)

    @busy.handler(busy_topic)
    async def long_job(ctx: Any, data: Any) -> Any:
        ran.append(ctx.job_id)
        started.set()
        await release.wait()
        return {}

    @lossy.handler(lossy_topic)
    async def echo(ctx: Any, data: Any) -> Any:
        return {}

    busy_beats: list[int] = []

    async def on_heartbeat(msg: Msg) -> None:
        beat = cap.decode(msg.data).heartbeat
        if beat.worker_id == busy.worker_id:
            busy_beats.append(beat.active_jobs)

    stub = jobs(channel)
    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe(cap.SUBJECT_HEARTBEAT, cb=on_heartbeat)
        async with busy, lossy:
            await wait_serving(app, busy.worker_id, busy_topic)
            await wait_serving(app, lossy.worker_id, lossy_topic)
            long = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=busy_topic))
            await asyncio.wait_for(started.wait(), 15)
            # The control: a dispatch lost meanwhile on the other worker is recovered.
            lost = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=lossy_topic))
            await wait_state(stub, lost.job_id, "SUCCEEDED", within=15)
            assert lossy.lost == [lost.job_id]
            # And well past that, the busy worker has said it holds a job all along.
            seen = len(busy_beats)

            async def beats_since() -> int:
                return len(busy_beats) - seen

            await eventually(
                beats_since, until=lambda n: n >= 10, within=15, what="ten more busy heartbeats"
            )
            assert set(busy_beats[seen:]) == {1}
            held = await stub.GetJob(J.GetJobRequest(job_id=long.job_id))
            assert held.state == state("DISPATCHED")
            assert held.attempts == 1
            assert long.job_id in tracker_of(app)  # still watched, never judged lost
            assert "lost_dispatches" not in await raw_fields(app, long.job_id)
            release.set()
            done = await wait_state(stub, long.job_id, "SUCCEEDED", within=15)
    finally:
        await nc.drain()
    log = await events(app, long.job_id)
    assert [s for _, s, _ in log] == ["PENDING", "DISPATCHED", "SUCCEEDED"]
    assert ran == [long.job_id]
    assert done.attempts == 1
    assert long.job_id not in tracker_of(app)  # its result was applied here


@pytest.mark.parametrize("applied_by", ["this replica", "another replica"])
async def test_a_result_that_lands_between_the_idle_heartbeats_wins(
    app: App, channel: grpc.aio.Channel, nats_url: str, prefix: str, applied_by: str
) -> None:
    topic = f"job.t.between.{prefix}"
    stub = jobs(channel)
    registry = registry_of(app)
    # Idle heartbeats pair only 2 s apart: room to land the result between them.
    with tuned(registry, idle_gap_s=2.0):
        async with HandWorker(f"hand-{prefix}", topic, nats_url) as hand:
            await wait_serving(app, hand.worker_id, topic)
            reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
            job_id = reply.job_id
            await asyncio.wait_for(hand.got_job.wait(), 15)
            sent_at = await dispatched_s(app, job_id)
            late_enough = sent_at + tracker_of(app).grace_s

            async def busy_after_grace() -> bool:
                seen = await worker_state(app, hand.worker_id)
                return (
                    seen is not None
                    and seen.last_seen > late_enough
                    and seen.heartbeat.active_jobs == 1
                )

            await eventually(busy_after_grace, within=15, what="a busy heartbeat past the grace")
            # The worker finishes: its next heartbeats are idle, its result still on the way.
            hand.active = 0

            async def idle_once() -> bool:
                seen = await worker_state(app, hand.worker_id)
                return seen is not None and seen.heartbeat.active_jobs == 0

            await eventually(idle_once, within=15, what="the first idle heartbeat")
            if applied_by == "this replica":
                await hand.answer(job_id)
            else:
                # Results go to one replica of the queue group: another one applies it, and
                # this scheduler still remembers the dispatch; its check must read the state.
                assert job_id in tracker_of(app)
                assert app.store is not None
                completion = Completion(job_id, "SUCCEEDED", worker_id=hand.worker_id)
                await app.store.complete_many([completion], int(sent_at * 1000) + 1)
            await wait_state(stub, job_id, "SUCCEEDED", within=15)
            await wait_checked(app, hand.worker_id, job_id, sent_at)
    log = await events(app, job_id)
    assert [s for _, s, _ in log] == ["PENDING", "DISPATCHED", "SUCCEEDED"]
    assert hand.deliveries == [job_id]


# -- bounds and fallbacks -------------------------------------------------------------------


async def test_a_job_lost_again_and_again_is_left_to_its_timeouts(
    app: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.blackhole.{prefix}"
    worker = losing_worker(prefix, nats_url, redis_url, lose=100)

    @worker.handler(topic)
    async def echo(ctx: Any, data: Any) -> Any:
        return {}

    stub = jobs(channel)
    with tuned(tracker_of(app), max_requeues=1):
        async with worker:
            await wait_serving(app, worker.worker_id, topic)
            reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))

            async def lost_twice() -> bool:
                return len(worker.lost) == 2

            await eventually(lost_twice, within=15, what="the second dispatch, lost too")
            second = await dispatched_s(app, reply.job_id)
            await wait_checked(app, worker.worker_id, reply.job_id, second)
            held = await stub.GetJob(J.GetJobRequest(job_id=reply.job_id))
            fields = await raw_fields(app, reply.job_id)
            await stub.CancelJob(J.CancelJobRequest(job_id=reply.job_id, reason="cleanup"))
    assert held.state == state("DISPATCHED")
    assert fields["lost_dispatches"] == "1"
    assert held.attempts == 1
    assert worker.lost == [reply.job_id, reply.job_id]


async def test_a_newer_dispatch_or_state_wins_over_a_stale_judgement(
    app: App, channel: grpc.aio.Channel, nats_url: str, prefix: str
) -> None:
    topic = f"job.t.stale.{prefix}"
    stub = jobs(channel)
    store = app.store
    assert store is not None
    async with HandWorker(f"hand-{prefix}", topic, nats_url) as hand:
        await wait_serving(app, hand.worker_id, topic)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        job_id = reply.job_id
        await asyncio.wait_for(hand.got_job.wait(), 15)
        fields = await raw_fields(app, job_id)
        dispatched_ms = int(fields["dispatched_ms"])
        # A judgement about an earlier dispatch of the job changes nothing.
        stale = Dispatch(job_id, hand.worker_id, dispatched_ms - 1, 0.0)
        settled = await tracker_of(app).settle([stale])
        assert (settled.requeued, settled.recovered) == (0, 0)
        # Nor does a compare-and-set that expects another dispatch.
        moved = await store.transition(
            job_id,
            allowed_from=["DISPATCHED"],
            to="PENDING",
            message="x",
            now_ms=dispatched_ms + 1,
            expect={"dispatched_ms": dispatched_ms - 1},
        )
        assert not moved.ok and moved.previous == "DISPATCHED"
        assert (await raw_fields(app, job_id))["state"] == "DISPATCHED"
        await hand.answer(job_id)
        await wait_state(stub, job_id, "SUCCEEDED", within=15)
    assert [s for _, s, _ in await events(app, job_id)] == ["PENDING", "DISPATCHED", "SUCCEEDED"]


async def test_the_reconciler_recovers_a_lost_dispatch_the_scheduler_forgot(
    nats_url: str, redis_url: str, tmp_path: Path, prefix: str
) -> None:
    """A restarted scheduler has no memory of its dispatches: the reconciler's scan of
    DISPATCHED jobs applies the same rule."""
    topic = f"job.t.forgot.{prefix}"
    ran: list[str] = []
    config = write_config(tmp_path, timeouts=FAST_SCAN_TIMEOUTS)
    worker = losing_worker(prefix, nats_url, redis_url)

    @worker.handler(topic)
    async def echo(ctx: Any, data: Any) -> Any:
        ran.append(ctx.job_id)
        return {}

    async with (
        running_app(app_settings(nats_url, redis_url, config)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        worker,
    ):
        tracker_of(app).max_tracked = 0  # remembers nothing, as after a restart
        stub = jobs(channel)
        await wait_serving(app, worker.worker_id, topic)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="x", topic=topic))
        done = await wait_state(stub, reply.job_id, "SUCCEEDED", "FAILED", "TIMEOUT", within=20)
        log = await events(app, reply.job_id)
    assert worker.lost == [reply.job_id]
    assert ran == [reply.job_id]
    assert done.attempts == 1
    assert [s for _, s, _ in log] == ["PENDING", "DISPATCHED", "PENDING", "DISPATCHED", "SUCCEEDED"]
    assert "dispatch lost" in log[2][2]
