"""Signed bus packets with ``bus_verify=require``, through real NATS into a running App.

The App has its own key (a PEM file) and trusts two senders from a key directory: a CAP
client that submits on the bus and a worker. Everything the App publishes is signed and
everything it receives must be signed by a known sender (or by itself), else it is dropped
and counted; the job path and a workflow still run end to end.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.server.services.job_events import job_event
from cordum.server.workflows.engine import advance_subject

from support.cordum import app_settings, running_app
from support.jobs import J, jobs, json_value, make_worker, wait_state
from support.waiting import eventually
from support.workflows import Api, run_status, value

CLIENT = "signed-client"


@dataclass(frozen=True)
class Keys:
    ours: cap.Signer
    client: cap.Signer
    worker: cap.Signer
    worker_id: str
    directory: Path
    private_key_file: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    base = tmp_path_factory.mktemp("bus-keys")
    ours, client, worker = cap.Signer.generate(), cap.Signer.generate(), cap.Signer.generate()
    worker_id = f"signed-worker-{uuid.uuid4().hex[:8]}"
    private = base / "cordum.pem"
    private.write_bytes(ours.private_pem())
    trusted = base / "trusted"
    trusted.mkdir()
    (trusted / f"{CLIENT}.pem").write_bytes(client.public_pem())
    (trusted / f"{worker_id}.pem").write_bytes(worker.public_pem())
    return Keys(ours, client, worker, worker_id, trusted, private)


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, config_dir: Path, keys: Keys) -> AsyncIterator[App]:
    settings = app_settings(
        nats_url,
        redis_url,
        config_dir,
        bus_verify="require",
        bus_private_key_file=keys.private_key_file,
        bus_public_keys=keys.directory,
    )
    async with running_app(settings) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def worker(nats_url: str, redis_url: str, app: App, keys: Keys) -> AsyncIterator[Worker]:
    """Signs what it sends; accepts only dispatches signed with the App's key."""
    w = make_worker(
        keys.worker_id,
        nats_url,
        redis_url,
        signer=keys.worker,
        verifier=cap.Verifier({app.settings.sender_id: keys.ours.public_pem()}),
    )

    @w.handler(f"job.t.ok.signed-{keys.worker_id}")
    async def echo(ctx, data):  # type: ignore[no-untyped-def]
        return {"echo": data, "job_id": ctx.job_id}

    async with w:
        assert app.registry is not None
        registry = app.registry

        async def listed() -> list[str]:
            return [s.worker_id for s in registry.workers()]

        await eventually(listed, until=lambda ids: keys.worker_id in ids, within=20)
        yield w


@pytest_asyncio.fixture(scope="module")
async def bus(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url, name="test-bus-signing")
    try:
        yield nc
    finally:
        await nc.drain()


@pytest_asyncio.fixture(scope="module")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


def drops(app: App) -> dict[tuple[str, str], float]:
    return {
        (s.labels["subject_kind"], s.labels["reason"]): s.value
        for metric in app.metrics.bus_dropped.collect()
        for s in metric.samples
        if s.name == "cordum_bus_packets_dropped_total"
    }


async def wait_drops(app: App, wanted: dict[tuple[str, str], float]) -> dict[Any, float]:
    """Wait until each (kind, reason) counter reached its wanted value; return them all."""

    async def counted() -> dict[tuple[str, str], float]:
        return drops(app)

    return await eventually(
        counted,
        until=lambda d: all(d.get(k, 0) >= v for k, v in wanted.items()),
        within=20,
        what=f"drops {wanted}",
    )


def submit(job_id: str, topic: str, sender: str = CLIENT) -> cap.BusPacket:
    request = agent.JobRequest(
        job_id=job_id, topic=topic, priority=1, context_ptr=f"redis://ctx:{job_id}"
    )
    return cap.envelope(sender_id=sender, trace_id=f"trace-{job_id}", job_request=request)


async def test_a_job_runs_end_to_end_and_every_packet_we_send_is_signed(
    app: App, worker: Worker, bus: NatsClient, channel: grpc.aio.Channel, keys: Keys
) -> None:
    topic = worker.topics[0]
    dispatches: list[Msg] = []

    async def on_dispatch(msg: Msg) -> None:
        dispatches.append(msg)

    sub = await bus.subscribe(topic, cb=on_dispatch)
    await bus.subscribe(cap.direct_subject(worker.worker_id), cb=on_dispatch)
    await bus.flush()
    stub = jobs(channel)
    reply = await stub.SubmitJob(J.SubmitJobRequest(topic=topic, input=json_value({"n": 7})))
    await wait_state(stub, reply.job_id, "SUCCEEDED", within=20)
    await sub.unsubscribe()

    # What a CAP worker given our public key checks: field 14 over the canonical bytes.
    ours = cap.Verifier({app.settings.sender_id: keys.ours.public_pem()})
    (dispatch,) = [m for m in dispatches if cap.decode(m.data).job_request.job_id == reply.job_id]
    packet = cap.decode(dispatch.data, ours)
    assert packet.sender_id == app.settings.sender_id and packet.signature
    # Nothing of ours (worker packets, job events, our own submits) was refused.
    assert not {k: v for k, v in drops(app).items() if k[1] != "malformed"}


async def test_a_workflow_runs_on_signed_submits_and_job_events(
    app: App, worker: Worker, channel: grpc.aio.Channel
) -> None:
    """The engine's step submits (sender `workflow-engine`, our key) and the job events it
    advances on (signed in headers) are accepted."""
    api = Api(channel)
    topic = worker.topics[0]
    wf = await api.upsert(
        {
            "id": f"signed-{uuid.uuid4().hex[:8]}",
            "steps": {
                "a": {"type": "worker", "topic": topic, "input": {"x": "${input.x}"}},
                "b": {
                    "type": "worker",
                    "topic": topic,
                    "depends_on": ["a"],
                    "input": {"y": "${steps.a.output.echo.x}"},
                },
            },
        }
    )
    started = await api.start(wf.id, {"x": 5})
    run = await api.wait(started.run_id, within=30)
    assert run_status(run) == "SUCCEEDED"
    assert value(run.steps["b"].output)["echo"] == {"y": 5}
    assert not {k: v for k, v in drops(app).items() if k[1] != "malformed"}


async def test_bus_submits_need_a_valid_signature_from_a_known_sender(
    app: App, worker: Worker, bus: NatsClient, channel: grpc.aio.Channel, keys: Keys
) -> None:
    topic = worker.topics[0]
    tag = uuid.uuid4().hex[:8]
    before = drops(app)
    unsigned = submit(f"unsigned-{tag}", topic)
    tampered = cap.BusPacket.FromString(
        cap.encode(submit(f"tampered-{tag}", topic), signer=keys.client)
    )
    tampered.job_request.topic = "job.t.ok.elsewhere"
    stranger = submit(f"stranger-{tag}", topic, sender="stranger")
    refused = {
        "unsigned": cap.encode(unsigned),
        "bad_signature": tampered.SerializeToString(deterministic=True),
        "unknown_sender": cap.encode(stranger, signer=cap.Signer.generate()),
    }
    for data in refused.values():
        await bus.publish(app.subjects.submit, data)
    # Published last on the same subject: once it ran, the others were handled before it.
    signed = submit(f"signed-{tag}", topic)
    assert app.redis is not None
    await app.redis.set(cap.context_key(f"signed-{tag}"), '{"via": "bus"}', ex=300)
    await bus.publish(app.subjects.submit, cap.encode(signed, signer=keys.client))

    stub = jobs(channel)
    await wait_state(stub, f"signed-{tag}", "SUCCEEDED", within=20)
    counted = await wait_drops(
        app, {("submit", r): before.get(("submit", r), 0) + 1 for r in refused}
    )
    for reason in refused:
        assert counted[("submit", reason)] == before.get(("submit", reason), 0) + 1
    for job_id in (f"unsigned-{tag}", f"tampered-{tag}", f"stranger-{tag}"):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetJob(J.GetJobRequest(job_id=job_id))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_unsigned_worker_is_never_registered(
    app: App, nats_url: str, redis_url: str
) -> None:
    before = drops(app)
    unsigned = make_worker(f"unsigned-worker-{uuid.uuid4().hex[:8]}", nats_url, redis_url)
    unsigned.add_handler("job.t.ok.unsigned", _echo)
    async with unsigned:
        await wait_drops(
            app,
            {
                ("handshake", "unsigned"): before.get(("handshake", "unsigned"), 0) + 1,
                ("heartbeat", "unsigned"): before.get(("heartbeat", "unsigned"), 0) + 2,
            },
        )
        assert app.registry is not None
        assert unsigned.worker_id not in {s.worker_id for s in app.registry.workers()}


async def test_our_own_messages_need_our_signature(app: App, bus: NatsClient, keys: Keys) -> None:
    """Job events and run advances carry the signature in headers; unsigned or foreign ones
    are dropped by every subscription that receives them."""
    before = drops(app)
    forged_id = f"wf-forged-{uuid.uuid4().hex[:8]}"
    event = job_event(forged_id, "SUCCEEDED", "forged")
    trust_headers = app.inbound.trust.headers(event)
    assert trust_headers is not None
    # Signed by us: accepted (and harmless: no such job); then the forgeries.
    await bus.publish(app.subjects.job_events, event, headers=trust_headers)
    await bus.publish(app.subjects.job_events, event)
    # A known sender's name on bytes the signature is not for.
    foreign = dict(trust_headers, **{"Cordum-Sender": CLIENT})
    other = job_event(forged_id, "FAILED", "forged")
    await bus.publish(app.subjects.job_events, other, headers=foreign)
    await bus.publish(advance_subject(app.subjects), b"run-forged")
    # The job event hub and the workflow engine both receive the bare subject.
    wanted = {
        ("job_event", "unsigned"): before.get(("job_event", "unsigned"), 0) + 2,
        ("job_event", "bad_signature"): before.get(("job_event", "bad_signature"), 0) + 2,
        ("run_advance", "unsigned"): before.get(("run_advance", "unsigned"), 0) + 1,
    }
    counted = await wait_drops(app, wanted)
    # The signed event came first on the same subject, and was not among the drops.
    for key, value_ in wanted.items():
        assert counted[key] == value_, key


async def _echo(ctx: Any, data: Any) -> Any:
    return data
