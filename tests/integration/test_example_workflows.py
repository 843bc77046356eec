"""The example workflows (`examples/workflows/`) validate and run to success against the
example worker (`examples/echo_worker.py`), as the README shows them: through the SDK and
through the REST API (curl's requests)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from cordum.sdk import AsyncClient, InvalidArgument, load_workflow
from cordum.sdk.convert import (
    from_struct,
    from_value,
    optional_value,
    run_status_name,
    step_status_name,
)
from cordum.sdk.worker import Worker
from cordum.server.app import App
from cordum.v1 import run_pb2

from support.examples import HELLO, REVIEW, example_worker
from support.waiting import eventually


@pytest_asyncio.fixture
async def client(cordum: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cordum.grpc_port}", timeout=10.0) as client:
        yield client


@pytest_asyncio.fixture
async def worker(nats_url: str, redis_url: str) -> AsyncIterator[Worker]:
    async with example_worker(nats_url, redis_url) as running:
        yield running


def statuses(run: run_pb2.Run) -> dict[str, str]:
    return {sid: step_status_name(sr.status) for sid, sr in run.steps.items()}


def output(run: run_pb2.Run, step: str) -> Any:
    return optional_value(run.steps[step], "output")


async def test_both_examples_are_valid_definitions(client: AsyncClient) -> None:
    for path in (HELLO, REVIEW):
        checked = await client.workflows.validate(path)
        assert checked.valid, [(p.field, p.description) for p in checked.problems]


async def test_hello_runs_every_step_and_announces_the_shout(
    client: AsyncClient, worker: Worker
) -> None:
    saved = await client.workflows.upsert(HELLO)
    assert (saved.id, len(saved.steps)) == ("hello", 4)
    started = await client.runs.start("hello")
    run = await client.runs.wait(started.run_id, timeout=30)
    assert run_status_name(run.status) == "SUCCEEDED", run.error
    assert statuses(run) == {
        "greet": "SUCCEEDED",
        "loud": "SUCCEEDED",
        "shout": "SUCCEEDED",
        "done": "SUCCEEDED",
    }
    greeting = output(run, "greet")
    assert greeting["echo"] == {"greeting": "Hello, world!"}
    assert greeting["worker_id"] == worker.worker_id
    assert output(run, "shout")["echo"] == {"greeting": "Hello, world!", "volume": 11}
    assert output(run, "done") == {"level": "INFO", "message": "shouted: Hello, world!"}
    # The run's output is its leaf steps' outputs.
    assert from_value(run.output) == {"done": output(run, "done")}


async def test_hello_quiet_skips_the_shout_branch_only(client: AsyncClient, worker: Worker) -> None:
    await client.workflows.upsert(HELLO)
    started = await client.runs.start("hello", input={"name": "Ada", "quiet": True})
    run = await client.runs.wait(started.run_id, timeout=30)
    assert run_status_name(run.status) == "SUCCEEDED", run.error
    assert statuses(run) == {
        "greet": "SUCCEEDED",
        "loud": "SKIPPED",
        "shout": "SKIPPED",
        "done": "SUCCEEDED",
    }
    assert output(run, "done")["message"] == "said: Hello, Ada!"


async def test_hello_refuses_input_outside_its_schema(client: AsyncClient) -> None:
    await client.workflows.upsert(HELLO)
    with pytest.raises(InvalidArgument) as refused:
        await client.runs.start("hello", input={"name": "", "colour": "red"})
    assert refused.value.reason == "SCHEMA_VALIDATION_FAILED"
    assert set(refused.value.field_violations) == {"input", "input.name"}


async def test_review_fans_out_waits_for_approval_cools_off_and_publishes(
    client: AsyncClient, worker: Worker
) -> None:
    saved = await client.workflows.upsert(load_workflow(REVIEW))
    assert saved.steps["check"].max_parallel == 2
    items = ["alpha", "beta", "gamma", "delta", "epsilon"]
    started = await client.runs.start("review", input={"items": items, "seconds": 0.05})
    run_id = started.run_id

    async def current() -> run_pb2.Run:
        return await client.runs.get(run_id)

    waiting = await eventually(
        current,
        until=lambda r: (
            r.status != run_pb2.RUN_STATUS_RUNNING and r.status != run_pb2.RUN_STATUS_PENDING
        ),
        within=30,
        what="the review to wait for its sign-off",
    )
    assert run_status_name(waiting.status) == "WAITING", waiting.error
    assert step_status_name(waiting.steps["sign_off"].status) == "WAITING"
    check = waiting.steps["check"]
    assert list(check.children) == [f"check[{i}]" for i in range(len(items))]
    # The children's outputs, gathered in item order into the parent's output.
    slept = optional_value(check, "output")
    assert [o["job_id"] for o in slept] == [waiting.steps[c].job_id for c in check.children]
    assert [from_value(waiting.steps[c].input)["item"] for c in check.children] == items
    assert from_value(waiting.steps["check[4]"].input)["position"] == 5
    assert output(waiting, "summarize")["echo"] == {"items": items, "checked": 5}
    # output_path puts the summary into the run context.
    context = from_struct(waiting.context)
    assert context["review"]["summary"]["echo"]["checked"] == 5

    approved = await client.runs.approve_step(run_id, "sign_off", reason="looks good")
    assert step_status_name(approved.steps["sign_off"].status) == "SUCCEEDED"
    done = await client.runs.wait(run_id, timeout=30)
    assert run_status_name(done.status) == "SUCCEEDED", done.error
    assert set(statuses(done).values()) == {"SUCCEEDED"}
    assert output(done, "publish")["echo"] == {"published": items, "checked": 5}
    assert output(done, "announce")["message"] == "review published: 5 items"

    events = [e async for e in client.runs.timeline(run_id)]
    kinds = [e.type for e in events]
    assert kinds[0] == "run_created"
    for kind in ("step_expanded", "step_waiting", "step_approved", "step_delay_started"):
        assert kind in kinds
    assert kinds.index("step_approved") < kinds.index("step_delay_started")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_review_dry_run_resolves_every_step_without_dispatching(
    client: AsyncClient,
) -> None:
    await client.workflows.upsert(REVIEW)
    started = await client.runs.start("review", input={"items": ["x", "y"]}, dry_run=True)
    run = await client.runs.wait(started.run_id, timeout=30)
    assert run.dry_run and run_status_name(run.status) == "SUCCEEDED"
    assert not any(sr.job_id for sr in run.steps.values())
    assert from_value(run.steps["check[1]"].input) == {"item": "y", "position": 2, "seconds": 1}


async def test_the_readme_rest_calls_create_and_run_hello(rest_url: str, worker: Worker) -> None:
    # README: curl -X POST .../api/v1/workflows -d @examples/workflows/hello.json, then
    # POST .../api/v1/workflows/hello/runs with the input as the body.
    async with httpx.AsyncClient(base_url=rest_url, timeout=15) as http:
        created = await http.post(
            "/api/v1/workflows",
            content=HELLO.read_bytes(),
            headers={"content-type": "application/json"},
        )
        assert created.status_code == 200, created.text
        assert created.json()["id"] == "hello"
        started = await http.post("/api/v1/workflows/hello/runs", json={"name": "REST"})
        assert started.status_code == 200, started.text
        run_id = started.json()["run_id"]

        async def run_json() -> dict[str, Any]:
            reply = await http.get(f"/api/v1/workflow-runs/{run_id}")
            return reply.json()  # type: ignore[no-any-return]

        run = await eventually(
            run_json,
            until=lambda r: r["status"] == "RUN_STATUS_SUCCEEDED",
            within=30,
            what="the REST run to succeed",
        )
        assert run["steps"]["done"]["output"]["message"] == "shouted: Hello, REST!"
        timeline = await http.get(f"/api/v1/workflow-runs/{run_id}/timeline")
        assert timeline.json()["events"][0]["type"] == "run_created"
        # The watch stream: server-sent events, one {event, run} each (it ends: the run ended).
        watched = await http.get(f"/api/v1/workflow-runs/{run_id}:watch")
        assert watched.status_code == 200, watched.text
        assert watched.headers["content-type"].startswith("text/event-stream")
        updates = [
            json.loads(line.removeprefix("data: "))
            for line in watched.text.splitlines()
            if line.startswith("data: ")
        ]
        assert updates[0]["event"]["type"] == "run_created"
        assert updates[-1]["run"]["status"] == "RUN_STATUS_SUCCEEDED"


async def test_the_readme_job_calls(rest_url: str, worker: Worker) -> None:
    # README: curl -X POST .../api/v1/jobs:submitAndWait, POST .../api/v1/jobs, GET the job.
    async with httpx.AsyncClient(base_url=rest_url, timeout=15) as http:
        waited = await http.post(
            "/api/v1/jobs:submitAndWait",
            json={"job": {"topic": "job.echo", "prompt": "hi"}, "timeout_ms": 10000},
        )
        assert waited.status_code == 200, waited.text
        body = waited.json()
        assert body["done"] is True and body["job"]["state"] == "JOB_STATE_SUCCEEDED"
        assert body["result"]["worker_id"] == worker.worker_id
        submitted = await http.post("/api/v1/jobs", json={"topic": "job.echo", "prompt": "hi"})
        assert submitted.status_code == 200, submitted.text
        job_id = submitted.json()["job_id"]

        async def job() -> dict[str, Any]:
            return (await http.get(f"/api/v1/jobs/{job_id}")).json()  # type: ignore[no-any-return]

        await eventually(job, until=lambda j: j["state"] == "JOB_STATE_SUCCEEDED", within=15)
        result = await http.get(f"/api/v1/jobs/{job_id}/result")
        assert result.json()["result"]["echo"]["prompt"] == "hi"
