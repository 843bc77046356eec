"""Signed dispatches with a real, unmodified CAP 2.17 worker (``cap-sdk-python==2.17.0``).

The worker is a ``cap.runtime.Agent`` given our public key (``public_keys={our sender_id:
key}``: it then admits only packets signed by us) and a key of its own (``private_key``: it
signs its handshake, heartbeats and results). The control plane runs with
``bus_verify=require``, its own key, and the worker's public key in its key directory. A job
submitted through our API runs; a tampered copy of our signed dispatch is refused by the
worker (reference/cap-wire.md §5.16).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from cordum.sdk import cap
from cordum.server.app import App

from support.cap_venv import CapProcess, cap_env, cap_process, ensure_cap_python
from support.cordum import app_settings, running_app
from support.jobs import J, jobs, json_value, wait_state
from support.waiting import eventually

pytestmark = pytest.mark.slow

WAIT = 30.0

WORKER_SCRIPT = """\
import asyncio, os
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cap.runtime import Agent

private_key = serialization.load_pem_private_key(
    Path(os.environ["TEST_WORKER_KEY"]).read_bytes(), password=None
)
scheduler_key = serialization.load_pem_public_key(
    Path(os.environ["TEST_SCHEDULER_PUBLIC_KEY"]).read_bytes()
)
agent = Agent(
    sender_id=os.environ["TEST_WORKER_ID"],
    private_key=private_key,
    public_keys={os.environ["TEST_SCHEDULER_ID"]: scheduler_key},
    max_parallel=4,
)


@agent.job(os.environ["TEST_TOPIC"])
async def echo(ctx, data):
    return {"echo": data, "job_id": ctx.job_id}


asyncio.run(agent.run())
"""


@dataclass(frozen=True)
class Setup:
    app: App
    worker: CapProcess
    worker_id: str
    worker_key: cap.Signer
    ours: cap.Signer
    topic: str


@pytest_asyncio.fixture(scope="module")
async def setup(
    nats_url: str,
    redis_url: str,
    config_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Setup]:
    python = ensure_cap_python()
    base = tmp_path_factory.mktemp("signed-cap")
    tag = uuid.uuid4().hex[:8]
    worker_id, topic = f"cap-signed-{tag}", f"job.t.ok.cap-signed-{tag}"
    ours, worker_key = cap.Signer.generate(), cap.Signer.generate()
    (base / "cordum.pem").write_bytes(ours.private_pem())
    (base / "cordum.pub.pem").write_bytes(ours.public_pem())
    (base / "worker.pem").write_bytes(worker_key.private_pem())
    trusted = base / "trusted"
    trusted.mkdir()
    (trusted / f"{worker_id}.pem").write_bytes(worker_key.public_pem())

    settings = app_settings(
        nats_url,
        redis_url,
        config_dir,
        bus_verify="require",
        bus_private_key_file=base / "cordum.pem",
        bus_public_keys=trusted,
    )
    async with running_app(settings) as app:
        env = cap_env(
            nats_url,
            redis_url,
            TEST_WORKER_ID=worker_id,
            TEST_TOPIC=topic,
            TEST_WORKER_KEY=str(base / "worker.pem"),
            TEST_SCHEDULER_PUBLIC_KEY=str(base / "cordum.pub.pem"),
            TEST_SCHEDULER_ID=settings.sender_id,
        )
        async with cap_process(python, WORKER_SCRIPT, env=env, workdir=base) as worker:
            registry = app.registry
            assert registry is not None

            async def registered() -> list[str]:
                assert worker.process.returncode is None, worker.log()
                return [s.worker_id for s in registry.workers() if s.serves(topic)]

            # Its signed handshake and heartbeats pass our verification.
            await eventually(registered, within=60, what="the signed CAP worker registered")
            yield Setup(app, worker, worker_id, worker_key, ours, topic)


@pytest_asyncio.fixture(scope="module")
async def bus(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url, name="test-cap-signed")
    try:
        yield nc
    finally:
        await nc.drain()


@pytest_asyncio.fixture(scope="module")
async def channel(setup: Setup) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{setup.app.grpc_port}") as ch:
        yield ch


def refused(app: App) -> dict[tuple[str, str], float]:
    """Drops for anything but malformed bytes (none are expected from a CAP worker)."""
    return {
        (s.labels["subject_kind"], s.labels["reason"]): s.value
        for metric in app.metrics.bus_dropped.collect()
        for s in metric.samples
        if s.name == "cordum_bus_packets_dropped_total" and s.labels["reason"] != "malformed"
    }


async def test_the_worker_runs_our_signed_dispatch_and_refuses_a_tampered_copy(
    setup: Setup, bus: NatsClient, channel: grpc.aio.Channel
) -> None:
    app = setup.app
    seen: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(msg)

    for subject in (setup.topic, cap.direct_subject(setup.worker_id), cap.SUBJECT_RESULT):
        await bus.subscribe(subject, cb=on_msg)
    await bus.flush()

    def packets(payload: str, job_id: str) -> list[tuple[Msg, cap.BusPacket]]:
        out = []
        for msg in seen:
            packet = cap.BusPacket.FromString(msg.data)
            if packet.WhichOneof("payload") == payload and (
                getattr(packet, payload).job_id == job_id
            ):
                out.append((msg, packet))
        return out

    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(topic=setup.topic, input=json_value({"a": 1})))
    done = await wait_state(stub, reply.job_id, "SUCCEEDED", within=WAIT)
    assert done.worker_id == setup.worker_id

    # Our dispatch is signed with our key, the worker's result with its own.
    ((dispatch_msg, dispatch),) = packets("job_request", reply.job_id)
    cap.decode(dispatch_msg.data, cap.Verifier({app.settings.sender_id: setup.ours.public_pem()}))
    assert dispatch.signature
    ((result_msg, _),) = packets("job_result", reply.job_id)
    cap.decode(result_msg.data, cap.Verifier({setup.worker_id: setup.worker_key.public_pem()}))

    # A tampered copy: another job id under our signature, on the same subject.
    tampered_id = f"{reply.job_id}-tampered"
    tampered = cap.BusPacket()
    tampered.CopyFrom(dispatch)
    tampered.job_request.job_id = tampered_id
    await bus.publish(dispatch_msg.subject, tampered.SerializeToString(deterministic=True))
    await bus.flush()

    async def worker_log() -> str:
        return setup.worker.log()

    log = await eventually(
        worker_log,
        until=lambda text: "invalid signature" in text,
        within=WAIT,
        what="the worker to refuse the tampered dispatch",
    )
    # CAP names the sender whose signature failed: us.
    assert app.settings.sender_id in log.split("invalid signature", 1)[1].splitlines()[0]

    # The worker carries on: the next job runs, and the tampered one never did.
    again = await stub.SubmitJob(J.SubmitJobRequest(topic=setup.topic, input=json_value({"b": 2})))
    await wait_state(stub, again.job_id, "SUCCEEDED", within=WAIT)
    assert packets("job_result", again.job_id)
    assert not packets("job_result", tampered_id)
    assert app.redis is not None
    assert not await app.redis.exists(cap.result_key(tampered_id))
    # Nothing the worker sent us was refused.
    assert not refused(app), refused(app)
