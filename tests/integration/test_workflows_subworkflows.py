"""Subworkflow steps end to end (in-process app, real NATS and Valkey, SDK workers): the child
run's outcome is the step's, failures retry with a new child, cancelling the parent cancels
the child, references are checked when saved, and a start repeated after a crash is one
child."""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import pytest

from cordum.sdk.worker import JobContext, JobFailed
from cordum.server.app import App
from cordum.server.workflows import dag
from cordum.server.workflows.definition import compile_workflow
from cordum.server.workflows.reconciler import ReconcileReport
from cordum.server.workflows.runtime import WorkflowRuntime
from cordum.v1 import run_service_pb2, workflow_service_pb2

from support.jobs import field_violations
from support.waiting import eventually
from support.workflows import Api, make_worker, run_status, status, value


@pytest.fixture
def api(channel: grpc.aio.Channel) -> Api:
    return Api(channel)


def runtime(app: App) -> WorkflowRuntime:
    assert app.workflows is not None
    return app.workflows


async def child_runs(api: Api, workflow_id: str) -> list[Any]:
    page = await api.runs.ListRuns(run_service_pb2.ListRunsRequest(workflow_id=workflow_id))
    return list(page.runs)


async def test_a_child_run_succeeds_and_the_parent_continues_with_its_output(
    cordum: App, api: Api, nats_url: str, redis_url: str, prefix: str, monkeypatch: Any
) -> None:
    topic = f"job.t.ok.{prefix}.sub"

    async def echo(ctx: JobContext, data: Any) -> Any:
        return {"echo": data}

    rt = runtime(cordum)
    assert rt.reconciler is not None

    async def idle() -> ReconcileReport:
        return ReconcileReport(skipped=True)

    # Without reconciler ticks: the child's end must advance the parent by itself.
    monkeypatch.setattr(rt.reconciler, "tick", idle)
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: echo}):
        child = await api.upsert(
            {
                "id": f"child-{prefix}",
                "org_id": "acme",
                "steps": {"work": {"topic": topic, "input": {"q": "${input.q}"}}},
            }
        )
        parent = await api.upsert(
            {
                "id": f"parent-{prefix}",
                "org_id": "acme",
                "steps": {
                    "sub": {
                        "type": "subworkflow",
                        "workflow_id": child.id,
                        "input": {"q": "${input.word} twice"},
                        "output_path": "from_child",
                    },
                    "after": {
                        "topic": topic,
                        "depends_on": ["sub"],
                        "input": {"got": "${steps.sub.output.work.echo.q}"},
                    },
                },
            }
        )
        started = await api.start(parent.id, {"word": "hi"}, labels={"team": "blue"})
        run = await api.wait(started.run_id)
    assert run_status(run) == "SUCCEEDED", run.error
    sub = run.steps["sub"]
    assert status(run, "sub") == "SUCCEEDED" and sub.attempts == 1
    assert sub.child_run_id == dag.child_run_id(run.id, "sub", 1)
    assert value(sub.output) == {"work": {"echo": {"q": "hi twice"}}}
    assert value(run.context.fields["from_child"]) == {"work": {"echo": {"q": "hi twice"}}}
    assert value(run.steps["after"].output) == {"echo": {"got": "hi twice"}}
    kid = await api.get(sub.child_run_id)
    assert run_status(kid) == "SUCCEEDED"
    assert (kid.parent_run_id, kid.parent_step_id, kid.depth) == (run.id, "sub", 1)
    assert kid.workflow_id == child.id and kid.tenant_id == "acme"
    assert dict(kid.labels) == {"team": "blue"}
    assert value(kid.input) == {"q": "hi twice"}
    assert "step_child_started" in await api.event_types(run.id)


async def test_a_failing_child_fails_the_step_and_a_retry_starts_a_new_child(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.subfail"
    calls: Counter[str] = Counter()

    async def broken(ctx: JobContext, data: Any) -> Any:
        calls[ctx.env["run_id"]] += 1
        raise JobFailed("disk full")

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: broken}):
        child = await api.upsert({"id": f"cf-{prefix}", "steps": {"w": {"topic": topic}}})
        parent = await api.upsert(
            {
                "id": f"pf-{prefix}",
                "steps": {
                    "sub": {
                        "type": "workflow",
                        "workflow_id": child.id,
                        "retry": {"max_retries": 1, "initial_backoff_sec": 0.05},
                    }
                },
            }
        )
        run = await api.wait((await api.start(parent.id, {"x": 1})).run_id)
    assert run_status(run) == "FAILED"
    sub = run.steps["sub"]
    assert status(run, "sub") == "FAILED" and sub.attempts == 2
    first, second = (dag.child_run_id(run.id, "sub", n) for n in (1, 2))
    assert sub.child_run_id == second
    assert "disk full" in sub.error.message and second in sub.error.message
    for kid_id in (first, second):
        kid = await api.get(kid_id)
        assert run_status(kid) == "FAILED" and kid.parent_run_id == run.id
    assert sorted(calls) == sorted([first, second])
    assert "step_retry_scheduled" in await api.event_types(run.id)


async def test_cancelling_the_parent_cancels_the_child(api: Api, prefix: str) -> None:
    child = await api.upsert({"id": f"cw-{prefix}", "steps": {"ok": {"type": "approval"}}})
    parent = await api.upsert(
        {
            "id": f"pw-{prefix}",
            "steps": {"sub": {"type": "subworkflow", "workflow_id": child.id}},
        }
    )
    run_id = (await api.start(parent.id)).run_id
    run = await api.wait_step(run_id, "sub", "RUNNING")
    kid_id = run.steps["sub"].child_run_id
    await api.wait(kid_id, lambda r: status(r, "ok") == "WAITING", what="the child to wait")
    await api.cancel(run_id)
    kid = await api.wait(kid_id)
    assert run_status(kid) == "CANCELLED"
    assert status(kid, "ok") == "CANCELLED"
    run = await api.get(run_id)
    assert run_status(run) == "CANCELLED" and status(run, "sub") == "CANCELLED"


async def test_self_references_direct_or_through_another_workflow_are_refused(
    api: Api, prefix: str
) -> None:
    a, b = f"ra-{prefix}", f"rb-{prefix}"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.upsert({"id": a, "steps": {"me": {"type": "subworkflow", "workflow_id": a}}})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps.me.workflow_id" in field_violations(info.value)
    await api.upsert({"id": b, "steps": {"n": {"type": "notify"}}})
    await api.upsert({"id": a, "steps": {"to_b": {"type": "subworkflow", "workflow_id": b}}})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.upsert({"id": b, "steps": {"to_a": {"type": "subworkflow", "workflow_id": a}}})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = field_violations(info.value)
    assert found["steps.to_a.workflow_id"] == f"runs this workflow again: {b} → {a} → {b}"
    # Nothing was written: b still only notifies.
    got = await api.workflows.GetWorkflow(workflow_service_pb2.GetWorkflowRequest(workflow_id=b))
    assert set(got.steps) == {"n"}


async def test_an_unknown_workflow_is_refused_when_saved(api: Api, prefix: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.upsert(
            {
                "id": f"unk-{prefix}",
                "steps": {"sub": {"type": "subworkflow", "workflow_id": f"nope-{prefix}"}},
            }
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == {"steps.sub.workflow_id": f"no workflow 'nope-{prefix}'"}


async def test_a_child_start_lost_in_a_crash_is_made_once_by_the_repair(
    cordum: App, api: Api, prefix: str, monkeypatch: Any
) -> None:
    rt = runtime(cordum)
    children = rt.effects.children
    assert children is not None
    real = children.start
    dropped: list[str] = []

    async def crash_once(parent: Any, starts: Any) -> dict[str, str]:
        if parent.workflow_id == f"pc-{prefix}" and not dropped:
            dropped.extend(s.run_id for s in starts)
            return {}  # as if the engine died after writing the parent, before the child
        return await real(parent, starts)

    monkeypatch.setattr(children, "start", crash_once)
    child = await api.upsert({"id": f"cc-{prefix}", "steps": {"n": {"type": "notify"}}})
    parent = await api.upsert(
        {"id": f"pc-{prefix}", "steps": {"sub": {"type": "subworkflow", "workflow_id": child.id}}}
    )
    run = await api.wait((await api.start(parent.id)).run_id, within=30)
    assert run_status(run) == "SUCCEEDED"
    expected = dag.child_run_id(run.id, "sub", 1)
    assert dropped == [expected] and run.steps["sub"].child_run_id == expected
    # Starting the same attempt again (a second repair racing the first) changes nothing.
    again = dag.ChildStart(
        key="sub", step=_compiled_step(parent), run_id=expected, attempt=1, payload={}
    )
    assert await real(run, [again]) == {}
    kids = await eventually(
        lambda: child_runs(api, child.id), until=lambda k: len(k) >= 1, what="the child run"
    )
    assert [k.id for k in kids] == [expected]
    assert run_status(await api.get(expected)) == "SUCCEEDED"


def _compiled_step(wf: Any) -> Any:
    compiled, problems = compile_workflow(wf)
    assert not problems
    return compiled.steps["sub"]


async def test_for_each_over_a_subworkflow_step_runs_one_child_per_item(
    api: Api, prefix: str
) -> None:
    child = await api.upsert(
        {
            "id": f"fc-{prefix}",
            "steps": {"is_big": {"type": "condition", "condition": "input.n > 1"}},
        }
    )
    parent = await api.upsert(
        {
            "id": f"fp-{prefix}",
            "steps": {
                "each": {
                    "type": "subworkflow",
                    "workflow_id": child.id,
                    "for_each": "input.ns",
                    "input": {"n": "${item}"},
                }
            },
        }
    )
    run = await api.wait((await api.start(parent.id, {"ns": [1, 2, 3]})).run_id)
    assert run_status(run) == "SUCCEEDED", run.error
    assert value(run.steps["each"].output) == [{}, {"is_big": True}, {"is_big": True}]
    for i in range(3):
        kid = await api.get(run.steps[f"each[{i}]"].child_run_id)
        assert kid.parent_step_id == f"each[{i}]" and value(kid.input) == {"n": i + 1}


async def test_a_dry_run_resolves_the_step_without_starting_a_child(api: Api, prefix: str) -> None:
    child = await api.upsert({"id": f"dc-{prefix}", "steps": {"n": {"type": "notify"}}})
    parent = await api.upsert(
        {
            "id": f"dp-{prefix}",
            "steps": {
                "sub": {
                    "type": "subworkflow",
                    "workflow_id": child.id,
                    "input": {"v": "${input.v}"},
                }
            },
        }
    )
    run = await api.wait((await api.start(parent.id, {"v": 7}, dry_run=True)).run_id)
    assert run_status(run) == "SUCCEEDED"
    assert value(run.steps["sub"].input) == {"v": 7}
    assert run.steps["sub"].child_run_id == ""
    assert await child_runs(api, child.id) == []


async def test_an_input_the_child_workflow_refuses_fails_the_step_and_starts_nothing(
    api: Api, prefix: str
) -> None:
    child = await api.upsert(
        {
            "id": f"sc-{prefix}",
            "input_schema": {"type": "object", "required": ["n"]},
            "steps": {"n": {"type": "notify"}},
        }
    )
    parent = await api.upsert(
        {
            "id": f"sp-{prefix}",
            "steps": {"sub": {"type": "subworkflow", "workflow_id": child.id, "input": {"m": 1}}},
        }
    )
    run = await api.wait((await api.start(parent.id)).run_id)
    assert run_status(run) == "FAILED"
    assert run.steps["sub"].error.code == "CHILD_NOT_STARTED"
    assert "'n' is a required property" in run.steps["sub"].error.message
    assert await child_runs(api, child.id) == []
