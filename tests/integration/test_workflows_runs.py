"""Definitions and runs through the gRPC API: CRUD, validation, start (idempotency, input
schema), dry run, cancel, rerun, list, timeline, watch and delete."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cordum.sdk.worker import JobContext
from cordum.server.app import App
from cordum.v1 import (
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    workflow_service_pb2,
)

from support.waiting import eventually
from support.workflows import (
    Api,
    Recorder,
    make_worker,
    recording,
    run_status,
    status,
    struct,
    value,
    workflow,
)

RS = run_service_pb2
WS = workflow_service_pb2


@pytest.fixture
def api(channel: grpc.aio.Channel) -> Api:
    return Api(channel)


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status_ = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status_ is not None
    out: dict[str, str] = {}
    for detail in status_.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def reason(error: grpc.aio.AioRpcError) -> str:
    status_ = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status_ is not None
    for detail in status_.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def echo(ctx: JobContext, data: Any) -> Any:
    return {"echo": data}


async def test_workflow_crud_upserts_lists_and_deletes(api: Api, prefix: str) -> None:
    first = await api.upsert(
        {
            "id": f"crud-{prefix}",
            "name": "First",
            "description": "kept",
            "config": {"owner": "ops"},
            "parameters": [{"name": "n", "type": "int"}],
            "steps": {"a": {"type": "notify"}},
        }
    )
    assert first.revision == 1 and first.org_id == "default"
    assert first.steps["a"].id == "a"
    # Upstream's upsert: empty fields keep the stored value, steps are replaced.
    second = await api.upsert(
        {"id": f"crud-{prefix}", "name": "Second", "steps": {"b": {"type": "notify"}}}
    )
    assert second.revision == 2
    assert (second.name, second.description) == ("Second", "kept")
    assert list(second.steps) == ["b"]
    assert second.created_at == first.created_at
    got = await api.workflows.GetWorkflow(WS.GetWorkflowRequest(workflow_id=second.id))
    assert got == second
    for n in range(3):
        await api.upsert({"id": f"crud-{prefix}-{n}", "steps": {"a": {"type": "notify"}}})
    seen: list[str] = []
    token = ""
    while True:
        page = await api.workflows.ListWorkflows(
            WS.ListWorkflowsRequest(page_size=2, page_token=token)
        )
        seen += [w.id for w in page.workflows]
        token = page.next_page_token
        if not token:
            break
    mine = [w for w in seen if w.startswith(f"crud-{prefix}")]
    assert sorted(mine) == sorted([second.id] + [f"crud-{prefix}-{n}" for n in range(3)])
    assert len(seen) == len(set(seen))
    await api.workflows.DeleteWorkflow(WS.DeleteWorkflowRequest(workflow_id=second.id))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.workflows.GetWorkflow(WS.GetWorkflowRequest(workflow_id=second.id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(info.value) == "WORKFLOW_NOT_FOUND"


async def test_an_invalid_definition_is_refused_with_every_problem_and_not_stored(
    cordum: App, api: Api, prefix: str
) -> None:
    bad = {
        "id": f"bad-{prefix}",
        "steps": {
            "fetch": {"topic": "job.x", "depends_on": ["nowhere"]},
            "a": {"topic": "job.x", "depends_on": ["b"]},
            "b": {"topic": "job.x", "depends_on": ["a"]},
            "odd": {"type": "teleport"},
            "t": {"topic": "job.x", "input": {"v": "${input.x"}, "input_schema": {"type": 1}},
            "c": {"type": "condition", "condition": "input.n >"},
        },
    }
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.upsert(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(info.value) == "WORKFLOW_INVALID"
    found = violations(info.value)
    assert set(found) == {
        "steps.fetch.depends_on[0]",
        "steps.a.depends_on",
        "steps.odd.type",
        "steps.t.input.v",
        "steps.t.input_schema",
        "steps.c.condition",
    }
    assert "cycle: a → b → a" in found["steps.a.depends_on"]
    assert cordum.redis is not None
    assert not await cordum.redis.keys(f"*{prefix}*")
    checked = await api.workflows.ValidateWorkflow(
        WS.ValidateWorkflowRequest(workflow=workflow(bad))
    )
    assert not checked.valid
    assert {p.field for p in checked.problems} == set(found)


async def test_run_input_is_checked_against_the_input_schema(api: Api, prefix: str) -> None:
    wf = await api.upsert(
        {
            "id": f"schema-{prefix}",
            "input_schema": {
                "type": "object",
                "required": ["email"],
                "properties": {"email": {"type": "string"}, "n": {"type": "integer"}},
            },
            "steps": {"a": {"type": "notify"}},
        }
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.start(wf.id, {"n": "three"})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(info.value) == "SCHEMA_VALIDATION_FAILED"
    assert set(violations(info.value)) == {"input", "input.n"}
    runs = await api.runs.ListRuns(RS.ListRunsRequest(workflow_id=wf.id))
    assert list(runs.runs) == []
    ok = await api.start(wf.id, {"email": "a@b.c", "n": 3})
    assert run_status(await api.wait(ok.run_id)) == "SUCCEEDED"


async def test_step_input_and_output_schemas_are_enforced(
    cordum: App, api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.io"
    assert cordum.redis is not None
    await cordum.redis.set(
        f"{cordum.settings.namespace}schema:{prefix}/Out",
        json.dumps({"type": "object", "required": ["answer"]}),
    )
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: echo}):
        wf = await api.upsert(
            {
                "id": f"io-{prefix}",
                "steps": {
                    "in_bad": {
                        "topic": topic,
                        "input": {"n": "${input.n}"},
                        "input_schema": {"properties": {"n": {"type": "string"}}},
                    },
                },
            }
        )
        failed = await api.wait((await api.start(wf.id, {"n": 1})).run_id)
        out = await api.upsert(
            {
                "id": f"io2-{prefix}",
                "steps": {"out_bad": {"topic": topic, "output_schema_id": f"{prefix}/Out"}},
            }
        )
        bad_output = await api.wait((await api.start(out.id, {"x": 1})).run_id)
    assert status(failed, "in_bad") == "FAILED"
    assert failed.steps["in_bad"].error.code == "INPUT_INVALID"
    assert "input.n: 1 is not of type 'string'" in failed.steps["in_bad"].error.message
    assert status(bad_output, "out_bad") == "FAILED"
    assert "'answer' is a required property" in bad_output.steps["out_bad"].error.message
    assert "step_output_invalid" in await api.event_types(bad_output.id)


async def test_the_upstream_example_definition_loads_and_runs(
    cordum: App, api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    assert cordum.redis is not None
    await cordum.redis.set(
        f"{cordum.settings.namespace}schema:hello-pack/EchoInput",
        json.dumps({"type": "object", "required": ["message", "author"]}),
    )
    upstream = {
        "id": f"hello-pack.echo-{prefix}",
        "org_id": "default",
        "steps": {
            "echo": {
                "type": "worker",
                "topic": f"job.hello-pack.echo-{prefix}",
                "input_schema_id": "hello-pack/EchoInput",
                "input": {"message": "${input.message}", "author": "${input.author}"},
                "meta": {"pack_id": "hello-pack", "capability": "hello-pack.echo"},
            }
        },
    }
    topic = f"job.hello-pack.echo-{prefix}"
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: echo}):
        wf = await api.upsert(upstream)
        run = await api.wait((await api.start(wf.id, {"message": "hi", "author": "me"})).run_id)
    assert run_status(run) == "SUCCEEDED"
    assert value(run.steps["echo"].output) == {"echo": {"message": "hi", "author": "me"}}


async def test_idempotent_start_replays_the_first_run(api: Api, prefix: str) -> None:
    wf = await api.upsert({"id": f"idem-{prefix}", "steps": {"a": {"type": "notify"}}})
    key = (("idempotency-key", f"key-{prefix}"),)
    first = await api.start(wf.id, {"n": 1}, metadata=key)
    again = await api.start(wf.id, {"n": 1}, metadata=key)
    assert not first.idempotent_replay and again.idempotent_replay
    assert again.run_id == first.run_id
    body = await api.start(wf.id, {"n": 1}, idempotency_key=f"key-{prefix}")
    assert body.run_id == first.run_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.start(wf.id, {"n": 2}, metadata=key)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason(info.value) == "IDEMPOTENCY_KEY_REUSED"
    other = await api.upsert({"id": f"idem2-{prefix}", "steps": {"a": {"type": "notify"}}})
    elsewhere = await api.start(other.id, {"n": 1}, metadata=key)
    assert elsewhere.run_id != first.run_id  # keys are scoped per tenant and workflow
    # Concurrent starts with one key make one run.
    racing = await asyncio.gather(
        *(api.start(wf.id, {"n": 9}, idempotency_key=f"race-{prefix}") for _ in range(10))
    )
    assert len({r.run_id for r in racing}) == 1
    assert sum(not r.idempotent_replay for r in racing) == 1


async def test_a_dry_run_resolves_and_records_without_dispatching(
    api: Api, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.dry"
    seen = Recorder()
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, echo)}):
        wf = await api.upsert(
            {
                "id": f"dry-{prefix}",
                "steps": {
                    "a": {"topic": topic, "input": {"to": "${input.user}"}},
                    "fan": {"topic": topic, "for_each": "input.items", "input": {"x": "${item}"}},
                    "ok": {"type": "approval", "depends_on": ["a"]},
                    "wait": {"type": "delay", "delay_sec": 3600},
                    "tell": {"type": "notify", "input": {"message": "to ${input.user}"}},
                },
            }
        )
        started = await api.start(wf.id, {"user": "ann", "items": [1, 2]}, dry_run=True)
        run = await api.wait(started.run_id, within=5)
    assert run.dry_run
    assert run_status(run) == "SUCCEEDED"
    assert value(run.steps["a"].input) == {"to": "ann"}
    assert [value(run.steps[f"fan[{i}]"].input) for i in (0, 1)] == [{"x": 1}, {"x": 2}]
    assert value(run.steps["tell"].input) == {"message": "to ann"}
    assert run.steps["a"].job_id == "" and seen.started == []
    types = await api.event_types(run.id)
    assert types.count("step_dry_run") == 3
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError):
        await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=f"{run.id}:a@1"))


async def test_cancel_mid_run_cancels_the_jobs_in_flight(
    api: Api, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.cancel"
    seen = Recorder()
    stopped: list[str] = []

    async def forever(ctx: JobContext, data: Any) -> Any:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(ctx.job_id)
            raise

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, forever)}):
        wf = await api.upsert(
            {
                "id": f"cancel-{prefix}",
                "steps": {
                    "a": {"topic": topic},
                    "b": {"topic": topic, "depends_on": ["a"]},
                    "w": {"type": "approval"},
                },
            }
        )
        started = await api.start(wf.id)
        await eventually(lambda: _true(seen.in_flight == 1), what="the job to start")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await api.runs.CancelRun(RS.CancelRunRequest(run_id=started.run_id, workflow_id="x"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        cancelled = await api.runs.CancelRun(
            RS.CancelRunRequest(run_id=started.run_id, workflow_id=wf.id, reason="enough")
        )
        await eventually(lambda: _true(bool(stopped)), what="the worker to stop the job")
    assert run_status(cancelled) == "CANCELLED"
    assert [status(cancelled, s) for s in ("a", "b", "w")] == ["CANCELLED"] * 3
    assert cancelled.error.message == "enough"
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    job = await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=f"{started.run_id}:a@1"))
    assert job.state == job_pb2.JOB_STATE_CANCELLED
    assert stopped == [f"{started.run_id}:a@1"]


async def _true(value_: bool) -> bool:
    return value_


async def test_rerun_from_a_step_copies_what_is_not_downstream(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.rerun"
    seen = Recorder()
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, echo)}):
        wf = await api.upsert(
            {
                "id": f"rerun-{prefix}",
                "steps": {
                    "a": {"topic": topic, "input": {"s": "a"}, "output_path": "first"},
                    "b": {"topic": topic, "depends_on": ["a"], "input": {"s": "b"}},
                    "c": {"topic": topic, "depends_on": ["b"], "input": {"s": "c"}},
                    "side": {"topic": topic, "input": {"s": "side"}},
                },
            }
        )
        old = await api.wait((await api.start(wf.id, {"k": 1})).run_id)
        assert len(seen.started) == 4
        rerun = await api.runs.RerunRun(RS.RerunRunRequest(run_id=old.id, from_step="b"))
        new = await api.wait(rerun.run_id)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await api.runs.RerunRun(RS.RerunRunRequest(run_id=old.id, from_step="nope"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert run_status(new) == "SUCCEEDED"
    assert (new.rerun_of, new.rerun_step) == (old.id, "b")
    reran = sorted(j.split(":")[1] for j in seen.started[4:])
    assert reran == ["b@1", "c@1"]
    assert new.steps["a"].job_id == old.steps["a"].job_id  # copied, not run again
    assert value(new.steps["side"].output) == value(old.steps["side"].output)
    assert value(new.context.fields["first"]) == {"echo": {"s": "a"}}
    assert new.input == old.input


async def test_list_timeline_watch_and_delete(api: Api, prefix: str) -> None:
    wf = await api.upsert(
        {
            "id": f"list-{prefix}",
            "steps": {"ok": {"type": "approval"}, "tell": {"type": "notify", "depends_on": ["ok"]}},
        }
    )
    ids = [(await api.start(wf.id, {"i": i})).run_id for i in range(5)]
    for run_id in ids:
        await api.wait_step(run_id, "ok", "WAITING")
    seen: list[str] = []
    token = ""
    while True:
        page = await api.runs.ListRuns(
            RS.ListRunsRequest(workflow_id=wf.id, page_size=2, page_token=token)
        )
        seen += [r.id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids)
    waiting = await api.runs.ListRuns(RS.ListRunsRequest(workflow_id=wf.id, status="waiting"))
    assert len(waiting.runs) == 5
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.runs.ListRuns(RS.ListRunsRequest(status="sleeping"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    watched: list[tuple[int, str, int]] = []

    async def watch() -> None:
        stream = api.runs.WatchRun(RS.WatchRunRequest(run_id=ids[0]))
        async for item in stream:
            watched.append((item.event.seq, item.event.type, item.run.status))

    task = asyncio.create_task(watch())
    await eventually(lambda: _true(len(watched) >= 3), what="the history")
    await api.runs.ApproveStep(RS.ApproveStepRequest(run_id=ids[0], step_id="ok"))
    async with asyncio.timeout(10):
        await task
    seqs = [s for s, _, _ in watched]
    assert seqs == list(range(1, len(seqs) + 1))
    assert watched[0][1] == "run_created"
    assert watched[-1][1] == "run_status" and watched[-1][2] == run_pb2.RUN_STATUS_SUCCEEDED

    page = await api.runs.GetRunTimeline(RS.GetRunTimelineRequest(run_id=ids[0], page_size=2))
    assert [e.seq for e in page.events] == [1, 2] and page.next_page_token == "3"
    assert len(await api.timeline(ids[0])) == len(watched)

    await api.runs.DeleteRun(RS.DeleteRunRequest(run_id=ids[1]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.get(ids[1])
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await api.runs.ListRuns(RS.ListRunsRequest(workflow_id=wf.id))
    assert ids[1] not in [r.id for r in listed.runs]
    await api.cancel(*ids[2:])


async def test_start_requires_a_known_workflow(api: Api, prefix: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.runs.StartRun(RS.StartRunRequest(workflow_id=f"none-{prefix}", input=struct({})))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(info.value) == "WORKFLOW_NOT_FOUND"
