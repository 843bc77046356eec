"""Live event streams: StreamEvents over gRPC, the same as server-sent events through Envoy
(GET /api/v1/events) and the WebSocket /api/v1/stream through Envoy (browser-style key in
Sec-WebSocket-Protocol). Filters, tenant scoping on all three, slow and stalled clients."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
import nats
import pytest
import pytest_asyncio

from cordum.agent.v1 import heartbeat_pb2
from cordum.sdk import cap
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.v1 import event_service_pb2, event_service_pb2_grpc, job_pb2

from support.admin import field_violations
from support.auth import key_of, keyed_app, md, rpc
from support.cordum import start_envoy_for
from support.events import Collector, GrpcEvents, SseEvents, WsEvents, protocol_token
from support.jobs import make_worker
from support.waiting import eventually

J = "/cordum.v1.JobService/"
W = "/cordum.v1.WorkflowService/"
R = "/cordum.v1.RunService/"
QUEUE = 64
GRACE_S = 3.0


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    async with keyed_app(
        nats_url,
        redis_url,
        config_dir,
        event_stream_queue=QUEUE,
        event_stream_grace_s=GRACE_S,
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def rest(app: App, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    service, url = start_envoy_for(app, tmp_path_factory.mktemp("envoy-events"))
    try:
        yield url
    finally:
        service.stop()


@pytest_asyncio.fixture
async def worker(nats_url: str, redis_url: str, prefix: str) -> AsyncIterator[Worker]:
    """Serves job.t.ev.<prefix>: reports progress, then echoes."""
    w = make_worker(f"ev-{prefix}", nats_url, redis_url)

    @w.handler(f"job.t.ev.{prefix}")
    async def run(ctx: Any, data: Any) -> Any:
        await ctx.progress(50, "half way")
        return {"echo": data}

    async with w:
        yield w


async def submit(channel: grpc.aio.Channel, topic: str, key: str) -> str:
    job = await rpc(channel, J + "SubmitJob", {"prompt": "x", "topic": topic}, key=key)
    return str(job["job_id"])


def state_of(event: dict[str, Any]) -> str:
    return str(event["job_event"]["state"]).removeprefix("JOB_STATE_")


def is_state(job_id: str, *states: str) -> Any:
    return lambda e: e["kind"] == "job_state" and e["job_id"] == job_id and state_of(e) in states


async def closing(*streams: Collector) -> None:
    for stream in streams:
        await stream.close()


async def test_grpc_stream_shows_a_jobs_events_by_topic_and_kind(
    app: App, channel: grpc.aio.Channel, worker: Worker, prefix: str
) -> None:
    topic = f"job.t.ev.{prefix}"
    everything = await GrpcEvents(channel, "platform", topic=topic).start()
    results = GrpcEvents(channel, "acme-viewer", topic=f"{topic}*", kinds=["job_result"])
    await results.start()
    elsewhere = await GrpcEvents(channel, "platform", topic=f"job.t.else.{prefix}").start()
    try:
        job_id = await submit(channel, topic, "acme-operator")
        await everything.wait_for(is_state(job_id, "SUCCEEDED"), "the job's SUCCEEDED")
        await everything.wait_for(lambda e: e["kind"] == "job_result", "the worker's result")
        await everything.wait_for(lambda e: e["kind"] == "job_progress", "the progress")
        result = await results.wait_for(lambda e: e["job_id"] == job_id, "the result")

        seen = everything.events[1:]
        assert {e["job_id"] for e in seen} == {job_id}
        assert {e["topic"] for e in seen} == {topic}
        states = [state_of(e) for e in seen if e["kind"] == "job_state"]
        assert "DISPATCHED" in states and states[-1] == "SUCCEEDED", states
        progress = next(e for e in seen if e["kind"] == "job_progress")
        assert progress["packet"]["job_progress"]["message"] == "half way"
        assert progress["subject"] == cap.SUBJECT_PROGRESS
        assert result["packet"]["job_result"]["status"] == "JOB_STATUS_SUCCEEDED"
        assert {e["kind"] for e in results.events[1:]} == {"job_result"}

        # Barrier: a job on the other topic; `elsewhere` sees it, and nothing before it.
        other = await submit(channel, f"job.t.else.{prefix}", "acme-operator")
        await elsewhere.wait_for(lambda e: e["job_id"] == other, "the other job")
        assert all(e["job_id"] == other for e in elsewhere.events[1:]), elsewhere.events
    finally:
        await closing(everything, results, elsewhere)
    # Nobody listens any more: the bus subscriptions go away with the last stream.
    assert app.events is not None
    await eventually(now(lambda: not app.events.listening), what="idle unsubscribe")


def now(probe: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """A synchronous check as an `eventually` probe."""

    async def call() -> Any:
        return probe()

    return call


async def test_job_and_run_filters(channel: grpc.aio.Channel, worker: Worker, prefix: str) -> None:
    held = await submit(channel, f"job.t.approve.{prefix}", "acme-operator")
    await rpc(channel, J + "GetJob", {"job_id": held}, key="acme-viewer")
    by_job = await GrpcEvents(channel, "acme-viewer", job_id=held).start()

    wf = f"ev-wf-{prefix}"
    steps = {
        "gate": {"type": "approval"},
        "work": {"type": "job", "topic": f"job.t.ev.{prefix}", "depends_on": ["gate"]},
        "done": {"type": "notify", "depends_on": ["work"], "input": {"message": "all done"}},
    }
    await rpc(
        channel, W + "UpsertWorkflow", {"workflow": {"id": wf, "steps": steps}}, key="acme-admin"
    )
    run = await rpc(channel, R + "StartRun", {"workflow_id": wf}, key="acme-operator")
    run_id = run["run_id"]
    by_run = await GrpcEvents(channel, "acme-viewer", run_id=run_id).start()
    try:
        await rpc(channel, J + "CancelJob", {"job_id": held}, key="acme-operator")
        await by_job.wait_for(is_state(held, "CANCELLED"), "the held job's CANCELLED")
        assert {e["job_id"] for e in by_job.events[1:]} == {held}

        await rpc(
            channel,
            R + "ApproveStep",
            {"workflow_id": wf, "run_id": run_id, "step_id": "gate"},
            key="acme-operator",
        )
        await by_run.wait_for(
            lambda e: (
                e["kind"] == "run_event" and e["run_event"]["status"] == "RUN_STATUS_SUCCEEDED"
            ),
            "the run's end",
        )
        kinds = {e["kind"] for e in by_run.events}
        assert {"run_event", "job_state", "job_result", "alert"} <= kinds, kinds
        assert {e["run_id"] for e in by_run.events[1:]} == {run_id}
        step_job = next(e for e in by_run.events if e["kind"] == "job_state")
        assert step_job["job_id"].startswith(f"{run_id}:work@")
        assert step_job["topic"] == f"job.t.ev.{prefix}"
        alert = next(e for e in by_run.events if e["kind"] == "alert")
        assert alert["packet"]["alert"]["message"] == "all done"
    finally:
        await closing(by_job, by_run)


async def test_bad_filters_are_refused_naming_the_field(
    channel: grpc.aio.Channel, rest: str
) -> None:
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    bad = {"kinds": ["job_state", "nope"], "topic": "job.[", "job_id": "bad id\n!"}
    call = stub.StreamEvents(event_service_pb2.StreamEventsRequest(**bad), metadata=md("platform"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"kinds", "topic", "job_id"}

    async with httpx.AsyncClient(base_url=rest, timeout=15) as http:
        response = await http.get(
            "/api/v1/events", params={"kinds": "nope"}, headers={"x-api-key": key_of("platform")}
        )
    assert response.status_code == 400, response.text
    violations = response.json()["details"][1]["field_violations"]
    assert [v["field"] for v in violations] == ["kinds"]


async def test_sse_and_websocket_through_envoy(
    app: App, channel: grpc.aio.Channel, rest: str, worker: Worker, prefix: str
) -> None:
    topic = f"job.t.ev.{prefix}"
    sse = SseEvents(rest, "acme-viewer", topic=topic, kinds=["job_state", "job_result"])
    await sse.start()
    ws = await WsEvents(rest, "acme-viewer", topic=topic).start()
    try:
        assert sse.content_type.startswith("text/event-stream")
        assert ws.protocol == "cordum-api-key"
        job_id = await submit(channel, topic, "acme-operator")
        for stream in (sse, ws):
            await stream.wait_for(is_state(job_id, "SUCCEEDED"), "the job's SUCCEEDED")
            await stream.wait_for(lambda e: e["kind"] == "job_result", "the result")
        assert {e["kind"] for e in sse.events[1:]} == {"job_state", "job_result"}
        assert "job_progress" in {e["kind"] for e in ws.events}
        for stream in (sse, ws):
            assert {e["job_id"] for e in stream.events[1:]} == {job_id}
            assert stream.events[1]["received_at"], stream.events[1]
    finally:
        await closing(sse, ws)


async def test_websocket_auth(app: App, rest: str) -> None:
    # The key as one protocol `cordum-api-key.<key>`, answered whole; and in a header.
    token = f"cordum-api-key.{protocol_token(key_of('beta-viewer'))}"
    dotted = await WsEvents(rest, "beta-viewer", protocols=[token]).start()
    header = WsEvents(
        rest, "beta-viewer", protocols=[], headers={"x-api-key": key_of("beta-viewer")}
    )
    await header.start()
    assert dotted.protocol == token and header.protocol is None
    await closing(dotted, header)

    url = rest.replace("http://", "ws://") + "/api/v1/stream"
    refusals = {
        "wrong key": {"protocols": ("cordum-api-key", protocol_token("not-a-key-0123456789"))},
        "no key": {},
        "bad filter": {
            "protocols": ("cordum-api-key", protocol_token(key_of("beta-viewer"))),
            "params": {"kinds": "nope"},
        },
        "unknown parameter": {
            "headers": {"x-api-key": key_of("beta-viewer")},
            "params": {"color": "red"},
        },
        "foreign origin": {
            "headers": {"x-api-key": key_of("beta-viewer"), "Origin": "https://evil.example"},
        },
    }
    expected = {
        "wrong key": 401,
        "no key": 401,
        "bad filter": 400,
        "unknown parameter": 400,
        "foreign origin": 403,
    }
    async with aiohttp.ClientSession() as session:
        for name, kwargs in refusals.items():
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(url, **kwargs)  # type: ignore[arg-type]
            assert caught.value.status == expected[name], name
        # A plain GET (no upgrade) is refused too.
        async with session.get(url, headers={"x-api-key": key_of("beta-viewer")}) as response:
            assert response.status == 400
            assert "upgrade" in (await response.json())["message"].lower()


async def test_a_tenant_never_sees_another_tenants_events(
    app: App, channel: grpc.aio.Channel, rest: str, nats_url: str, prefix: str
) -> None:
    acme = [
        await GrpcEvents(channel, "acme-viewer").start(),
        await SseEvents(rest, "acme-viewer").start(),
        await WsEvents(rest, "acme-viewer").start(),
    ]
    everyone = await GrpcEvents(channel, "platform").start()
    nc = await nats.connect(nats_url)
    try:
        # beta's job runs its course, and a worker heartbeat (no tenant's) goes by ...
        beta_job = await submit(channel, f"job.t.deny.{prefix}", "beta-operator")
        await everyone.wait_for(is_state(beta_job, "DENIED"), "beta's job denied")
        heartbeat = cap.envelope(
            sender_id=f"hb-{prefix}",
            trace_id=f"hb-{prefix}",
            heartbeat=heartbeat_pb2.Heartbeat(
                worker_id=f"hb-{prefix}", pool="default", max_parallel_jobs=1
            ),
        )
        await nc.publish(cap.SUBJECT_HEARTBEAT, cap.encode(heartbeat))
        await everyone.wait_for(
            lambda e: (
                e["kind"] == "heartbeat" and e["packet"]["heartbeat"]["worker_id"] == f"hb-{prefix}"
            ),
            "the heartbeat",
        )
        # ... then acme's job; once acme's streams show it, they have had their chance at
        # beta's events (one pump, in bus order) and must not have shown any.
        acme_job = await submit(channel, f"job.t.deny.{prefix}", "acme-operator")
        for stream in acme:
            await stream.wait_for(is_state(acme_job, "DENIED"), "acme's job denied")
        for stream in acme:
            shown = {e["job_id"] for e in stream.events[1:]}
            assert shown == {acme_job}, (stream.name, stream.events)
            assert "heartbeat" not in {e["kind"] for e in stream.events}, stream.name
        assert everyone.about(beta_job) and everyone.about(acme_job)
    finally:
        await nc.close()
        await closing(*acme, everyone)


def _streams_held(app: App, transport: str) -> float:
    value = app.metrics_registry.get_sample_value("cordum_event_streams", {"transport": transport})
    return value or 0.0


def _ended(app: App, reason: str) -> float:
    value = app.metrics_registry.get_sample_value(
        "cordum_event_streams_ended_total", {"reason": reason}
    )
    return value or 0.0


async def _flood(nats_url: str, app: App, job_id: str, count: int, size: int = 0) -> None:
    """`count` state events for `job_id` (with `size` bytes of padding), as fast as NATS
    takes them."""
    nc = await nats.connect(nats_url)
    try:
        subject = app.subjects.job_event("job", "RUNNING")
        for i in range(count):
            event = job_pb2.JobEvent(
                job_id=job_id, state=job_pb2.JOB_STATE_RUNNING, message=f"flood {i}" + "." * size
            )
            await nc.publish(subject, event.SerializeToString())
        await nc.flush()
    finally:
        await nc.close()


# HTTP/2 flow control must not hide a slow reader: without BDP probing the client's window
# stays at 64 KiB instead of growing to hold the whole flood.
SLOW_CLIENT = [("grpc.http2.bdp_probe", 0)]


async def test_a_slow_client_is_dropped_without_slowing_anyone_else(
    app: App, channel: grpc.aio.Channel, nats_url: str, prefix: str
) -> None:
    flooded = await submit(channel, f"job.t.approve.{prefix}", "acme-operator")
    quiet = await submit(channel, f"job.t.approve.{prefix}", "acme-operator")
    before = _ended(app, "slow_consumer")
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{app.grpc_port}", options=SLOW_CLIENT
    ) as slow_channel:
        stub = event_service_pb2_grpc.EventServiceStub(slow_channel)
        slow = stub.StreamEvents(
            event_service_pb2.StreamEventsRequest(job_id=flooded), metadata=md("acme-viewer")
        )
        assert (await slow.read()).kind == "stream_start"
        witness = await GrpcEvents(channel, "acme-viewer", job_id=quiet).start()
        try:
            await _flood(nats_url, app, flooded, 3000)
            await eventually(now(lambda: _ended(app, "slow_consumer") > before), what="the drop")
            # The slow client reads now: what it was sent, in order, then the reason.
            received = []
            while (event := await slow.read()) is not grpc.aio.EOF:
                received.append(event)
            assert await slow.code() == grpc.StatusCode.OK
            end = received[-1]
            assert end.kind == "stream_end" and "too slow" in end.message, end
            flood = [e.job_event.message for e in received[:-1]]
            assert flood == [f"flood {i}" for i in range(len(flood))]
            assert QUEUE <= len(flood) < 3000

            # Everyone else was untouched: the witness is open and sees the next event.
            await _flood(nats_url, app, quiet, 1)
            await witness.wait_for(lambda e: e["job_id"] == quiet, "the witness's event")
            assert not witness.finished.is_set()
        finally:
            slow.cancel()
            await witness.close()


def small_socket(addr_info: Any) -> socket.socket:
    """A client socket with a tiny receive buffer: the server's writes block as soon as the
    client stops reading, instead of after megabytes of kernel buffers."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_a_websocket_client_that_stops_reading_is_cut(
    app: App, channel: grpc.aio.Channel, nats_url: str, prefix: str
) -> None:
    flooded = await submit(channel, f"job.t.approve.{prefix}", "acme-operator")
    held = _streams_held(app, "websocket")
    url = f"ws://127.0.0.1:{app.ws_port}/api/v1/stream?job_id={flooded}"
    connector = aiohttp.TCPConnector(socket_factory=small_socket)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.ws_connect(url, headers={"x-api-key": key_of("acme-viewer")}) as ws,
    ):
        assert (await ws.receive_json())["kind"] == "stream_start"
        assert _streams_held(app, "websocket") == held + 1
        # Events so big that the stream's queue alone (64 x 100 kB) is more than the server's
        # socket buffer (4 MiB at most) can take: whenever the stream overflows, its last
        # events cannot get out. This client never reads again.
        await _flood(nats_url, app, flooded, 150, size=100_000)
        await eventually(
            now(lambda: _streams_held(app, "websocket") == held),
            within=GRACE_S * 3 + 20,
            what="the stalled socket cut",
        )
        # Cut, not closed: what was in flight arrives, then the connection just ends.
        async with asyncio.timeout(30):
            while (msg := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
                assert json.loads(msg.data)["kind"] == "job_state"
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg


async def test_streams_end_with_a_reason_when_the_server_stops(
    nats_url: str, redis_url: str, config_dir: Path, tmp_path: Path
) -> None:
    async with keyed_app(nats_url, redis_url, config_dir) as stopping:
        service, url = start_envoy_for(stopping, tmp_path / "envoy")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{stopping.grpc_port}") as ch:
                grpc_events = await GrpcEvents(ch, "platform").start()
                ws = await WsEvents(url, "platform").start()
                await stopping.stop()
                for stream in (grpc_events, ws):
                    await eventually(now(stream.finished.is_set), what="the stream's end")
                    end = stream.events[-1]
                    assert end["kind"] == "stream_end", stream.events
                    assert end["message"] == "server shutting down"
                assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
        finally:
            service.stop()


def test_event_kinds_documented_in_the_proto_are_the_served_ones() -> None:
    from cordum.server.services.event_sources import KINDS

    text = (Path(__file__).resolve().parents[2] / "proto/cordum/v1/event.proto").read_text()
    for kind in KINDS:
        assert f"`{kind}`" in text, kind
