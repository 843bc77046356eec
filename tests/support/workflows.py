"""Helpers for workflow tests: definitions from upstream-shaped JSON, starting and waiting for
runs, and workers that record what they saw (in-flight counts, inputs)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from cordum.sdk.worker import JobContext, Worker
from cordum.v1 import (
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from support.waiting import eventually

R = run_pb2
TERMINAL = {
    R.RUN_STATUS_SUCCEEDED,
    R.RUN_STATUS_FAILED,
    R.RUN_STATUS_CANCELLED,
    R.RUN_STATUS_TIMED_OUT,
}


def workflow(data: dict[str, Any]) -> workflow_pb2.Workflow:
    return json_format.ParseDict(data, workflow_pb2.Workflow())


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(data, struct_pb2.Struct())


def value(v: struct_pb2.Value) -> Any:
    return _ints(json_format.MessageToDict(v))


def _ints(x: Any) -> Any:
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, list):
        return [_ints(i) for i in x]
    if isinstance(x, dict):
        return {k: _ints(v) for k, v in x.items()}
    return x


def status(run: run_pb2.Run, step: str) -> str:
    return R.StepStatus.Name(run.steps[step].status).removeprefix("STEP_STATUS_")


def run_status(run: run_pb2.Run) -> str:
    return R.RunStatus.Name(run.status).removeprefix("RUN_STATUS_")


class Api:
    """The two services over one channel, with the calls tests repeat."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        self.runs = run_service_pb2_grpc.RunServiceStub(channel)

    async def upsert(self, data: dict[str, Any] | workflow_pb2.Workflow) -> workflow_pb2.Workflow:
        wf = data if isinstance(data, workflow_pb2.Workflow) else workflow(data)
        return await self.workflows.UpsertWorkflow(
            workflow_service_pb2.UpsertWorkflowRequest(workflow=wf)
        )

    async def start(
        self,
        workflow_id: str,
        run_input: dict[str, Any] | None = None,
        *,
        metadata: tuple[tuple[str, str], ...] = (),
        **fields: Any,
    ) -> run_service_pb2.StartRunResponse:
        req = run_service_pb2.StartRunRequest(workflow_id=workflow_id, **fields)
        if run_input is not None:
            req.input.CopyFrom(struct(run_input))
        return await self.runs.StartRun(req, metadata=metadata)

    async def get(self, run_id: str) -> run_pb2.Run:
        return await self.runs.GetRun(run_service_pb2.GetRunRequest(run_id=run_id))

    async def wait(
        self,
        run_id: str,
        until: Callable[[run_pb2.Run], bool] = lambda r: r.status in TERMINAL,
        *,
        within: float = 20.0,
        what: str = "the run to finish",
    ) -> run_pb2.Run:
        async def probe() -> run_pb2.Run:
            return await self.get(run_id)

        return await eventually(probe, until=until, within=within, what=what, interval=0.03)

    async def wait_step(
        self, run_id: str, step: str, wanted: str, *, within: float = 20.0
    ) -> run_pb2.Run:
        return await self.wait(
            run_id,
            lambda r: step in r.steps and status(r, step) == wanted,
            within=within,
            what=f"step {step} to be {wanted}",
        )

    async def timeline(self, run_id: str) -> list[run_pb2.RunEvent]:
        events: list[run_pb2.RunEvent] = []
        token = ""
        while True:
            page = await self.runs.GetRunTimeline(
                run_service_pb2.GetRunTimelineRequest(run_id=run_id, page_token=token)
            )
            events.extend(page.events)
            token = page.next_page_token
            if not token:
                return events

    async def cancel(self, *run_ids: str) -> None:
        """Cancel runs a test leaves waiting (so the session's reconciler stops scanning them)."""
        for run_id in run_ids:
            await self.runs.CancelRun(run_service_pb2.CancelRunRequest(run_id=run_id))

    async def event_types(self, run_id: str) -> list[str]:
        return [e.type for e in await self.timeline(run_id)]


@dataclass
class Recorder:
    """What a test worker saw: inputs by job id, in-flight count and its maximum."""

    inputs: dict[str, Any] = field(default_factory=dict)
    contexts: dict[str, JobContext] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    started: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self, ctx: JobContext, data: Any) -> None:
        self.inputs[ctx.job_id] = data
        self.contexts[ctx.job_id] = ctx
        self.started.append(ctx.job_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.changed.set()

    def leave(self) -> None:
        self.in_flight -= 1
        self.changed.set()


Handler = Callable[[JobContext, Any], Awaitable[Any]]


def recording(recorder: Recorder, handler: Handler) -> Handler:
    async def wrapped(ctx: JobContext, data: Any) -> Any:
        recorder.enter(ctx, data)
        try:
            return await handler(ctx, data)
        finally:
            recorder.leave()

    return wrapped


def make_worker(
    nats_url: str,
    redis_url: str,
    worker_id: str,
    handlers: dict[str, Handler],
    *,
    max_parallel: int = 16,
) -> Worker:
    worker = Worker(
        worker_id=worker_id,
        nats_url=nats_url,
        redis_url=redis_url,
        heartbeat_interval=0.2,
        max_parallel=max_parallel,
    )
    for topic, handler in handlers.items():
        worker.add_handler(topic, handler)
    return worker
