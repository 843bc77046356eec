"""JetStream mode (NATS_USE_JETSTREAM=1) against the real nats-server and Valkey: the job path
through the durable streams, redelivery of a result that found Redis down, dead-lettering
after the last delivery, de-duplicated publishes, and idempotent stream creation.

Redis outages use a Valkey of the test's own (stopped and restarted on the same port and data
directory), so the session's servers are never touched. The existing job tests run in this
mode with `pytest --jetstream` (or CORDUM_USE_JETSTREAM=1).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from redis.exceptions import ConnectionError as RedisConnectionError

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.server.connections import ConnectError
from cordum.server.jetstream import (
    MSG_ID,
    DurableConsumer,
    DurablePublisher,
    JetStreamConfig,
    Streams,
    StreamSpec,
)
from cordum.server.services.durable_intake import UNDELIVERABLE
from cordum.server.settings import Settings
from cordum.server.stack.process import pick_free_port
from cordum.server.stack.services import RunningService, start_nats, start_valkey
from cordum.v1 import job_pb2, job_service_pb2

from support.cordum import app_settings, running_app
from support.jobs import dlq_entry, events, jobs, make_worker, result_packet, submit_packet
from support.jobs import wait_state as wait_job_state
from support.waiting import eventually

J = job_service_pb2
WAIT = 30.0


def js_settings(nats_url: str, redis_url: str, config_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "use_jetstream": True,
        "jetstream_redeliver_delay_s": 0.2,
        "jetstream_ack_wait_s": 5.0,
        **overrides,
    }
    return app_settings(nats_url, redis_url, config_dir, **values)


@pytest_asyncio.fixture
async def bus(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.drain()


@pytest_asyncio.fixture
async def js_app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    async with running_app(js_settings(nats_url, redis_url, config_dir)) as app:
        yield app


async def channel_to(app: App) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")


async def echo_worker(prefix: str, nats_url: str, redis_url: str) -> Worker:
    worker = make_worker(f"w-{prefix}", nats_url, redis_url)

    @worker.handler(f"job.t.ok.{prefix}")
    async def echo(ctx, data):  # type: ignore[no-untyped-def]
        return {"echo": data, "job_id": ctx.job_id}

    return worker


async def registered(app: App, worker: Worker) -> None:
    """Wait until the app places jobs on the worker's own subject."""
    assert app.registry is not None
    registry = app.registry

    async def ids() -> list[str]:
        return [w.worker_id for w in registry.workers()]

    await eventually(ids, until=lambda found: worker.worker_id in found, within=WAIT)


async def consumer_info(nc: NatsClient, stream: StreamSpec, durable: str) -> api.ConsumerInfo:
    return await nc.jetstream().consumer_info(stream.name, durable)


# -- the job path ---------------------------------------------------------------------------


async def test_a_job_runs_through_the_streams_and_the_worker_needs_no_change(
    js_app: App, bus: NatsClient, prefix: str, nats_url: str, redis_url: str
) -> None:
    streams = Streams.of(js_app.subjects)
    durable = streams.durable("scheduler")
    results_before = (await consumer_info(bus, streams.results, durable)).delivered.consumer_seq
    worker = await echo_worker(prefix, nats_url, redis_url)
    async with worker, await channel_to(js_app) as channel:
        await registered(js_app, worker)
        stub = jobs(channel)
        reply = await stub.SubmitJob(J.SubmitJobRequest(prompt="hi", topic=f"job.t.ok.{prefix}"))
        done = await wait_job_state(stub, reply.job_id, "SUCCEEDED", within=WAIT)
    assert done.worker_id == worker.worker_id and done.attempts == 1
    js = bus.jetstream()
    # The worker's core publish of its result reached the scheduler through its durable
    # consumer, which acked it once the job was SUCCEEDED in Redis.
    info = await consumer_info(bus, streams.results, durable)
    assert info.delivered.consumer_seq > results_before
    assert info.num_ack_pending == 0
    # The dispatch went to the worker's core subscription and was captured with its id.
    dispatched = await js.get_last_msg(streams.jobs.name, f"worker.{worker.worker_id}.jobs")
    assert dispatched.headers is not None
    assert dispatched.headers[MSG_ID] == f"{reply.job_id}@1"
    packet = cap.decode(dispatched.data or b"")
    assert packet.job_request.job_id == reply.job_id


async def test_a_bus_submit_goes_through_the_namespace_submit_stream(
    js_app: App, bus: NatsClient, prefix: str, nats_url: str, redis_url: str
) -> None:
    """A CAP client's plain (core) publish on sys.job.submit is stored by the stream and
    taken by the scheduler's durable consumer."""
    streams = Streams.of(js_app.subjects)
    job_id = f"bus-{prefix}"
    assert js_app.redis is not None
    await js_app.redis.set(cap.context_key(job_id), '{"from": "the bus"}', ex=300)
    request = agent.JobRequest(
        job_id=job_id,
        topic=f"job.t.ok.{prefix}",
        tenant_id="default",
        context_ptr=cap.redis_pointer(cap.context_key(job_id)),
    )
    worker = await echo_worker(prefix, nats_url, redis_url)
    async with worker, await channel_to(js_app) as channel:
        await bus.publish(js_app.subjects.submit, submit_packet(request, job_id))
        await wait_job_state(jobs(channel), job_id, "SUCCEEDED", within=WAIT)
    info = await consumer_info(bus, streams.submit, streams.durable("scheduler"))
    assert info.num_ack_pending == 0 and info.num_pending == 0
    # Work queue: acked submits leave the stream.
    assert (await bus.jetstream().stream_info(streams.submit.name)).state.messages == 0


async def test_two_apps_share_the_streams_and_a_gateway_submits_through_them(
    nats_url: str, redis_url: str, config_dir: Path, prefix: str, bus: NatsClient
) -> None:
    """A gateway process and a scheduler process of one namespace, started together: the
    streams are created once (idempotently), and the gateway's submit reaches the scheduler
    through the submit stream (an acked, de-duplicated publish)."""
    namespace = f"t{uuid.uuid4().hex[:8]}."
    gateway_settings = js_settings(
        nats_url, redis_url, config_dir, namespace=namespace, roles=["gateway", "safety"]
    )
    scheduler_settings = js_settings(
        nats_url, redis_url, config_dir, namespace=namespace, roles=["scheduler", "safety"]
    )
    gateway, scheduler = App(gateway_settings), App(scheduler_settings)
    try:
        await asyncio.gather(gateway.start(), scheduler.start())
        streams = Streams.of(gateway.subjects)
        js = bus.jetstream()
        for spec in streams.all():
            info = await js.stream_info(spec.name)
            assert sorted(info.config.subjects or []) == sorted(spec.subjects)
            assert info.config.retention == spec.retention
        consumers = await js.consumers_info(streams.submit.name)
        assert [c.name for c in consumers] == [streams.durable("scheduler")]
        worker = await echo_worker(prefix, nats_url, redis_url)
        async with worker, await channel_to(gateway) as channel:
            stub = jobs(channel)
            reply = await stub.SubmitJob(
                J.SubmitJobRequest(prompt="hi", topic=f"job.t.ok.{prefix}")
            )
            await wait_job_state(stub, reply.job_id, "SUCCEEDED", within=WAIT)
        states = [state for _, state, _ in await events(gateway, reply.job_id)]
        assert states.count("SUCCEEDED") == 1 and states.count("DISPATCHED") == 1
    finally:
        await scheduler.stop()
        await gateway.stop()


async def test_a_changed_stream_config_is_applied_by_the_next_start(
    nats_url: str, redis_url: str, config_dir: Path, bus: NatsClient
) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}."
    roles = ["gateway", "safety"]
    settings = js_settings(nats_url, redis_url, config_dir, namespace=namespace, roles=roles)
    async with running_app(settings) as app:
        name = Streams.of(app.subjects).dlq.name
    assert (await bus.jetstream().stream_info(name)).config.max_age == settings.jetstream_max_age_s
    longer = settings.jetstream_max_age_s + 60
    settings = js_settings(
        nats_url,
        redis_url,
        config_dir,
        namespace=namespace,
        roles=roles,
        jetstream_max_age_s=longer,
    )
    async with running_app(settings):
        pass
    assert (await bus.jetstream().stream_info(name)).config.max_age == longer


async def test_jetstream_mode_on_a_server_without_jetstream_fails_the_start(
    redis_url: str, config_dir: Path, tmp_path: Path
) -> None:
    service = await asyncio.to_thread(
        start_nats, data_dir=tmp_path / "nats", log_path=tmp_path / "nats.log", jetstream=False
    )
    try:
        with pytest.raises(ConnectError, match="no JetStream"):
            async with running_app(js_settings(service.url, redis_url, config_dir)):
                pass
    finally:
        await asyncio.to_thread(service.stop)


# -- de-duplication -------------------------------------------------------------------------


async def test_a_repeated_publish_with_the_same_id_is_stored_once(
    js_app: App, bus: NatsClient, prefix: str
) -> None:
    streams = Streams.of(js_app.subjects)
    js = bus.jetstream()
    before = (await js.stream_info(streams.dlq.name)).state.last_seq
    publisher = DurablePublisher(bus, jetstream=True)
    result = agent.JobResult(
        job_id=f"dup-{prefix}",
        status=agent.JOB_STATUS_FAILED,
        error_code="boom",
        worker_id="test",
    )
    data = cap.encode(cap.envelope(sender_id="test", trace_id=prefix, job_result=result))
    for _ in range(3):
        await publisher.publish(js_app.subjects.dlq, data, msg_id=f"dup-{prefix}:dlq")
    await publisher.publish(js_app.subjects.dlq, data, msg_id=f"dup-{prefix}:other")
    assert (await js.stream_info(streams.dlq.name)).state.last_seq == before + 2


# -- redelivery and dead letters with Redis down -------------------------------------------


class OwnValkey:
    """A Valkey server of one test, which the test can stop and start again (same port,
    same AOF), to take Redis away from an App and give it back."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = pick_free_port()
        self.service: RunningService | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.service = await asyncio.to_thread(
            start_valkey,
            data_dir=self.base / "data",
            log_path=self.base / "valkey.log",
            port=self.port,
        )

    async def stop(self) -> None:
        if self.service is not None:
            await asyncio.to_thread(self.service.stop)
            self.service = None


@pytest_asyncio.fixture
async def own_valkey(tmp_path: Path) -> AsyncIterator[OwnValkey]:
    valkey = OwnValkey(tmp_path / "valkey")
    await valkey.start()
    try:
        yield valkey
    finally:
        await valkey.stop()


async def dispatched_job(app: App, bus: NatsClient, topic: str) -> str:
    """Submit a job on a topic no known worker serves: it is dispatched on the topic
    subject, where the test plays the worker. Returns its id once dispatched."""
    seen: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_dispatch(msg: Msg) -> None:
        await seen.put(msg)

    sub = await bus.subscribe(topic, cb=on_dispatch)
    try:
        async with await channel_to(app) as channel:
            reply = await jobs(channel).SubmitJob(J.SubmitJobRequest(prompt="hi", topic=topic))
        msg = await asyncio.wait_for(seen.get(), WAIT)
    finally:
        await sub.unsubscribe()
    assert cap.decode(msg.data).job_request.job_id == reply.job_id
    return reply.job_id


async def job_state(app: App, job_id: str) -> int:
    """The job's state (0 while it cannot be read: a connection of the app's pool may still
    be the one Redis closed when it stopped)."""
    assert app.store is not None
    try:
        record = await app.store.get(job_id)
    except RedisConnectionError:
        return 0
    return record.job.state if record is not None else 0


async def readable_dlq_entry(app: App, job_id: str) -> dict[str, str]:
    try:
        return await dlq_entry(app, job_id)
    except RedisConnectionError:
        return {}


async def test_a_result_that_finds_redis_down_is_redelivered_and_applied_later(
    nats_url: str, config_dir: Path, own_valkey: OwnValkey, bus: NatsClient, prefix: str
) -> None:
    settings = js_settings(
        nats_url, own_valkey.url, config_dir, jetstream_max_deliver=50, reconcile_interval_s=60
    )
    async with running_app(settings) as app:
        streams = Streams.of(app.subjects)
        durable = streams.durable("scheduler")
        job_id = await dispatched_job(app, bus, f"job.t.ok.{prefix}")
        await own_valkey.stop()
        # No res:<id> is written, so the reconciler has nothing to recover this job from:
        # only the redelivered result can complete it.
        await bus.publish(
            cap.SUBJECT_RESULT,
            result_packet(job_id, agent.JOB_STATUS_SUCCEEDED, result_ptr=f"redis://res:{job_id}"),
        )
        await eventually(
            lambda: consumer_info(bus, streams.results, durable),
            until=lambda info: info.num_redelivered >= 1,
            within=WAIT,
            what="the result redelivered after a failed attempt",
        )
        await own_valkey.start()
        await eventually(
            lambda: job_state(app, job_id),
            until=lambda s: s == job_pb2.JOB_STATE_SUCCEEDED,
            within=WAIT,
            what=f"{job_id} SUCCEEDED once Redis is back",
        )
        await eventually(
            lambda: consumer_info(bus, streams.results, durable),
            until=lambda info: info.num_ack_pending == 0,
            within=WAIT,
            what="the result acked",
        )


async def test_the_last_failed_delivery_sends_the_job_to_the_dlq_with_the_reason(
    nats_url: str, config_dir: Path, own_valkey: OwnValkey, bus: NatsClient, prefix: str
) -> None:
    """Redis stays down for longer than the redeliveries last: the last delivery publishes
    an undeliverable notice (stored by the DLQ stream), and the job ends FAILED with a DLQ
    entry once Redis is back."""
    settings = js_settings(
        nats_url, own_valkey.url, config_dir, jetstream_max_deliver=2, reconcile_interval_s=60
    )
    async with running_app(settings) as app:
        streams = Streams.of(app.subjects)
        job_id = await dispatched_job(app, bus, f"job.t.ok.{prefix}")
        notices: list[agent.JobResult] = []

        async def on_dlq(msg: Msg) -> None:
            notices.append(cap.decode(msg.data).job_result)

        await bus.subscribe(app.subjects.dlq, cb=on_dlq)
        await own_valkey.stop()
        await bus.publish(
            cap.SUBJECT_RESULT,
            result_packet(job_id, agent.JOB_STATUS_SUCCEEDED, result_ptr=f"redis://res:{job_id}"),
        )

        async def notices_of_the_job() -> list[agent.JobResult]:
            return [n for n in notices if n.job_id == job_id]

        await eventually(notices_of_the_job, within=WAIT, what="the undeliverable notice")
        # Terminated after the notice was stored: not pending, never delivered again.
        await eventually(
            lambda: consumer_info(bus, streams.results, streams.durable("scheduler")),
            until=lambda info: info.num_ack_pending == 0,
            within=WAIT,
            what="the result terminated after its last delivery",
        )
        await own_valkey.start()
        entry = await eventually(
            lambda: readable_dlq_entry(app, job_id), within=WAIT, what=f"the DLQ entry of {job_id}"
        )
        assert await job_state(app, job_id) == job_pb2.JOB_STATE_FAILED
        assert app.store is not None
        record = await app.store.get(job_id)
        assert record is not None
    notice = next(n for n in notices if n.job_id == job_id)
    assert notice.error_code == UNDELIVERABLE
    assert "not handled after 2 deliveries" in notice.error_message
    assert record.job.error_code == UNDELIVERABLE
    assert record.job.error_message == notice.error_message
    assert entry["status"] == "JOB_STATUS_FAILED"
    assert entry["reason_code"] == UNDELIVERABLE
    assert entry["reason"] == notice.error_message


# -- the consumer itself ---------------------------------------------------------------------


async def test_a_last_delivery_nobody_settled_is_dead_lettered_from_the_advisory(
    bus: NatsClient, prefix: str
) -> None:
    """A replica dies holding a message's last delivery (here: a bare pull subscription that
    fetches it and never settles it): once the ack wait is over, a live replica gets the
    server's max-deliveries advisory and dead-letters the message from the stream's copy."""
    spec = StreamSpec(f"T{prefix}", (f"t{prefix}.work",), api.RetentionPolicy.WORK_QUEUE)
    js: JetStreamContext = bus.jetstream()
    await js.add_stream(name=spec.name, subjects=list(spec.subjects), retention=spec.retention)
    config = JetStreamConfig(ack_wait_s=1.0, max_deliver=2, redeliver_delay_s=0.05)
    handled: list[Msg] = []
    dead: list[tuple[bytes, str]] = []

    async def handle(msgs: list[Msg]) -> None:
        handled.extend(msgs)

    async def exhausted(data: bytes, reason: str) -> None:
        dead.append((data, reason))

    async def dead_letters() -> list[tuple[bytes, str]]:
        return dead

    live = DurableConsumer(
        bus, stream=spec, durable="d", handle=handle, exhausted=exhausted, config=config
    )
    try:
        await js.add_consumer(
            spec.name,
            api.ConsumerConfig(
                name="d", durable_name="d", ack_wait=1.0, max_deliver=2, filter_subject=None
            ),
        )
        doomed = await js.pull_subscribe_bind(durable="d", stream=spec.name)
        await js.publish(spec.subjects[0], b"payload", headers={MSG_ID: "m1"})
        (first,) = await doomed.fetch(1, timeout=WAIT)
        await first.nak()
        (last,) = await doomed.fetch(1, timeout=WAIT)
        assert last.metadata.num_delivered == 2  # held, never settled: its holder "died"
        await live.start()
        await eventually(dead_letters, within=WAIT, what="the advisory's dead letter")
    finally:
        await live.stop()
        await js.delete_stream(spec.name)
    assert dead == [(b"payload", "not acknowledged after 2 deliveries")]
    assert handled == []
