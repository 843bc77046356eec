"""Hostile bytes on every subject the platform consumes, through real NATS into a running App.

For each subject, hypothesis draws inputs (random bytes, truncated valid packets, valid
packets of another payload, fields of the wrong wire type, huge fields, broken envelopes);
each is published, followed by a barrier (``b"\\xff"``, malformed for every kind). NATS keeps
the order of one publisher's messages and a subscription handles them one at a time, so once
the barrier's drop is counted the input before it has been handled: the input's own drop
must be counted by then, under the reason it deserves, and nothing else. Afterwards nothing
in Redis has changed and the App still runs a normal job end to end.

CAP subjects only get inputs a CAP 2.17 worker would refuse (a valid packet would rightly
change state); our own subjects (job and run events, run advances, policy events) get
whatever is drawn, since a message that parses there is a wake-up hint that changes nothing
by itself.
"""

from __future__ import annotations

import asyncio
import json
import re
import string
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from redis.asyncio import Redis

from cordum.agent.v1 import alert_pb2, handshake_pb2, heartbeat_pb2
from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.server.workflows.engine import advance_subject, run_events_subject
from cordum.v1 import job_pb2, run_pb2, run_service_pb2

from support.cordum import app_settings, running_app
from support.jobs import J, jobs, json_value, make_worker, wait_state
from support.waiting import eventually

EXAMPLES = 50  # per subject; the whole module stays well under 30 s of fuzzing
BARRIER = b"\xff"  # a truncated varint: no BusPacket, JobEvent, UTF-8 text or JSON
DROPPED = "cordum_bus_packets_dropped_total"
PAYLOADS = (
    "job_request",
    "job_result",
    "job_progress",
    "job_cancel",
    "heartbeat",
    "handshake",
    "alert",
)


@dataclass(frozen=True)
class Target:
    kind: str  # the subject_kind label
    subject: Callable[[App], str]
    # How many of the App's subscriptions get a message on this subject (each counts).
    subscribers: int
    payload: str | None = None  # CAP subjects: the payload they carry
    parse: Callable[[bytes], Any] | None = None  # our own subjects: what accepts a message
    sample: Callable[[str], bytes] | None = None  # our own subjects: a well-formed message


def _ns(app: App) -> str:
    return app.settings.namespace


def _job_event(ident: str) -> bytes:
    return job_pb2.JobEvent(
        job_id=f"fuzz-{ident}", state=job_pb2.JOB_STATE_SUCCEEDED, message=ident
    ).SerializeToString()


def _run_event(ident: str) -> bytes:
    event = run_pb2.RunEvent(run_id=f"fuzz-run-{ident}", type="step_succeeded", seq=1)
    return run_service_pb2.GetRunTimelineResponse(events=[event]).SerializeToString()


def _policy_event(ident: str) -> bytes:
    return json.dumps({"action": "publish", "version": len(ident), "snapshot": ident}).encode()


TARGETS = [
    Target("submit", lambda a: a.subjects.submit, 1, payload="job_request"),
    Target("result", lambda a: cap.SUBJECT_RESULT, 1, payload="job_result"),
    Target("progress", lambda a: cap.SUBJECT_PROGRESS, 1, payload="job_progress"),
    Target("cancel", lambda a: a.subjects.cancel, 1, payload="job_cancel"),
    Target("heartbeat", lambda a: cap.SUBJECT_HEARTBEAT, 1, payload="heartbeat"),
    Target("handshake", lambda a: cap.SUBJECT_HANDSHAKE, 1, payload="handshake"),
    # The job event hub (every event) and the workflow engine (step jobs' terminal events,
    # and the bare subject) both listen.
    Target(
        "job_event",
        lambda a: a.subjects.job_event("wf", "SUCCEEDED"),
        2,
        parse=job_pb2.JobEvent.FromString,
        sample=_job_event,
    ),
    Target(
        "job_event",
        lambda a: a.subjects.job_events,
        2,
        parse=job_pb2.JobEvent.FromString,
        sample=_job_event,
    ),
    Target(
        "job_event",
        lambda a: a.subjects.job_event("job", "FAILED"),
        1,
        parse=job_pb2.JobEvent.FromString,
        sample=_job_event,
    ),
    Target(
        "run_event",
        lambda a: run_events_subject(a.subjects),
        1,
        parse=run_service_pb2.GetRunTimelineResponse.FromString,
        sample=_run_event,
    ),
    Target(
        "run_advance",
        lambda a: advance_subject(a.subjects),
        1,
        parse=bytes.decode,
        sample=lambda ident: f"fuzz-run-{ident}".encode(),
    ),
    Target(
        "policy_event",
        lambda a: a.subjects.policy_events,
        1,
        parse=json.loads,
        sample=_policy_event,
    ),
]


# -- what each input deserves ---------------------------------------------------------------


def expected_reason(target: Target, data: bytes) -> str | None:
    """The reason the App must drop `data` for, or None when it must accept it."""
    if target.parse is not None:
        try:
            target.parse(data)
        except Exception:
            return "malformed"
        return None
    try:
        packet = cap.BusPacket.FromString(data)
    except Exception:
        return "malformed"
    try:
        cap.validate(packet)
    except cap.PacketError:
        return "invalid"
    return None if packet.WhichOneof("payload") == target.payload else "wrong_payload"


# -- inputs ---------------------------------------------------------------------------------

_IDS = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=12)


def valid_packet(payload: str, ident: str) -> cap.BusPacket:
    sender = f"fuzz-{ident}"
    job_id = f"fuzz-job-{ident}"
    messages: dict[str, Any] = {
        "job_request": agent.JobRequest(
            job_id=job_id, topic="job.fuzz", priority=1, context_ptr=f"redis://ctx:{job_id}"
        ),
        "job_result": agent.JobResult(
            job_id=job_id, status=agent.JOB_STATUS_SUCCEEDED, worker_id=sender
        ),
        "job_progress": agent.JobProgress(job_id=job_id, percent=50),
        "job_cancel": agent.JobCancel(job_id=job_id, requested_by=sender),
        "heartbeat": heartbeat_pb2.Heartbeat(worker_id=sender),
        "handshake": handshake_pb2.Handshake(component_id=sender),
        "alert": alert_pb2.SystemAlert(message="m", level="WARN", component="c", code="x"),
    }
    packet = cap.envelope(
        sender_id=sender, trace_id=f"trace-{ident}", **{payload: messages[payload]}
    )
    # A fixed time: the same draw must build the same bytes (hypothesis replays draws).
    packet.created_at.FromSeconds(1_700_000_000)
    return packet


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wrong_wire_type(draw: st.DrawFn, base: bytes) -> bytes:
    """A known BusPacket field appended with a wire type or content that may not fit it."""
    field = draw(st.integers(1, 22))
    wire = draw(st.sampled_from([0, 1, 2, 5]))
    if wire == 0:
        value = _varint(draw(st.integers(0, 2**64 - 1)))
    elif wire == 1:
        value = draw(st.binary(min_size=8, max_size=8))
    elif wire == 5:
        value = draw(st.binary(min_size=4, max_size=4))
    else:
        content = draw(st.binary(max_size=64))
        value = _varint(len(content)) + content
    return base + _varint(field << 3 | wire) + value


@st.composite
def broken_envelope(draw: st.DrawFn, packet: cap.BusPacket) -> bytes:
    breakage = draw(
        st.sampled_from(["trace_id", "sender_id", "version", "created_at", "payload", "field"])
    )
    if breakage in ("trace_id", "sender_id"):
        packet.ClearField(breakage)
    elif breakage == "version":
        packet.protocol_version = draw(st.sampled_from([0, 2, -1, 2**31 - 1]))
    elif breakage == "created_at":
        packet.ClearField("created_at")
    elif breakage == "payload":
        packet.ClearField(packet.WhichOneof("payload"))  # type: ignore[arg-type]
    else:  # a payload rule: the id the payload must have
        kind = packet.WhichOneof("payload")
        if kind in ("job_request", "job_result", "job_progress", "job_cancel"):
            getattr(packet, kind).job_id = ""
        else:
            packet.protocol_version = 0
    return packet.SerializeToString(deterministic=True)


@st.composite
def huge(draw: st.DrawFn, packet: cap.BusPacket) -> bytes:
    """Big fields (up to ~600 KiB, NATS takes 1 MiB) on a packet that is refused anyway."""
    size = draw(st.integers(64 * 1024, 600 * 1024))
    if packet.HasField("job_request") and draw(st.booleans()):
        # Over CAP's collection bound.
        for i in range(cap.MAX_REPEATED_FIELD_SIZE + 1):
            packet.job_request.labels[f"k{i}"] = "v" * (size // 2000)
        return packet.SerializeToString(deterministic=True)
    packet.trace_id = "t" * size
    packet.protocol_version = 0
    return packet.SerializeToString(deterministic=True)


@st.composite
def inputs(draw: st.DrawFn, target: Target) -> bytes:
    ident = draw(_IDS)
    own = target.payload or draw(st.sampled_from(PAYLOADS))
    base = valid_packet(own, ident)
    categories = ["random", "truncated", "wrong_payload", "wrong_type", "envelope", "huge"]
    # Our own subjects also get well-formed messages of their own type.
    category = draw(st.sampled_from(categories + (["own"] if target.sample else [])))
    if category == "random":
        return draw(st.binary(max_size=4096))
    if category == "truncated":
        data = base.SerializeToString(deterministic=True)
        if target.sample is not None and draw(st.booleans()):
            data = target.sample(ident)
        return data[: draw(st.integers(0, len(data) - 1))]
    if category == "own":
        assert target.sample is not None
        return target.sample(ident)
    if category == "wrong_payload":
        other = draw(st.sampled_from([p for p in PAYLOADS if p != own]))
        return valid_packet(other, ident).SerializeToString(deterministic=True)
    if category == "wrong_type":
        return draw(wrong_wire_type(base.SerializeToString(deterministic=True)))
    if category == "envelope":
        return draw(broken_envelope(base))
    return draw(huge(base))


# -- fixtures and probes --------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    settings_ = app_settings(nats_url, redis_url, config_dir, reconcile_interval_s=5.0)
    async with running_app(settings_) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def bus(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url, name="test-bus-fuzz")
    try:
        yield nc
    finally:
        await nc.drain()


@pytest_asyncio.fixture(scope="module")
async def worker(nats_url: str, redis_url: str) -> AsyncIterator[Worker]:
    tag = uuid.uuid4().hex[:8]
    w = make_worker(f"fuzz-worker-{tag}", nats_url, redis_url)

    @w.handler(f"job.t.ok.fuzz-{tag}")
    async def echo(ctx, data):  # type: ignore[no-untyped-def]
        return {"echo": data}

    async with w:
        yield w


@pytest_asyncio.fixture(scope="module")
async def stub(app: App) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield jobs(channel)


def drops(app: App, kind: str) -> dict[str, float]:
    counted: dict[str, float] = {}
    for metric in app.metrics.bus_dropped.collect():
        for sample in metric.samples:
            if sample.name == DROPPED and sample.labels["subject_kind"] == kind:
                counted[sample.labels["reason"]] = sample.value
    return counted


# Keys that change by themselves: the scheduler's lease, the reconcilers' tick locks.
_TRANSIENT = re.compile(rb"scheduler:alive:|lock:")
# Other apps' namespaces (app_settings): theirs to change.
_NAMESPACED = re.compile(rb"^t[0-9a-f]{8}\.")


async def redis_state(redis: Redis, namespace: str) -> dict[bytes, bytes]:
    """Every key this app (or a CAP party) could write, with its serialized value."""
    own = namespace.encode()
    keys = [
        key
        async for key in redis.scan_iter(count=1000)
        if not _TRANSIENT.search(key) and (key.startswith(own) or not _NAMESPACED.match(key))
    ]
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.dump(key)
    return dict(zip(keys, await pipe.execute(), strict=True))


def run_examples(
    loop: asyncio.AbstractEventLoop,
    target: Target,
    example: Callable[[bytes, str | None], Awaitable[None]],
) -> None:
    """Hypothesis drives from this thread; each example runs on the App's event loop."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=inputs(target))
    def check(data: bytes) -> None:
        reason = expected_reason(target, data)
        if target.payload is not None:
            assume(reason is not None)
        asyncio.run_coroutine_threadsafe(example(data, reason), loop).result(timeout=60)

    check()


# -- the test -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=[f"{t.kind}-{i}" for i, t in enumerate(TARGETS)])
async def test_hostile_bytes_are_dropped_counted_and_change_nothing(
    app: App, bus: NatsClient, worker: Worker, stub: Any, target: Target
) -> None:
    assert app.redis is not None
    subject = target.subject(app)
    before = await redis_state(app.redis, _ns(app))
    seen: dict[str | None, int] = {}

    async def example(data: bytes, reason: str | None) -> None:
        start = drops(app, target.kind)
        await bus.publish(subject, data)
        await bus.publish(subject, BARRIER)
        await bus.flush()
        wanted = dict(start)
        wanted["malformed"] = wanted.get("malformed", 0) + target.subscribers
        if reason is not None:
            wanted[reason] = wanted.get(reason, 0) + target.subscribers
        total = sum(wanted.values())

        async def counted() -> dict[str, float]:
            return drops(app, target.kind)

        got = await eventually(
            counted,
            until=lambda d: sum(d.values()) >= total,
            within=20,
            what=f"{target.kind} drops to reach {wanted}",
        )
        assert got == wanted, f"{len(data)} bytes {data[:80]!r}: expected {reason}"
        seen[reason] = seen.get(reason, 0) + 1

    await asyncio.to_thread(run_examples, asyncio.get_running_loop(), target, example)
    # The strategies reach every kind of refusal a subject has (and, on our own subjects,
    # messages that parse).
    if target.payload is not None:
        assert {"malformed", "invalid", "wrong_payload"} <= set(seen), seen
    else:
        assert {"malformed", None} <= set(seen), seen

    after = await redis_state(app.redis, _ns(app))
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    assert not added and not changed, f"added {added[:10]}, changed {changed[:10]}"

    # And the App still does its job: submit -> scheduler -> worker -> result.
    topic = worker.topics[0]
    reply = await stub.SubmitJob(J.SubmitJobRequest(topic=topic, input=json_value({"n": 1})))
    await wait_state(stub, reply.job_id, "SUCCEEDED", within=20)
    # Its safety decision is recorded in the background; wait for it, so the next test's
    # "before" does not see it arrive.
    decisions = f"{_ns(app)}policy:decisions"

    async def recorded() -> list[bytes]:
        assert app.redis is not None
        return await app.redis.lrange(decisions, 0, 20)

    await eventually(
        recorded,
        until=lambda entries: any(reply.job_id.encode() in e for e in entries),
        within=20,
        what="the normal job's recorded safety decision",
    )
