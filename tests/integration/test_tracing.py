"""OpenTelemetry tracing: one job is one connected trace, from the API call through the
gateway, the scheduler (over NATS), a remote safety kernel (over gRPC), the worker (over NATS)
and back to the scheduler's handling of its result, collected by an in-process OTLP collector.
The trace context travels in NATS headers; the CAP bytes carry none of it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from cordum.sdk import cap
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.v1 import job_service_pb2

from support.admin import own_app
from support.jobs import jobs
from support.otlp import ReceivedSpan, otlp_collector
from support.waiting import eventually

J = job_service_pb2


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    named: dict[str, ReceivedSpan] = {}
    for span in spans:
        assert span.name not in named, f"two {span.name} spans in one job's trace"
        named[span.name] = span
    return named


@asynccontextmanager
async def raw_copies(nats_url: str, subjects: list[str]) -> AsyncIterator[list[Msg]]:
    """Every message on `subjects`, seen by a plain subscriber (workers use queue groups)."""
    seen: list[Msg] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg)

    nc = NATS()
    await nc.connect(nats_url)
    try:
        for subject in subjects:
            await nc.subscribe(subject, cb=keep)
        await nc.flush()
        yield seen
    finally:
        await nc.close()


async def test_one_job_is_one_connected_trace_from_the_api_call_to_its_result(
    nats_url: str, redis_url: str, config_dir: Path, prefix: str
) -> None:
    topic, worker_id = f"job.t.ok.{prefix}", f"traced-{prefix}"
    namespace = f"tr{uuid.uuid4().hex[:8]}."
    async with otlp_collector() as (collector, endpoint), AsyncExitStack() as stack:

        async def role(*roles: str, **extra: Any) -> App:
            return await stack.enter_async_context(
                own_app(
                    nats_url,
                    redis_url,
                    config_dir,
                    roles=list(roles),
                    namespace=namespace,
                    otel_endpoint=endpoint,
                    **extra,
                )
            )

        safety = await role("safety")
        remote = {"safety_addr": f"127.0.0.1:{safety.grpc_port}"}
        scheduler = await role("scheduler", **remote)
        gateway = await role("gateway", **remote)
        assert gateway.tracing.enabled and scheduler.tracing.enabled

        # The worker exports through a provider of its own (BatchSpanProcessor: its export
        # runs on a thread, never blocking the loop that serves the collector).
        provider = TracerProvider(resource=Resource.create({"service.name": "test-worker"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        worker = Worker(
            worker_id=worker_id,
            nats_url=nats_url,
            redis_url=redis_url,
            heartbeat_interval=0.2,
            tracer_provider=provider,
        )

        @worker.handler(topic)
        async def echo(ctx: Any, data: Any) -> Any:
            return {"echo": data}

        try:
            async with (
                raw_copies(nats_url, [topic, cap.direct_subject(worker_id)]) as dispatched,
                worker,
                grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
            ):
                reply = await jobs(channel).SubmitJobAndWait(
                    J.SubmitJobAndWaitRequest(
                        job=J.SubmitJobRequest(topic=topic, prompt="hi"), timeout_ms=20_000
                    )
                )
                assert reply.done
            job_id, cap_trace_id = reply.job.id, reply.job.trace_id

            async def flushed() -> list[ReceivedSpan]:
                for app in (gateway, scheduler, safety):
                    await app.tracing.force_flush()
                await asyncio.to_thread(provider.force_flush)
                handled = [
                    s
                    for s in collector.spans
                    if s.name == "cordum.job.handle" and s.attribute("cordum.job_id") == job_id
                ]
                if not handled:
                    return []
                return collector.trace(handled[0].trace_id)

            spans = await eventually(
                flushed,
                until=lambda found: len(found) >= 6,
                within=30,
                interval=0.2,
                what="the job's six spans",
            )
        finally:
            await asyncio.to_thread(provider.shutdown)

    named = by_name(spans)
    api = named["cordum.v1.JobService/SubmitJobAndWait"]
    check = named["cordum.safety.check"]
    kernel = named["cordum.agent.v1.SafetyKernel/Check"]
    dispatch = named["cordum.job.dispatch"]
    handle = named["cordum.job.handle"]
    result = named["cordum.job.result"]

    # One trace, rooted at the API call, each hop the child of the one that caused it.
    assert len({s.trace_id for s in spans}) == 1
    assert api.parent_id == "" and api.span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert check.parent_id == api.span_id
    assert kernel.parent_id == check.span_id
    assert dispatch.parent_id == api.span_id
    assert handle.parent_id == dispatch.span_id
    assert result.parent_id == handle.span_id
    # Each process reports as itself.
    assert (api.service, check.service, kernel.service) == (
        "cordum-gateway",
        "cordum-scheduler",
        "cordum-safety",
    )
    assert (dispatch.service, handle.service, result.service) == (
        "cordum-scheduler",
        "test-worker",
        "cordum-scheduler",
    )
    # The CAP trace id and the job ride along as attributes.
    for span in (check, dispatch, handle, result):
        assert span.attribute("cordum.trace_id") == cap_trace_id
        assert span.attribute("cordum.job_id") == job_id
    assert result.attribute("cordum.job.state") == "SUCCEEDED"
    assert api.attribute("rpc.grpc.status_code") == 0

    # On the bus: the context in the headers, the CAP packet as ever.
    assert len(dispatched) == 1
    msg = dispatched[0]
    assert msg.headers is not None
    assert msg.headers["traceparent"].split("-")[1:3] == [dispatch.trace_id, dispatch.span_id]
    packet = cap.decode(msg.data)
    assert packet.job_request.job_id == job_id and packet.trace_id == cap_trace_id
    assert b"traceparent" not in msg.data


async def test_without_an_endpoint_nothing_is_traced_and_no_header_is_sent(
    cordum: App, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    assert not cordum.tracing.enabled
    topic, worker_id = f"job.t.ok.{prefix}", f"untraced-{prefix}"
    worker = Worker(
        worker_id=worker_id, nats_url=nats_url, redis_url=redis_url, heartbeat_interval=0.2
    )

    @worker.handler(topic)
    async def echo(ctx: Any, data: Any) -> Any:
        return data

    subjects = [topic, cap.direct_subject(worker_id), cap.SUBJECT_RESULT]
    async with raw_copies(nats_url, subjects) as seen, worker:
        reply = await jobs(channel).SubmitJobAndWait(
            J.SubmitJobAndWaitRequest(
                job=J.SubmitJobRequest(topic=topic, prompt="hi"), timeout_ms=20_000
            )
        )
        assert reply.done
    mine = [m for m in seen if reply.job.id.encode() in m.data]
    assert {m.subject for m in mine} >= {cap.SUBJECT_RESULT}
    assert len(mine) == 2  # the dispatch and the result
    # No OTel SDK configured globally: the worker sends no context either.
    assert all(not m.headers for m in mine)
