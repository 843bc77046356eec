"""The worker runtime against real NATS and Valkey, driven by a hand-played control plane.

Every test builds its own worker id and topics from ``prefix``, listens on the system subjects
for packets from that worker only, and waits with deadlines (never fixed sleeps).
"""

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from cordum.agent.v1 import handshake_pb2, job_pb2
from cordum.sdk import cap
from cordum.sdk.cap import BusPacket
from cordum.sdk.worker import JobContext, JobFailed, Worker

SCHEDULER = "test-scheduler"
WAIT = 10.0  # upper bound for anything that is expected to happen

MakeWorker = Callable[..., Worker]


class Inbox:
    """Decoded packets seen on one subject, from one sender."""

    def __init__(self, sender_id: str, verifier: cap.Verifier | None = None) -> None:
        self._sender_id = sender_id
        self._verifier = verifier
        self._packets: asyncio.Queue[BusPacket] = asyncio.Queue()

    async def on_msg(self, msg: Msg) -> None:
        packet = cap.decode(msg.data, self._verifier)  # our worker must only send valid packets
        if packet.sender_id == self._sender_id:
            self._packets.put_nowait(packet)

    async def next(self, within: float = WAIT) -> BusPacket:
        return await asyncio.wait_for(self._packets.get(), within)

    async def next_where(
        self, predicate: Callable[[BusPacket], bool], within: float = WAIT
    ) -> BusPacket:
        async with asyncio.timeout(within):
            while True:
                packet = await self._packets.get()
                if predicate(packet):
                    return packet

    def empty(self) -> bool:
        return self._packets.empty()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(
        nats_url, connect_timeout=5, max_reconnect_attempts=0, name="test-control-plane"
    )
    try:
        yield client
    finally:
        await client.drain()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def workers(nats_url: str, redis_url: str) -> AsyncIterator[MakeWorker]:
    """A factory of workers on the test servers; all of them are stopped afterwards."""
    made: list[Worker] = []

    def make(worker_id: str, **options: Any) -> Worker:
        worker = Worker(worker_id=worker_id, nats_url=nats_url, redis_url=redis_url, **options)
        made.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in made:
            await worker.stop(grace=1)


async def listen(
    nc: NatsClient, subject: str, sender_id: str, verifier: cap.Verifier | None = None
) -> Inbox:
    inbox = Inbox(sender_id, verifier)
    await nc.subscribe(subject, cb=inbox.on_msg)
    await nc.flush()  # the subscription exists before anything we wait for is sent
    return inbox


def job_packet(job_id: str, topic: str, **request: Any) -> BusPacket:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "topic": topic,
        "priority": job_pb2.JOB_PRIORITY_INTERACTIVE,
        "context_ptr": cap.redis_pointer(cap.context_key(job_id)),
        "tenant_id": "default",
    }
    fields.update(request)
    return cap.envelope(
        sender_id=SCHEDULER, trace_id=f"trace-{job_id}", job_request=job_pb2.JobRequest(**fields)
    )


async def dispatch(
    nc: NatsClient,
    store: aioredis.Redis,
    subject: str,
    job_id: str,
    topic: str,
    data: Any = None,
    *,
    signer: cap.Signer | None = None,
    **request: Any,
) -> None:
    """Store the input JSON under ctx:<job_id> (unless data is None) and publish the job."""
    if data is not None:
        await store.set(cap.context_key(job_id), json.dumps(data), ex=300)
    await nc.publish(subject, cap.encode(job_packet(job_id, topic, **request), signer=signer))
    await nc.flush()


def echo_worker(workers: MakeWorker, prefix: str, **options: Any) -> tuple[Worker, str]:
    topic = f"job.t{prefix}.echo"
    worker = workers(f"w-{prefix}", **options)

    @worker.handler(topic)
    async def echo(ctx: JobContext, data: Any) -> Any:
        return {"echo": data, "job_id": ctx.job_id, "trace_id": ctx.trace_id}

    return worker, topic


def succeeded(packet: BusPacket, job_id: str) -> bool:
    return (
        packet.job_result.job_id == job_id
        and packet.job_result.status == job_pb2.JOB_STATUS_SUCCEEDED
    )


# --- the happy path ---------------------------------------------------------------------------


async def test_job_on_topic_subject_succeeds(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    worker, topic = echo_worker(workers, prefix)
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()

    job_id = f"job-{prefix}-topic"
    await dispatch(nc, store, topic, job_id, topic, {"prompt": "hello", "n": 42})

    packet = await results.next()
    assert packet.trace_id == f"trace-{job_id}"
    assert packet.sender_id == worker.worker_id
    assert packet.protocol_version == 1
    result = packet.job_result
    assert result.job_id == job_id
    assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
    assert result.result_ptr == f"redis://res:{job_id}"
    assert result.worker_id == worker.worker_id
    assert not result.error_message
    stored = await store.get(cap.pointer_key(result.result_ptr))
    assert json.loads(stored) == {
        "echo": {"prompt": "hello", "n": 42},
        "job_id": job_id,
        "trace_id": f"trace-{job_id}",
    }
    assert await store.ttl(cap.result_key(job_id)) == -1  # no expiry by default, like CAP


async def test_job_on_direct_subject_succeeds(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    worker, topic = echo_worker(workers, prefix)
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    direct = cap.direct_subject(worker.worker_id)

    # A topic this worker has no handler for is dropped on the direct subject ...
    await dispatch(nc, store, direct, f"job-{prefix}-other", f"job.t{prefix}.other", {"x": 0})
    # ... and a known topic is served.
    job_id = f"job-{prefix}-direct"
    await dispatch(nc, store, direct, job_id, topic, {"x": 1})

    packet = await results.next()
    assert succeeded(packet, job_id)
    assert json.loads(await store.get(cap.result_key(job_id)))["echo"] == {"x": 1}


async def test_result_ttl_is_applied_when_configured(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    worker, topic = echo_worker(workers, prefix, result_ttl_s=60)
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    job_id = f"job-{prefix}-ttl"
    await dispatch(nc, store, topic, job_id, topic, [1, 2])
    assert succeeded(await results.next(), job_id)
    assert 0 < await store.ttl(cap.result_key(job_id)) <= 60


async def test_sync_handler_runs_off_the_event_loop(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.sync"
    worker = workers(f"w-{prefix}")
    loop_thread = threading.get_ident()

    def blocking(ctx: JobContext, data: Any) -> Any:
        return {"sum": sum(data), "on_loop_thread": threading.get_ident() == loop_thread}

    worker.add_handler(topic, blocking)
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    job_id = f"job-{prefix}-sync"
    await dispatch(nc, store, topic, job_id, topic, [1, 2, 3])
    assert succeeded(await results.next(), job_id)
    assert json.loads(await store.get(cap.result_key(job_id))) == {
        "sum": 6,
        "on_loop_thread": False,
    }


# --- announcements ----------------------------------------------------------------------------


async def test_handshake_and_immediate_first_heartbeat(
    nc: NatsClient, workers: MakeWorker, prefix: str
) -> None:
    worker, topic = echo_worker(
        workers, prefix, pool="pool-a", max_parallel=3, heartbeat_interval=60, labels={"zone": "z1"}
    )
    worker.add_handler(f"job.t{prefix}.another", lambda ctx, data: data)
    handshakes = await listen(nc, cap.SUBJECT_HANDSHAKE, worker.worker_id)
    heartbeats = await listen(nc, cap.SUBJECT_HEARTBEAT, worker.worker_id)
    await worker.start()

    packet = await handshakes.next()
    handshake = packet.handshake
    assert handshake.component_id == worker.worker_id
    assert handshake.role == handshake_pb2.COMPONENT_ROLE_WORKER
    assert list(handshake.supported_versions) == [1]
    expected_topics = sorted([topic, f"job.t{prefix}.another"])
    assert list(handshake.ready_topics) == expected_topics
    assert dict(handshake.capabilities) == dict.fromkeys(expected_topics, True)
    assert handshake.sdk_version.startswith("cordum-python/")
    assert len(packet.trace_id) == 32

    # The interval is 60 s: a heartbeat within a few seconds proves the immediate first beat.
    packet = await heartbeats.next(within=5)
    assert packet.trace_id == worker.worker_id
    heartbeat = packet.heartbeat
    assert heartbeat.worker_id == worker.worker_id
    assert heartbeat.pool == "pool-a"
    assert heartbeat.max_parallel_jobs == 3
    assert heartbeat.active_jobs == 0
    assert dict(heartbeat.labels) == {"zone": "z1"}
    assert 0.0 <= heartbeat.cpu_load <= 100.0
    assert 0.0 <= heartbeat.memory_load <= 100.0


async def test_heartbeat_reports_jobs_in_flight(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.slow"
    worker = workers(f"w-{prefix}", heartbeat_interval=0.2)
    release = asyncio.Event()

    @worker.handler(topic)
    async def slow(ctx: JobContext, data: Any) -> Any:
        await release.wait()
        return "done"

    heartbeats = await listen(nc, cap.SUBJECT_HEARTBEAT, worker.worker_id)
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    job_id = f"job-{prefix}-slow"
    await dispatch(nc, store, topic, job_id, topic, {})

    busy = await heartbeats.next_where(lambda p: p.heartbeat.active_jobs > 0)
    assert busy.heartbeat.active_jobs == 1
    release.set()
    assert succeeded(await results.next(), job_id)
    await heartbeats.next_where(lambda p: p.heartbeat.active_jobs == 0)


async def test_progress_is_published(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.progress"
    worker = workers(f"w-{prefix}")

    @worker.handler(topic)
    async def report(ctx: JobContext, data: Any) -> Any:
        await ctx.progress(50, "half way")
        return None

    progress = await listen(nc, cap.SUBJECT_PROGRESS, worker.worker_id)
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    job_id = f"job-{prefix}-progress"
    await dispatch(nc, store, topic, job_id, topic, {})

    packet = await progress.next()
    assert packet.trace_id == f"trace-{job_id}"
    assert packet.job_progress.job_id == job_id
    assert packet.job_progress.percent == 50
    assert packet.job_progress.message == "half way"
    assert succeeded(await results.next(), job_id)
    assert await store.get(cap.result_key(job_id)) == b"null"


# --- concurrency ------------------------------------------------------------------------------


async def test_max_parallel_bounds_concurrency(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.busy"
    worker = workers(f"w-{prefix}", max_parallel=2)
    running = 0
    peak = 0

    @worker.handler(topic)
    async def busy(ctx: JobContext, data: Any) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.2)  # simulated work, not synchronization
        finally:
            running -= 1
        return data

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    job_ids = [f"job-{prefix}-{i}" for i in range(5)]
    for job_id in job_ids:
        await dispatch(nc, store, topic, job_id, topic, {"i": job_id})

    finished = [await results.next() for _ in job_ids]
    assert sorted(p.job_result.job_id for p in finished) == sorted(job_ids)
    assert all(p.job_result.status == job_pb2.JOB_STATUS_SUCCEEDED for p in finished)
    assert peak == 2


async def test_duplicate_delivery_in_flight_runs_once(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.dup"
    worker = workers(f"w-{prefix}", max_parallel=2)
    started = asyncio.Event()
    release = asyncio.Event()
    runs: list[str] = []
    job_id = f"job-{prefix}-dup"

    @worker.handler(topic)
    async def once(ctx: JobContext, data: Any) -> Any:
        runs.append(ctx.job_id)
        if ctx.job_id == job_id:
            started.set()
            await release.wait()
        return "ok"

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    await dispatch(nc, store, topic, job_id, topic, {})
    await asyncio.wait_for(started.wait(), WAIT)
    await dispatch(nc, store, topic, job_id, topic, {})  # redelivery while in flight
    marker = f"job-{prefix}-marker"
    await dispatch(nc, store, topic, marker, topic, {})  # processed after the duplicate
    assert succeeded(await results.next(), marker)
    release.set()

    assert succeeded(await results.next(), job_id)
    assert runs.count(job_id) == 1
    assert results.empty()


# --- failures ---------------------------------------------------------------------------------


async def test_context_failures_use_cap_texts(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    worker, topic = echo_worker(workers, prefix, max_context_bytes=64)
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()

    await store.set(f"ctx:{prefix}:bad-json", "not json {", ex=300)
    await store.set(f"ctx:{prefix}:big", json.dumps("x" * 100), ex=300)
    await store.hset(f"ctx:{prefix}:hash", "a", "1")
    await store.expire(f"ctx:{prefix}:hash", 300)
    cases = {
        "missing": (cap.redis_pointer(f"ctx:{prefix}:never-written"), "context not found"),
        "empty": ("", "empty pointer"),
        "s3": ("s3://bucket/ctx.json", "unsupported pointer scheme"),
        "nokey": ("redis://", "missing pointer key"),
        "badjson": (
            cap.redis_pointer(f"ctx:{prefix}:bad-json"),
            "context decode failed: Expecting value: line 1 column 1 (char 0)",
        ),
        "big": (cap.redis_pointer(f"ctx:{prefix}:big"), "context exceeds max size"),
        "hash": (
            cap.redis_pointer(f"ctx:{prefix}:hash"),
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ),
    }
    for name, (ptr, _) in cases.items():
        await dispatch(nc, store, topic, f"job-{prefix}-{name}", topic, context_ptr=ptr)

    seen = {}
    for _ in cases:
        result = (await results.next()).job_result
        seen[result.job_id] = result
    for name, (_, message) in cases.items():
        result = seen[f"job-{prefix}-{name}"]
        assert result.status == job_pb2.JOB_STATUS_FAILED, name
        assert result.error_message == message, name
        assert not result.result_ptr
        assert result.execution_ms == 0


async def test_handler_exceptions_fail_the_job(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.fail"
    worker = workers(f"w-{prefix}")

    @worker.handler(topic)
    async def fail(ctx: JobContext, data: Any) -> Any:
        if data.get("public"):
            raise JobFailed("bad input: no field x", code="bad_input")
        raise ValueError("secret text that must stay in the worker")

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    await dispatch(nc, store, topic, f"job-{prefix}-private", topic, {"public": False})
    await dispatch(nc, store, topic, f"job-{prefix}-public", topic, {"public": True})

    private = (await results.next()).job_result
    assert private.job_id == f"job-{prefix}-private"
    assert private.status == job_pb2.JOB_STATUS_FAILED
    assert private.error_message == "handler failed"
    assert private.error_code == "ValueError"
    assert not private.result_ptr

    public = (await results.next()).job_result
    assert public.status == job_pb2.JOB_STATUS_FAILED
    assert public.error_message == "handler failed: bad input: no field x"
    assert public.error_code == "bad_input"
    assert await store.exists(cap.result_key(public.job_id)) == 0


async def test_result_limits(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.output"
    worker = workers(f"w-{prefix}", max_result_bytes=32)

    @worker.handler(topic)
    async def output(ctx: JobContext, data: Any) -> Any:
        return {"big": "y" * 64} if data == "big" else object()

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    await dispatch(nc, store, topic, f"job-{prefix}-big", topic, "big")
    await dispatch(nc, store, topic, f"job-{prefix}-obj", topic, "obj")

    big = (await results.next()).job_result
    assert big.status == job_pb2.JOB_STATUS_FAILED
    assert big.error_message == "result write failed: result exceeds max size"
    obj = (await results.next()).job_result
    assert obj.status == job_pb2.JOB_STATUS_FAILED
    assert obj.error_message.startswith("result write failed: Object of type object")


async def test_invalid_packets_are_dropped_without_result(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    worker, topic = echo_worker(workers, prefix)  # max_parallel=1: jobs are served in order
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()

    def broken(name: str, mutate: Callable[[BusPacket], None]) -> bytes:
        job_id = f"job-{prefix}-{name}"
        packet = job_packet(job_id, topic)
        mutate(packet)
        return packet.SerializeToString(deterministic=True)

    invalid = [
        broken("v2", lambda p: setattr(p, "protocol_version", 2)),
        broken("v0", lambda p: setattr(p, "protocol_version", 0)),
        broken("notime", lambda p: p.ClearField("created_at")),
        broken("notrace", lambda p: setattr(p, "trace_id", "")),
        broken("notopic", lambda p: setattr(p.job_request, "topic", "")),
        broken("prio", lambda p: setattr(p.job_request, "priority", 9)),
        b"\x0a\x05ab",
    ]
    for name, data in enumerate(invalid):
        await store.set(cap.context_key(f"job-{prefix}-{name}"), "{}", ex=300)
        await nc.publish(topic, data)
    valid = f"job-{prefix}-valid"
    await dispatch(nc, store, topic, valid, topic, {})

    assert succeeded(await results.next(), valid)
    assert results.empty()


# --- cancellation, deadline, shutdown -----------------------------------------------------------


async def test_cancel_stops_a_running_job(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.cancel"
    worker = workers(f"w-{prefix}")
    started = asyncio.Event()
    saw_cancel = asyncio.Event()

    @worker.handler(topic)
    async def long(ctx: JobContext, data: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if ctx.cancelled.is_set():
                saw_cancel.set()
            raise

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    job_id = f"job-{prefix}-cancel"
    await dispatch(nc, store, topic, job_id, topic, {})
    await asyncio.wait_for(started.wait(), WAIT)

    cancel = cap.envelope(
        sender_id=SCHEDULER,
        trace_id=job_id,
        job_cancel=job_pb2.JobCancel(job_id=job_id, reason="user asked", requested_by="tester"),
    )
    await nc.publish(cap.SUBJECT_CANCEL, cap.encode(cancel))

    packet = await results.next()
    assert packet.trace_id == f"trace-{job_id}"
    result = packet.job_result
    assert result.job_id == job_id
    assert result.status == job_pb2.JOB_STATUS_CANCELLED
    assert result.error_message == "user asked"
    assert saw_cancel.is_set()
    assert worker.active_jobs == 0


async def test_cancel_answers_a_queued_job_at_once(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.queue"
    worker = workers(f"w-{prefix}")  # one slot: the second job waits for it
    started = asyncio.Event()
    release = asyncio.Event()
    ran: list[str] = []

    @worker.handler(topic)
    async def gated(ctx: JobContext, data: Any) -> Any:
        ran.append(ctx.job_id)
        started.set()
        await release.wait()
        return "finished"

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    running, queued = f"job-{prefix}-running", f"job-{prefix}-queued"
    await dispatch(nc, store, topic, running, topic, {})
    await asyncio.wait_for(started.wait(), WAIT)
    await dispatch(nc, store, topic, queued, topic, {})
    cancel = cap.envelope(
        sender_id=SCHEDULER,
        trace_id=queued,
        job_cancel=job_pb2.JobCancel(job_id=queued, requested_by="tester"),
    )
    await nc.publish(cap.SUBJECT_CANCEL, cap.encode(cancel))

    first = (await results.next()).job_result  # while the running job still holds the slot
    assert first.job_id == queued
    assert first.status == job_pb2.JOB_STATUS_CANCELLED
    assert first.error_message == "cancelled"  # the cancel gave no reason
    release.set()
    assert succeeded(await results.next(), running)
    assert ran == [running]


async def test_deadline_times_the_job_out(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.deadline"
    worker = workers(f"w-{prefix}")

    @worker.handler(topic)
    async def long(ctx: JobContext, data: Any) -> Any:
        assert ctx.deadline_ms == 200
        await asyncio.sleep(3600)

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    job_id = f"job-{prefix}-deadline"
    began = time.monotonic()
    await dispatch(nc, store, topic, job_id, topic, {}, budget=job_pb2.Budget(deadline_ms=200))

    result = (await results.next()).job_result
    assert result.status == job_pb2.JOB_STATUS_TIMEOUT
    assert result.error_message == "deadline exceeded"
    assert result.error_code_enum == job_pb2.ERROR_CODE_JOB_TIMEOUT
    assert 200 <= result.execution_ms < WAIT * 1000
    assert time.monotonic() - began < WAIT


async def test_stop_finishes_running_jobs_and_releases_queued_ones(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.stop"
    worker = workers(f"w-{prefix}")  # one slot: the second job has to queue
    started = asyncio.Event()
    release = asyncio.Event()

    @worker.handler(topic)
    async def gated(ctx: JobContext, data: Any) -> Any:
        started.set()
        await release.wait()
        return "finished"

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    running, queued = f"job-{prefix}-running", f"job-{prefix}-queued"
    await dispatch(nc, store, topic, running, topic, {})
    await asyncio.wait_for(started.wait(), WAIT)
    await dispatch(nc, store, topic, queued, topic, {})  # flushed: the worker has it

    stopping = asyncio.create_task(worker.stop(grace=WAIT))
    try:
        first = (await results.next()).job_result
        assert first.job_id == queued
        assert first.status == job_pb2.JOB_STATUS_FAILED_RETRYABLE
        assert first.error_message == "worker shutting down"
        assert first.error_code_enum == job_pb2.ERROR_CODE_JOB_WORKER_UNAVAILABLE
        release.set()
        assert succeeded(await results.next(), running)  # published during stop()
    finally:
        release.set()
        await asyncio.wait_for(stopping, WAIT)


async def test_stop_interrupts_jobs_after_grace(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    topic = f"job.t{prefix}.stuck"
    worker = workers(f"w-{prefix}")
    started = asyncio.Event()

    @worker.handler(topic)
    async def stuck(ctx: JobContext, data: Any) -> Any:
        started.set()
        await asyncio.sleep(3600)

    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    await worker.start()
    job_id = f"job-{prefix}-stuck"
    await dispatch(nc, store, topic, job_id, topic, {})
    await asyncio.wait_for(started.wait(), WAIT)
    await asyncio.wait_for(worker.stop(grace=0.2), WAIT)

    result = (await results.next()).job_result
    assert result.job_id == job_id
    assert result.status == job_pb2.JOB_STATUS_FAILED_RETRYABLE
    assert result.error_message == "worker shutting down"


# --- signatures -------------------------------------------------------------------------------


async def test_signed_traffic(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    scheduler_key = cap.Signer.generate()
    worker_key = cap.Signer.generate()
    worker, topic = echo_worker(
        workers,
        prefix,
        signer=worker_key,
        verifier=cap.Verifier({SCHEDULER: scheduler_key.public_pem()}),
    )
    # The inbox verifies every packet of the worker with the worker's public key.
    results = await listen(
        nc,
        cap.SUBJECT_RESULT,
        worker.worker_id,
        cap.Verifier({worker.worker_id: worker_key.public_key}),
    )
    await worker.start()

    stranger = cap.Signer.generate()
    await dispatch(nc, store, topic, f"job-{prefix}-unsigned", topic, {})
    await dispatch(nc, store, topic, f"job-{prefix}-stranger", topic, {}, signer=stranger)
    signed = f"job-{prefix}-signed"
    await dispatch(nc, store, topic, signed, topic, {"s": 1}, signer=scheduler_key)

    packet = await results.next()
    assert succeeded(packet, signed)
    assert packet.signature
    assert results.empty()


# --- run() --------------------------------------------------------------------------------------


async def test_run_stops_on_sigterm(
    nc: NatsClient, store: aioredis.Redis, workers: MakeWorker, prefix: str
) -> None:
    worker, topic = echo_worker(workers, prefix, heartbeat_interval=60)
    heartbeats = await listen(nc, cap.SUBJECT_HEARTBEAT, worker.worker_id)
    results = await listen(nc, cap.SUBJECT_RESULT, worker.worker_id)
    running = asyncio.create_task(worker.run())
    try:
        # The first heartbeat runs only once run() waits, i.e. after its handlers are in place.
        await heartbeats.next()
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        job_id = f"job-{prefix}-run"
        await dispatch(nc, store, topic, job_id, topic, {})
        assert succeeded(await results.next(), job_id)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(running, WAIT)
    finally:
        running.cancel()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
