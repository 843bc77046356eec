"""`client.workflows` and `client.runs` (async and blocking) against the session app:
definitions from dicts, messages and files, runs followed by watch/wait, timelines, approval
steps, cancel, rerun, delete, and the typed errors of each failure."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cordum.sdk import (
    AlreadyExists,
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    WaitTimeout,
    load_workflow,
)
from cordum.sdk.convert import (
    from_struct,
    from_value,
    is_run_terminal,
    optional_value,
    run_status_name,
    step_status_name,
)
from cordum.sdk.workflows import parse_workflow
from cordum.server.app import App
from cordum.v1 import run_pb2, workflow_pb2

from support.waiting import eventually
from support.workflows import make_worker


@pytest_asyncio.fixture
async def client(cordum: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cordum.grpc_port}", timeout=10.0) as client:
        yield client


def approval_flow(wf_id: str) -> dict[str, Any]:
    """first (notify) → gate (approval) → after (notify)."""
    return {
        "id": wf_id,
        "name": "gated",
        "steps": {
            "first": {"type": "notify", "input": {"message": "${input.who}"}},
            "gate": {"type": "approval", "depends_on": ["first"]},
            "after": {
                "type": "notify",
                "depends_on": ["gate"],
                "input": {"message": "after ${steps.first.output.message}"},
            },
        },
    }


async def until_status(client: AsyncClient, run_id: str, name: str) -> run_pb2.Run:
    async def get() -> run_pb2.Run:
        return await client.runs.get(run_id)

    return await eventually(
        get, until=lambda r: run_status_name(r.status) == name, what=f"{run_id} {name}"
    )


# -- definitions ------------------------------------------------------------------------------


async def test_the_sdk_and_cordumctl_import_nothing_from_the_server() -> None:
    # The SDK ships without the server (`pip install cordum`, no [server] extra).
    code = (
        "import sys, cordum.sdk, cordum.sdk.cli.main\n"
        "from cordum.sdk import config, policy, runs, schemas, workflows\n"
        "found = sorted(m for m in sys.modules if m.startswith('cordum.server'))\n"
        "assert not found, found\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def test_upsert_from_a_dict_a_message_and_a_file(
    client: AsyncClient, prefix: str, tmp_path: Path
) -> None:
    first = await client.workflows.upsert(
        {"id": f"sdk-{prefix}", "name": "one", "steps": {"a": {"type": "notify"}}}
    )
    assert (first.id, first.revision, first.steps["a"].id) == (f"sdk-{prefix}", 1, "a")

    message = workflow_pb2.Workflow(id=f"sdk-{prefix}", name="two")
    message.steps["b"].type = "notify"
    second = await client.workflows.upsert(message)
    assert (second.revision, list(second.steps)) == (2, ["b"])

    # YAML: times come unquoted (a datetime to the YAML parser), keys may be numbers.
    path = tmp_path / "flow.yml"
    path.write_text(
        f"id: sdk-{prefix}\n"
        "name: three\n"
        "steps:\n"
        "  wait:\n"
        "    type: delay\n"
        "    delay_until: 2000-01-01T00:00:00Z\n"
        "  7:\n"
        "    type: notify\n"
        "    depends_on: [wait]\n"
    )
    loaded = load_workflow(path)
    assert loaded.steps["wait"].delay_until == "2000-01-01T00:00:00Z"
    third = await client.workflows.upsert(path)  # a path is read with load_workflow
    assert (third.revision, third.name, sorted(third.steps)) == (3, "three", ["7", "wait"])
    assert await client.workflows.get(f"sdk-{prefix}") == third


async def test_load_workflow_refuses_what_is_not_a_definition(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"id": "x", "steps": {"a": {"dependson": ["b"]}}}))
    with pytest.raises(ValueError, match=r"unknown\.json: .*dependson"):
        load_workflow(unknown)
    broken = tmp_path / "broken.json"
    broken.write_text('{"id": "x",')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_workflow(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml: a workflow is a JSON object, not a list"):
        load_workflow(listed)
    with pytest.raises(OSError):
        load_workflow(tmp_path / "missing.json")
    assert parse_workflow({"id": "x", "timeoutSec": 5}).timeout_sec == 5  # JSON names too


async def test_an_invalid_definition_lists_every_problem(
    client: AsyncClient, cordum: App, prefix: str
) -> None:
    bad = {
        "id": f"sdk-bad-{prefix}",
        "steps": {
            "a": {"topic": "job.x", "depends_on": ["nowhere"]},
            "b": {"type": "teleport"},
            "c": {"type": "condition", "condition": "input.n >"},
        },
    }
    checked = await client.workflows.validate(bad)
    assert not checked.valid
    fields = {p.field for p in checked.problems}
    assert fields == {"steps.a.depends_on[0]", "steps.b.type", "steps.c.condition"}
    with pytest.raises(InvalidArgument) as refused:
        await client.workflows.upsert(bad)
    assert refused.value.reason == "WORKFLOW_INVALID"
    assert set(refused.value.field_violations) == fields
    assert "no step 'nowhere'" in refused.value.field_violations["steps.a.depends_on[0]"]
    with pytest.raises(NotFound) as missing:
        await client.workflows.get(bad["id"])
    assert missing.value.reason == "WORKFLOW_NOT_FOUND"
    good = await client.workflows.validate({"id": "x", "steps": {"a": {"type": "notify"}}})
    assert good.valid and not good.problems


async def test_list_follows_page_tokens_and_delete(client: AsyncClient, prefix: str) -> None:
    ids = [f"sdk-list-{prefix}-{n}" for n in range(5)]
    for wf_id in ids:
        await client.workflows.upsert({"id": wf_id, "steps": {"a": {"type": "notify"}}})
    seen = [w.id async for w in client.workflows.list(page_size=2)]
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    assert len([w async for w in client.workflows.list(page_size=2, limit=3)]) == 3
    first = await client.workflows.list_page(page_size=2)
    assert len(first.workflows) == 2 and first.next_page_token
    await client.workflows.delete(ids[0])
    with pytest.raises(NotFound):
        await client.workflows.get(ids[0])
    with pytest.raises(NotFound):
        await client.workflows.delete(ids[0])


# -- runs -------------------------------------------------------------------------------------


async def test_start_and_wait_for_a_job_workflow(
    client: AsyncClient, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}"

    async def double(ctx: Any, data: Any) -> Any:
        return {"n": data["n"] * 2}

    wf = await client.workflows.upsert(
        {
            "id": f"sdk-job-{prefix}",
            "steps": {
                "one": {"topic": topic, "input": {"n": "${input.n}"}},
                "two": {
                    "topic": topic,
                    "depends_on": ["one"],
                    "input": {"n": "${steps.one.output.n}"},
                },
            },
        }
    )
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: double}):
        started = await client.runs.start(
            wf.id, input={"n": 3}, labels={"team": "sdk"}, idempotency_key=f"k-{prefix}"
        )
        assert started.run_id == started.run.id and not started.idempotent_replay
        run = await client.runs.wait(started.run_id, timeout=20)
    assert run_status_name(run.status) == "SUCCEEDED"
    assert optional_value(run.steps["two"], "output") == {"n": 12}
    assert from_value(run.output) == {"two": {"n": 12}}
    assert run.labels["team"] == "sdk" and from_struct(run.input) == {"n": 3}
    assert run.steps["one"].job_id.startswith(f"{run.id}:one@")

    again = await client.runs.start(
        wf.id, input={"n": 3}, labels={"team": "sdk"}, idempotency_key=f"k-{prefix}"
    )
    assert again.idempotent_replay and again.run_id == run.id
    with pytest.raises(AlreadyExists) as reused:
        await client.runs.start(wf.id, input={"n": 4}, idempotency_key=f"k-{prefix}")
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_watch_streams_the_timeline_with_the_run_until_it_ends(
    client: AsyncClient, prefix: str
) -> None:
    wf = await client.workflows.upsert(approval_flow(f"sdk-watch-{prefix}"))
    started = await client.runs.start(wf.id, input={"who": "ann"})
    seen: list[run_pb2.WatchRunResponse] = []

    async def follow() -> None:
        async for update in client.runs.watch(started.run_id, timeout=20):
            seen.append(update)

    follower = asyncio.create_task(follow())
    await until_status(client, started.run_id, "WAITING")
    await eventually(
        lambda: asyncio.sleep(0, result=[u.event.type for u in seen]),
        until=lambda kinds: "step_waiting" in kinds,
        what="the watcher to see the approval request",
    )
    await client.runs.approve_step(started.run_id, "gate", reason="fine")
    async with asyncio.timeout(20):
        await follower
    events = [u.event for u in seen]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "run_created"
    assert {"step_waiting", "step_approved"} <= {e.type for e in events}
    assert is_run_terminal(seen[-1].run.status)
    assert run_status_name(seen[-1].run.status) == "SUCCEEDED"
    # Each event comes with the run as it stood after it.
    waiting = next(u for u in seen if u.event.type == "step_waiting")
    assert step_status_name(waiting.run.steps["gate"].status) == "WAITING"

    # Watching a run that already ended replays its timeline and stops.
    replayed = [u.event.seq async for u in client.runs.watch(started.run_id, timeout=10)]
    assert replayed == [e.seq for e in events]
    timeline = [e async for e in client.runs.timeline(started.run_id, page_size=2)]
    assert [e.seq for e in timeline] == [e.seq for e in events]
    assert len([e async for e in client.runs.timeline(started.run_id, limit=3)]) == 3


async def test_approve_reject_and_the_errors_of_deciding(client: AsyncClient, prefix: str) -> None:
    wf = await client.workflows.upsert(approval_flow(f"sdk-decide-{prefix}"))
    yes = (await client.runs.start(wf.id, input={"who": "a"})).run_id
    no = (await client.runs.start(wf.id, input={"who": "b"})).run_id
    await until_status(client, yes, "WAITING")
    await until_status(client, no, "WAITING")
    with pytest.raises(FailedPrecondition) as early:
        await client.runs.approve_step(yes, "first")
    assert early.value.reason == "STEP_NOT_WAITING"
    with pytest.raises(NotFound) as unknown:
        await client.runs.approve_step(yes, "nope")
    assert unknown.value.reason == "STEP_NOT_FOUND"
    with pytest.raises(FailedPrecondition) as mismatch:
        await client.runs.approve_step(yes, "gate", workflow_id="another")
    assert mismatch.value.reason == "WORKFLOW_MISMATCH"

    approved = await client.runs.approve_step(yes, "gate", workflow_id=wf.id)
    assert step_status_name(approved.steps["gate"].status) == "SUCCEEDED"
    assert run_status_name((await client.runs.wait(yes, timeout=10)).status) == "SUCCEEDED"

    rejected = await client.runs.reject_step(no, "gate", reason="not today")
    assert step_status_name(rejected.steps["gate"].status) == "FAILED"
    ended = await client.runs.wait(no, timeout=10)
    assert run_status_name(ended.status) == "FAILED"
    assert ended.error.step_id == "gate"
    assert step_status_name(ended.steps["after"].status) in {"CANCELLED", "SKIPPED"}
    with pytest.raises(FailedPrecondition) as late:
        await client.runs.approve_step(no, "gate")
    assert late.value.reason == "RUN_TERMINAL"


async def test_wait_times_out_then_cancel_rerun_list_and_delete(
    client: AsyncClient, prefix: str
) -> None:
    wf = await client.workflows.upsert(approval_flow(f"sdk-life-{prefix}"))
    run_id = (await client.runs.start(wf.id, input={"who": "c"})).run_id
    await until_status(client, run_id, "WAITING")
    with pytest.raises(WaitTimeout) as slow:
        await client.runs.wait(run_id, timeout=0.3)
    assert (slow.value.run_id, slow.value.kind, slow.value.job_id) == (run_id, "run", "")
    assert f"run {run_id} did not finish" in str(slow.value)

    cancelled = await client.runs.cancel(run_id, reason="enough")
    assert run_status_name(cancelled.status) == "CANCELLED"
    assert run_status_name((await client.runs.wait(run_id)).status) == "CANCELLED"
    # A run that ended stays as it ended.
    assert run_status_name((await client.runs.cancel(run_id)).status) == "CANCELLED"

    # `first` succeeded, so a rerun from the gate keeps its output and asks again.
    rerun = await client.runs.rerun(run_id, from_step="gate")
    assert rerun.run.rerun_of == run_id and rerun.run.rerun_step == "gate"
    waiting = await until_status(client, rerun.run_id, "WAITING")
    assert waiting.steps["first"].output == cancelled.steps["first"].output
    with pytest.raises(InvalidArgument) as bad_step:
        await client.runs.rerun(run_id, from_step="nope")
    assert set(bad_step.value.field_violations) == {"from_step"}
    dry = await client.runs.rerun(run_id, dry_run=True)
    assert run_status_name((await client.runs.wait(dry.run_id, timeout=10)).status) == "SUCCEEDED"

    mine = [r.id async for r in client.runs.list(workflow_id=wf.id, page_size=1)]
    assert set(mine) == {run_id, rerun.run_id, dry.run_id}
    waiting_now = [r.id async for r in client.runs.list(workflow_id=wf.id, status="waiting")]
    assert waiting_now == [rerun.run_id]
    recent = [
        r.id
        async for r in client.runs.list(
            workflow_id=wf.id, updated_after=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
        )
    ]
    assert set(recent) == set(mine)
    with pytest.raises(InvalidArgument):
        [r async for r in client.runs.list(status="sleepy")]

    await client.runs.delete(rerun.run_id)  # a live run is cancelled, then deleted
    with pytest.raises(NotFound) as gone:
        await client.runs.get(rerun.run_id)
    assert gone.value.reason == "RUN_NOT_FOUND"
    with pytest.raises(NotFound):
        await client.runs.wait(rerun.run_id, timeout=5)


async def test_start_errors_are_typed(client: AsyncClient, prefix: str) -> None:
    with pytest.raises(NotFound) as missing:
        await client.runs.start(f"nope-{prefix}")
    assert missing.value.reason == "WORKFLOW_NOT_FOUND"
    wf = await client.workflows.upsert(
        {
            "id": f"sdk-schema-{prefix}",
            "input_schema": {"type": "object", "required": ["email"]},
            "steps": {"a": {"type": "notify"}},
        }
    )
    with pytest.raises(InvalidArgument) as bad:
        await client.runs.start(wf.id, input={"n": 1}, labels={"bad key!": "x"})
    assert set(bad.value.field_violations) == {"input", "labels[bad key!]"}
    with pytest.raises(TypeError, match="JSON object"):
        await client.runs.start(wf.id, input=[1, 2])  # type: ignore[arg-type]


async def test_the_blocking_client_from_a_thread(cordum: App, prefix: str) -> None:
    # Sync calls block; run them in a thread so the in-process app keeps serving.
    target = f"127.0.0.1:{cordum.grpc_port}"

    def blocking_calls() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Client(target, timeout=10.0) as sync:
            wf = sync.workflows.upsert(approval_flow(f"sdk-sync-{prefix}"))
            seen["valid"] = sync.workflows.validate(wf).valid
            run_id = sync.runs.start(wf.id, input={"who": "s"}).run_id
            for update in sync.runs.watch(run_id, timeout=10):
                if update.event.type == "step_waiting":
                    break  # leaving early ends the stream on the server too
            try:
                sync.runs.wait(run_id, timeout=0.2)
            except WaitTimeout as error:
                seen["timeout"] = (error.kind, error.run_id)
            sync.runs.approve_step(run_id, "gate")
            seen["status"] = run_status_name(sync.runs.wait(run_id, timeout=10).status)
            seen["events"] = [e.type for e in sync.runs.timeline(run_id, page_size=3)]
            seen["listed"] = [r.id for r in sync.runs.list(workflow_id=wf.id, page_size=1)]
            seen["workflows"] = {w.id for w in sync.workflows.list(page_size=2)}
            seen["rerun"] = sync.runs.rerun(run_id, dry_run=True).run.rerun_of
            sync.runs.cancel(sync.runs.start(wf.id, input={"who": "t"}).run_id)
            sync.runs.delete(run_id)
            try:
                sync.runs.get(run_id)
            except NotFound as error:
                seen["deleted"] = error.reason
            sync.workflows.delete(wf.id)
            try:
                sync.workflows.get(wf.id)
            except NotFound as error:
                seen["missing"] = error.reason
            seen["run_id"] = run_id
            seen["wf_id"] = wf.id
        return seen

    seen = await asyncio.to_thread(blocking_calls)
    assert seen["valid"] is True
    assert seen["timeout"] == ("run", seen["run_id"])
    assert seen["status"] == "SUCCEEDED"
    assert seen["events"][0] == "run_created" and "step_approved" in seen["events"]
    assert seen["listed"] == [seen["run_id"]]
    assert seen["wf_id"] in seen["workflows"]
    assert seen["rerun"] == seen["run_id"]
    assert seen["deleted"] == "RUN_NOT_FOUND"
    assert seen["missing"] == "WORKFLOW_NOT_FOUND"
