"""A real, unmodified CAP 2.17 worker against our control plane, item by item.

The worker is ``cap-sdk-python==2.17.0``'s ``cap.runtime.Agent``, run in its own venv (it pins
protobuf<7; ours is on protobuf 7) as a separate process, with only ``NATS_URL``/``REDIS_URL``
pointing at the test servers and ``CORDUM_SDK_HANDSHAKE`` unset (no worker trust). The venv is
cached in ``.venv-cap`` at the repository root (gitignored).

Each check names the item of ``reference/cap-wire.md`` §5 it covers ("§5.3" = item 3). What we
send is captured with plain (non-queue) NATS subscriptions and decoded with the CAP schema;
whether the real SDK would admit it is asked of the SDK itself (``cap.packet_boundary
.decode_packet``, the function the Agent runs on every inbound packet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats
import pytest
import pytest_asyncio
from google.protobuf import json_format, struct_pb2
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from cordum.agent.v1 import buspacket_pb2, job_pb2
from cordum.sdk import cap
from cordum.server.app import App
from cordum.v1 import job_pb2 as v1_job_pb2
from cordum.v1 import (
    job_service_pb2,
    job_service_pb2_grpc,
    status_service_pb2,
    status_service_pb2_grpc,
)

from support.cap_venv import cap_env, ensure_cap_python
from support.cordum import app_settings, running_app, write_config
from support.waiting import eventually

pytestmark = pytest.mark.slow

WAIT = 20.0  # upper bound for anything expected to happen
JS = v1_job_pb2.JobState
J = job_service_pb2

# The worker: nothing but the public Agent API. Topics and id come from the environment.
WORKER_SCRIPT = """\
import asyncio, os
from cap.runtime import Agent

agent = Agent(sender_id=os.environ["TEST_WORKER_ID"], max_parallel=4)


@agent.job(os.environ["TEST_ECHO_TOPIC"])
async def echo(ctx, data):
    return {"echo": data, "job_id": ctx.job_id}


@agent.job(os.environ["TEST_SLOW_TOPIC"])
async def slow(ctx, data):
    await asyncio.sleep(float(data["sleep_s"]))
    return {"slept": data["sleep_s"], "job_id": ctx.job_id}


@agent.job(os.environ["TEST_FAIL_TOPIC"])
async def fail(ctx, data):
    raise RuntimeError("secret detail that must not leave the worker")


asyncio.run(agent.run())
"""

# What the Agent runs on every inbound packet: parse, validate, verify (no keys configured).
# Reads hex-encoded packets, one a line; prints one JSON verdict a line.
ADMISSION_SCRIPT = """\
import json, logging, sys
from cap.packet_boundary import decode_packet

class Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

log = logging.getLogger("admission")
log.propagate = False
for line in sys.stdin:
    keep = Keep()
    log.handlers = [keep]
    packet = decode_packet(bytes.fromhex(line.strip()), None, log)
    print(json.dumps({"admitted": packet is not None, "log": keep.lines}))
"""

# A CAP client, as the SDK documents it: cap.client.submit_job on sys.job.submit.
CLIENT_SCRIPT = """\
import asyncio, os, nats
from cap.client import submit_job
from cap.pb.cordum.agent.v1 import job_pb2

async def main():
    nc = await nats.connect(os.environ["NATS_URL"])
    request = job_pb2.JobRequest(
        job_id=os.environ["TEST_JOB_ID"],
        topic=os.environ["TEST_TOPIC"],
        priority=job_pb2.JOB_PRIORITY_BATCH,
        context_ptr=os.environ["TEST_CONTEXT_PTR"],
        tenant_id="default",
    )
    await submit_job(nc, request, os.environ["TEST_TRACE_ID"], "cap-test-client")
    await nc.drain()

asyncio.run(main())
"""


# -- the CAP venv ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cap_python() -> Path:
    """Python of a venv holding cap-sdk-python 2.17.0 (built once, then reused)."""
    return ensure_cap_python()


async def run_cap(python: Path, script: str, *, env: dict[str, str], stdin: bytes = b"") -> str:
    """Run a short script in the CAP venv (without blocking the event loop); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        python,
        "-c",
        script,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode == 0, f"CAP script failed ({proc.returncode}):\n{err.decode()}"
    return out.decode()


async def cap_admits(python: Path, packets: list[bytes]) -> list[dict[str, Any]]:
    """The real SDK's verdict on each packet, as an Agent without keys would judge it."""
    lines = "".join(p.hex() + "\n" for p in packets).encode()
    out = await run_cap(python, ADMISSION_SCRIPT, env=cap_env("", ""), stdin=lines)
    return [json.loads(line) for line in out.splitlines()]


# -- watching the bus -----------------------------------------------------------------------


@dataclass
class Seen:
    subject: str
    data: bytes
    headers: dict[str, str] | None
    packet: buspacket_pb2.BusPacket


@dataclass
class Tap:
    """Every CAP packet seen on some subjects (plain subscriptions: no queue group)."""

    nc: NatsClient
    seen: list[Seen] = field(default_factory=list)

    async def watch(self, *subjects: str) -> None:
        for subject in subjects:
            await self.nc.subscribe(subject, cb=self._on_msg)
        await self.nc.flush()  # subscribed before anything we wait for is sent

    async def _on_msg(self, msg: Msg) -> None:
        packet = buspacket_pb2.BusPacket.FromString(msg.data)
        self.seen.append(Seen(msg.subject, msg.data, msg.headers, packet))

    def where(self, predicate: Callable[[Seen], bool]) -> list[Seen]:
        return [s for s in self.seen if predicate(s)]

    async def wait_for(
        self, predicate: Callable[[Seen], bool], *, count: int = 1, what: str
    ) -> list[Seen]:
        async def probe() -> list[Seen]:
            return self.where(predicate)

        return await eventually(probe, until=lambda s: len(s) >= count, within=WAIT, what=what)


def dispatch_of(job_id: str) -> Callable[[Seen], bool]:
    return lambda s: s.packet.HasField("job_request") and s.packet.job_request.job_id == job_id


def result_of(job_id: str) -> Callable[[Seen], bool]:
    return lambda s: s.packet.HasField("job_result") and s.packet.job_result.job_id == job_id


# -- the worker ----------------------------------------------------------------------------


@dataclass
class CapWorker:
    worker_id: str
    echo_topic: str
    slow_topic: str
    fail_topic: str
    process: asyncio.subprocess.Process
    log_path: Path
    started: float
    env: dict[str, str]

    @property
    def topics(self) -> list[str]:
        return sorted([self.echo_topic, self.slow_topic, self.fail_topic])

    @property
    def direct_subject(self) -> str:
        return f"worker.{self.worker_id}.jobs"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


async def list_workers(channel: grpc.aio.Channel) -> list[Any]:
    stub = status_service_pb2_grpc.StatusServiceStub(channel)
    reply = await stub.ListWorkers(status_service_pb2.ListWorkersRequest())
    return list(reply.workers)


@pytest_asyncio.fixture(scope="module")
async def session_channel(cordum: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cordum.grpc_port}") as ch:
        yield ch


@pytest_asyncio.fixture(scope="module")
async def cap_worker(
    cap_python: Path,
    cordum: App,
    session_channel: grpc.aio.Channel,
    nats_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[CapWorker]:
    """The CAP worker process, started after our control plane, registered with it."""
    tag = uuid.uuid4().hex[:8]
    workdir = tmp_path_factory.mktemp("cap-worker")
    script = workdir / "worker.py"
    script.write_text(WORKER_SCRIPT)
    log_path = workdir / "worker.log"
    env = cap_env(
        nats_url,
        redis_url,
        TEST_WORKER_ID=f"cap-worker-{tag}",
        TEST_ECHO_TOPIC=f"job.cap-echo-{tag}",
        TEST_SLOW_TOPIC=f"job.cap-slow-{tag}",
        TEST_FAIL_TOPIC=f"job.cap-fail-{tag}",
    )
    # §5.19: worker trust off; with CORDUM_SDK_HANDSHAKE=warn|enforce it would need our
    # challenge/authenticate responders (not part of this control plane yet).
    assert "CORDUM_SDK_HANDSHAKE" not in env
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            cap_python, script, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
    worker = CapWorker(
        worker_id=env["TEST_WORKER_ID"],
        echo_topic=env["TEST_ECHO_TOPIC"],
        slow_topic=env["TEST_SLOW_TOPIC"],
        fail_topic=env["TEST_FAIL_TOPIC"],
        process=process,
        log_path=log_path,
        started=time.time(),
        env=env,
    )
    try:

        async def registered() -> list[Any]:
            assert process.returncode is None, f"CAP worker exited:\n{worker.log()}"
            return [
                w for w in await list_workers(session_channel) if w.worker_id == worker.worker_id
            ]

        await eventually(registered, within=60, what="the CAP worker in ListWorkers")
        yield worker
    finally:
        # Stopped by its PID: SIGTERM, then SIGKILL if it does not go.
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()


@pytest_asyncio.fixture(scope="module")
async def tap(nats_url: str, cap_worker: CapWorker) -> AsyncIterator[Tap]:
    """Our dispatches (direct and topic subjects), results, progress and cancels, for the
    module."""
    nc = await nats.connect(nats_url, name="test-cap-tap")
    watcher = Tap(nc)
    await watcher.watch(
        cap_worker.direct_subject,
        cap_worker.echo_topic,
        cap_worker.slow_topic,
        cap_worker.fail_topic,
        cap.SUBJECT_RESULT,
        cap.SUBJECT_PROGRESS,
        cap.SUBJECT_CANCEL,
    )
    try:
        yield watcher
    finally:
        await nc.drain()


@pytest_asyncio.fixture(scope="module")
async def bus(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url, name="test-cap-publisher")
    try:
        yield nc
    finally:
        await nc.drain()


# -- helpers -------------------------------------------------------------------------------


def jobs_stub(channel: grpc.aio.Channel) -> job_service_pb2_grpc.JobServiceStub:
    return job_service_pb2_grpc.JobServiceStub(channel)


def value(data: object) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


async def wait_state(
    stub: job_service_pb2_grpc.JobServiceStub, job_id: str, state: int
) -> v1_job_pb2.Job:
    async def job() -> v1_job_pb2.Job:
        return await stub.GetJob(J.GetJobRequest(job_id=job_id))

    return await eventually(
        job, until=lambda j: j.state == state, within=WAIT, what=f"{job_id} {JS.Name(state)}"
    )


async def events(app: App, job_id: str) -> list[tuple[str, str]]:
    assert app.store is not None
    return [(state, message) for _, state, message in await app.store.events(job_id)]


def transitions(log: list[tuple[str, str]]) -> list[str]:
    """States the job moved through (ignored late/duplicate results are logged, not moves)."""
    return [state for state, message in log if not message.startswith("ignored")]


def check_envelope(seen: Seen, *, trace_id: str, sender_id: str) -> None:
    packet = seen.packet
    # §5.1: a plain subject message; no NATS headers, no JetStream, no reply subject needed.
    assert not seen.headers
    # §5.2: binary protobuf BusPacket of the 2.17 schema, serialized deterministically.
    assert packet.SerializeToString(deterministic=True) == seen.data
    # §5.3: every envelope field, exactly one payload.
    assert packet.trace_id == trace_id
    assert packet.sender_id == sender_id
    assert packet.HasField("created_at")
    assert abs(packet.created_at.ToMilliseconds() / 1000 - time.time()) < 120
    assert packet.protocol_version == 1
    assert packet.WhichOneof("payload") is not None
    # §5.12 / §5.16: no auth token, signature metadata, identity or signature (we do not sign,
    # and the worker has no keys to check one against).
    assert not packet.auth_token
    assert not packet.HasField("signature_metadata")
    assert not packet.HasField("identity")
    assert not packet.signature


def check_job_request(request: job_pb2.JobRequest, *, job_id: str, topic: str) -> None:
    # §5.4: unique job id, a topic the worker registered, bounded fields.
    assert request.job_id == job_id
    assert request.topic == topic
    assert 0 <= request.priority <= 3
    assert request.step_index >= 0
    assert len(request.labels) <= 1000
    assert len(request.meta.risk_tags) <= 1000 and len(request.meta.requires) <= 1000
    for name in ("max_input_tokens", "max_output_tokens", "max_total_tokens"):
        assert 0 <= getattr(request.budget, name) <= 10**10
    assert request.budget.deadline_ms >= 0
    # §5.5: the pointer names the key only, never a server or db.
    assert request.context_ptr == f"redis://ctx:{job_id}"


async def check_context(app: App, job_id: str) -> Any:
    """§5.5 / §5.15: the input is a JSON document in a plain string key, with a TTL."""
    assert app.redis is not None
    key = f"ctx:{job_id}"
    assert await app.redis.type(key) == b"string"
    raw = await app.redis.get(key)
    assert raw is not None and len(raw) <= 2 * 1024 * 1024
    assert await app.redis.ttl(key) > 0
    return json.loads(raw.decode("utf-8"))


async def result_json(stub: job_service_pb2_grpc.JobServiceStub, job_id: str) -> Any:
    reply = await stub.GetJobResult(J.GetJobResultRequest(job_id=job_id))
    assert reply.state == JS.JOB_STATE_SUCCEEDED
    return json_format.MessageToDict(reply.result)


# -- the tests -----------------------------------------------------------------------------


async def test_worker_registers_from_its_handshake_and_heartbeats(
    cordum: App, session_channel: grpc.aio.Channel, cap_worker: CapWorker, rest_url: str
) -> None:
    # §5.11: the one-shot handshake tells us the worker id, its topics and its SDK.
    (worker,) = [
        w for w in await list_workers(session_channel) if w.worker_id == cap_worker.worker_id
    ]
    assert sorted(worker.topics) == cap_worker.topics
    assert sorted(worker.capabilities) == cap_worker.topics
    assert worker.sdk_version == "cap-python/v2"
    assert worker.live

    # §5.10: heartbeats (the first ~5 s after start) carry its capacity; pool stays empty.
    async def heartbeat_seen() -> Any:
        found = [
            w for w in await list_workers(session_channel) if w.worker_id == cap_worker.worker_id
        ]
        return found[0] if found else None

    beat = await eventually(
        heartbeat_seen,
        until=lambda w: w is not None and w.max_parallel_jobs == 4,
        within=WAIT,
        what="the CAP worker's first heartbeat",
    )
    assert beat.live and beat.pool == ""
    assert sorted(beat.topics) == cap_worker.topics  # still from the handshake

    # §5.20: visible in our worker registry through the REST API as well.
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        reply = await http.get("/api/v1/workers")
    assert reply.status_code == 200, reply.text
    listed = {w["worker_id"]: w for w in reply.json()["workers"]}
    assert cap_worker.worker_id in listed
    assert sorted(listed[cap_worker.worker_id]["topics"]) == cap_worker.topics
    assert listed[cap_worker.worker_id]["live"] is True


async def test_grpc_submit_round_trips_through_the_cap_worker(
    cordum: App,
    session_channel: grpc.aio.Channel,
    cap_worker: CapWorker,
    cap_python: Path,
    tap: Tap,
) -> None:
    stub = jobs_stub(session_channel)
    data = {"text": "hello over gRPC", "n": 3, "nested": {"ok": True}, "list": [1, "two"]}
    reply = await stub.SubmitJob(
        J.SubmitJobRequest(topic=cap_worker.echo_topic, input=value(data), labels={"a": "b"})
    )
    job_id, trace_id = reply.job_id, reply.trace_id
    done = await wait_state(stub, job_id, JS.JOB_STATE_SUCCEEDED)

    (dispatch,) = await tap.wait_for(dispatch_of(job_id), what="our dispatch")
    check_envelope(dispatch, trace_id=trace_id, sender_id=cordum.settings.sender_id)
    check_job_request(dispatch.packet.job_request, job_id=job_id, topic=cap_worker.echo_topic)
    assert dict(dispatch.packet.job_request.labels) == {"a": "b"}
    # §5.6: the registry knows the worker serves the topic, so the job went to its private
    # subject, once (not also on the topic subject, where its queue group would take it too).
    assert dispatch.subject == cap_worker.direct_subject
    # §5.2-§5.4: the real SDK admits it exactly as its Agent would.
    (verdict,) = await cap_admits(cap_python, [dispatch.data])
    assert verdict == {"admitted": True, "log": []}

    # §5.5: the input was stored as JSON before the dispatch; the worker read exactly it.
    assert await check_context(cordum, job_id) == data

    # §5.8: the worker's result (no dispatch/identity echoed) moved the job.
    (result,) = await tap.wait_for(result_of(job_id), what="the worker's result")
    assert result.packet.sender_id == cap_worker.worker_id
    assert result.packet.trace_id == trace_id  # the worker echoes our trace
    assert not result.packet.job_result.HasField("dispatch")
    assert not result.packet.job_result.HasField("identity")
    assert done.worker_id == cap_worker.worker_id
    assert done.execution_ms == result.packet.job_result.execution_ms
    assert done.attempts == 1

    # §5.9: the output is read from the worker's pointer, through our API.
    assert done.result_ptr == f"redis://res:{job_id}"
    assert await result_json(stub, job_id) == {"echo": data, "job_id": job_id}

    # §5.15: we gave the worker's res:<id> (written without expiry) a TTL.
    assert cordum.redis is not None
    assert await cordum.redis.ttl(f"res:{job_id}") > 0

    # §5.17: no progress stream is needed: DISPATCHED straight to SUCCEEDED, nothing on
    # sys.job.progress from this job.
    assert transitions(await events(cordum, job_id)) == ["PENDING", "DISPATCHED", "SUCCEEDED"]
    assert not tap.where(
        lambda s: s.subject == cap.SUBJECT_PROGRESS and s.packet.job_progress.job_id == job_id
    )

    # §5.3: our sender_id is stable: every dispatch so far carries the same one.
    senders = {s.packet.sender_id for s in tap.where(lambda s: s.packet.HasField("job_request"))}
    assert senders == {cordum.settings.sender_id}


async def test_rest_submit_through_envoy_round_trips(
    cordum: App, cap_worker: CapWorker, rest_url: str, tap: Tap
) -> None:
    body = {
        "prompt": "hello over REST",
        "topic": cap_worker.echo_topic,
        "context": {"user": "ada", "count": 2},
    }
    async with httpx.AsyncClient(base_url=rest_url, timeout=10) as http:
        reply = await http.post("/api/v1/jobs", json=body)
        assert reply.status_code == 200, reply.text
        submitted = reply.json()
        job_id = submitted["job_id"]
        assert submitted["job"]["state"] == "JOB_STATE_PENDING"

        async def job() -> dict[str, Any]:
            got = await http.get(f"/api/v1/jobs/{job_id}")
            assert got.status_code == 200, got.text
            return got.json()

        done = await eventually(
            job, until=lambda j: j["state"] == "JOB_STATE_SUCCEEDED", within=WAIT, what="REST job"
        )
        assert done["worker_id"] == cap_worker.worker_id
        got = await http.get(f"/api/v1/jobs/{job_id}/result")
    assert got.status_code == 200, got.text
    result = got.json()

    # §5.5: a prompt is not JSON by itself: the worker gets upstream's JSON document around it.
    document = await check_context(cordum, job_id)
    assert document["prompt"] == body["prompt"]
    assert document["topic"] == cap_worker.echo_topic
    assert document["context"] == body["context"]
    # §5.9 / §5.20: the stored result, read through Envoy, is the worker's echo of that input.
    assert result["state"] == "JOB_STATE_SUCCEEDED"
    assert result["result"] == {"echo": document, "job_id": job_id}
    assert result["result_ptr"] == f"redis://res:{job_id}"

    (dispatch,) = await tap.wait_for(dispatch_of(job_id), what="our dispatch")
    check_envelope(dispatch, trace_id=submitted["trace_id"], sender_id=cordum.settings.sender_id)
    check_job_request(dispatch.packet.job_request, job_id=job_id, topic=cap_worker.echo_topic)


async def test_a_failing_handler_fails_the_job_with_the_workers_message(
    cordum: App, session_channel: grpc.aio.Channel, cap_worker: CapWorker, tap: Tap
) -> None:
    stub = jobs_stub(session_channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(topic=cap_worker.fail_topic, prompt="x"))
    failed = await wait_state(stub, reply.job_id, JS.JOB_STATE_FAILED)
    # §5.8 / §5.9: FAILED (6) is accepted; on failure we keep the worker's error_message.
    (result,) = await tap.wait_for(result_of(reply.job_id), what="the failure result")
    assert result.packet.job_result.status == job_pb2.JOB_STATUS_FAILED
    assert failed.error_message == "handler failed"
    assert failed.worker_id == cap_worker.worker_id
    got = await stub.GetJobResult(J.GetJobResultRequest(job_id=reply.job_id))
    assert got.state == JS.JOB_STATE_FAILED
    assert got.error_message == "handler failed"
    assert not got.HasField("result")


async def test_cancel_is_ours_and_the_late_result_is_discarded(
    cordum: App, session_channel: grpc.aio.Channel, cap_worker: CapWorker, tap: Tap
) -> None:
    """§5.13: the worker ignores sys.job.cancel, finishes and reports SUCCEEDED anyway."""
    stub = jobs_stub(session_channel)
    reply = await stub.SubmitJob(
        J.SubmitJobRequest(topic=cap_worker.slow_topic, input=value({"sleep_s": 1.5}))
    )
    job_id = reply.job_id
    await tap.wait_for(dispatch_of(job_id), what="the dispatch of the slow job")
    cancelled = await stub.CancelJob(J.CancelJobRequest(job_id=job_id, reason="changed my mind"))
    assert cancelled.state == JS.JOB_STATE_CANCELLED

    # Other listeners learn it from a valid BusPacket{job_cancel} on sys.job.cancel.
    (cancel,) = await tap.wait_for(
        lambda s: s.packet.HasField("job_cancel") and s.packet.job_cancel.job_id == job_id,
        what="the cancel packet",
    )
    assert cancel.subject == cap.SUBJECT_CANCEL
    assert cancel.packet.job_cancel.requested_by
    cap.validate(cancel.packet)

    # The worker did not stop: its SUCCEEDED result arrives late and is recorded, ignored.
    (late,) = await tap.wait_for(result_of(job_id), what="the late result")
    assert late.packet.job_result.status == job_pb2.JOB_STATUS_SUCCEEDED

    async def log() -> list[tuple[str, str]]:
        return await events(cordum, job_id)

    entries = await eventually(
        log,
        until=lambda e: any(m.startswith("ignored late result SUCCEEDED") for _, m in e),
        within=WAIT,
        what="the late result to be recorded as ignored",
    )
    assert transitions(entries) == ["PENDING", "DISPATCHED", "CANCELLED"]
    job = await stub.GetJob(J.GetJobRequest(job_id=job_id))
    assert job.state == JS.JOB_STATE_CANCELLED
    assert not job.result_ptr
    got = await stub.GetJobResult(J.GetJobResultRequest(job_id=job_id))
    assert got.state == JS.JOB_STATE_CANCELLED
    assert not got.HasField("result")
    # §5.15: the worker's res:<id> of a discarded result still gets our TTL.
    assert cordum.redis is not None
    assert await cordum.redis.ttl(f"res:{job_id}") > 0


async def test_duplicate_dispatch_and_duplicate_result_complete_the_job_once(
    cordum: App, session_channel: grpc.aio.Channel, cap_worker: CapWorker, tap: Tap, bus: NatsClient
) -> None:
    """§5.14: the worker does not de-duplicate; we must, by job_id."""
    stub = jobs_stub(session_channel)
    data = {"once": True}
    reply = await stub.SubmitJob(J.SubmitJobRequest(topic=cap_worker.echo_topic, input=value(data)))
    job_id = reply.job_id
    await wait_state(stub, job_id, JS.JOB_STATE_SUCCEEDED)
    (dispatch,) = await tap.wait_for(dispatch_of(job_id), what="our dispatch")
    (result,) = await tap.wait_for(result_of(job_id), what="the result")

    # The same request again (a re-dispatch): the worker runs it again, answers again.
    await bus.publish(dispatch.subject, dispatch.data)
    await tap.wait_for(result_of(job_id), count=2, what="the worker's second result")
    # And the first result delivered twice.
    await bus.publish(cap.SUBJECT_RESULT, result.data)
    await bus.flush()

    async def log() -> list[tuple[str, str]]:
        return await events(cordum, job_id)

    entries = await eventually(
        log,
        until=lambda e: sum(m.startswith("ignored late result") for _, m in e) >= 2,
        within=WAIT,
        what="both extra results to be recorded as ignored",
    )
    assert transitions(entries) == ["PENDING", "DISPATCHED", "SUCCEEDED"]
    assert transitions(entries).count("SUCCEEDED") == 1
    assert await result_json(stub, job_id) == {"echo": data, "job_id": job_id}


# -- a control plane started after the worker -----------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def late_cordum(
    nats_url: str,
    redis_url: str,
    cap_worker: CapWorker,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[App]:
    """A control plane that starts after the worker, so it never sees its handshake.

    It runs without a namespace, as in production, so CAP clients reach it on the real
    ``sys.job.submit``; its dispatch timeout is 1 s.
    """
    config = write_config(
        tmp_path_factory.mktemp("late-config"),
        timeouts=(
            "reconciler:\n"
            "  dispatch_timeout_seconds: 1\n"
            "  running_timeout_seconds: 60\n"
            "  scan_interval_seconds: 1\n"
        ),
    )
    settings = app_settings(nats_url, redis_url, config, namespace="", reconcile_interval_s=0.2)
    async with running_app(settings) as app:
        yield app


@pytest_asyncio.fixture(scope="module")
async def late_channel(late_cordum: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{late_cordum.grpc_port}") as ch:
        yield ch


async def test_without_the_handshake_jobs_go_to_the_topic_queue_group(
    late_cordum: App, late_channel: grpc.aio.Channel, cap_worker: CapWorker, tap: Tap
) -> None:
    """§5.11: never depend on the handshake (sent once, at worker start). §5.10: a default
    Agent's heartbeat has no pool and no topics, so we fall back to the topic subject. §5.6:
    the worker's queue group (named like the topic) takes it; we never join that group."""
    stub = jobs_stub(late_channel)
    data = {"via": "topic subject"}
    reply = await stub.SubmitJob(J.SubmitJobRequest(topic=cap_worker.echo_topic, input=value(data)))
    done = await wait_state(stub, reply.job_id, JS.JOB_STATE_SUCCEEDED)
    (dispatch,) = await tap.wait_for(dispatch_of(reply.job_id), what="the topic dispatch")
    assert dispatch.subject == cap_worker.echo_topic
    check_envelope(dispatch, trace_id=reply.trace_id, sender_id=late_cordum.settings.sender_id)
    check_job_request(dispatch.packet.job_request, job_id=reply.job_id, topic=cap_worker.echo_topic)
    assert done.worker_id == cap_worker.worker_id
    assert await result_json(stub, reply.job_id) == {"echo": data, "job_id": reply.job_id}


async def test_a_dispatch_nobody_takes_times_out(
    late_cordum: App, late_channel: grpc.aio.Channel, tap: Tap
) -> None:
    """§5.7: plain NATS drops a publish nobody is subscribed to, silently; every dispatch has
    a deadline after which the reconciler re-queues it or (no retries left) times it out."""
    stub = jobs_stub(late_channel)
    topic = f"job.cap-nobody-{uuid.uuid4().hex[:8]}"
    reply = await stub.SubmitJob(J.SubmitJobRequest(topic=topic, prompt="anyone?"))
    await wait_state(stub, reply.job_id, JS.JOB_STATE_TIMEOUT)
    log = await events(late_cordum, reply.job_id)
    assert transitions(log) == ["PENDING", "DISPATCHED", "TIMEOUT"]
    assert log[-1][1] == "no worker took it within 1s"


async def test_a_cap_client_submits_on_the_bus(
    late_cordum: App,
    late_channel: grpc.aio.Channel,
    cap_worker: CapWorker,
    cap_python: Path,
    nats_url: str,
    redis_url: str,
    tap: Tap,
) -> None:
    """§5.18: a CAP SDK client (cap.client.submit_job on sys.job.submit, its own context
    pointer) gets its job run and tracked like one submitted through our API."""
    assert late_cordum.redis is not None
    tag = uuid.uuid4().hex[:8]
    job_id, trace_id = f"cap-client-{tag}", f"cap-client-trace-{tag}"
    key = f"client-input:{tag}"
    data = {"from": "a CAP client"}
    await late_cordum.redis.set(key, json.dumps(data), ex=300)
    env = cap_env(
        nats_url,
        redis_url,
        TEST_JOB_ID=job_id,
        TEST_TOPIC=cap_worker.echo_topic,
        TEST_CONTEXT_PTR=f"redis://{key}",
        TEST_TRACE_ID=trace_id,
    )
    await run_cap(cap_python, CLIENT_SCRIPT, env=env)

    stub = jobs_stub(late_channel)

    async def job() -> v1_job_pb2.Job | None:
        try:
            return await stub.GetJob(J.GetJobRequest(job_id=job_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    done = await eventually(
        job,
        until=lambda j: j is not None and j.state == JS.JOB_STATE_SUCCEEDED,
        within=WAIT,
        what="the CAP client's job",
    )
    assert done is not None
    assert done.trace_id == trace_id
    assert done.worker_id == cap_worker.worker_id
    (dispatch,) = await tap.wait_for(dispatch_of(job_id), what="our dispatch of it")
    check_envelope(dispatch, trace_id=trace_id, sender_id=late_cordum.settings.sender_id)
    # The client's own pointer is passed through untouched.
    assert dispatch.packet.job_request.context_ptr == f"redis://{key}"
    assert dispatch.packet.job_request.priority == job_pb2.JOB_PRIORITY_BATCH
    assert await result_json(stub, job_id) == {"echo": data, "job_id": job_id}


async def test_a_stopped_worker_is_declared_lost(
    session_channel: grpc.aio.Channel, cap_worker: CapWorker
) -> None:
    """§5.10: ~3 missed 5 s heartbeats and the worker is lost (kept listed a while). Runs
    last: it stops the worker (by its PID) that every test above used."""
    assert cap_worker.process.returncode is None, cap_worker.log()  # it never crashed
    os.kill(cap_worker.process.pid, signal.SIGTERM)
    await asyncio.wait_for(cap_worker.process.wait(), 15)
    stub = status_service_pb2_grpc.StatusServiceStub(session_channel)

    async def listed() -> dict[str, Any]:
        reply = await stub.ListWorkers(status_service_pb2.ListWorkersRequest(include_lost=True))
        return {w.worker_id: w for w in reply.workers}

    workers = await eventually(
        listed,
        until=lambda ws: cap_worker.worker_id in ws and not ws[cap_worker.worker_id].live,
        within=30,
        interval=0.5,
        what="the stopped worker to be declared lost",
    )
    lost = workers[cap_worker.worker_id]
    assert time.time() - lost.last_heartbeat.ToMilliseconds() / 1000 >= 10
    live = [w.worker_id for w in await list_workers(session_channel)]
    assert cap_worker.worker_id not in live
