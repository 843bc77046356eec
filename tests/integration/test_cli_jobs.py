"""`cordumctl job ...` and `cordumctl approval ...` against the session app.

cordumctl runs as a real subprocess (asyncio.create_subprocess_exec), so the in-process app
keeps serving on this test's event loop while the command talks to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from cordum.sdk import AsyncClient
from cordum.sdk.convert import state_name
from cordum.sdk.worker import JobFailed, Worker
from cordum.server.app import App

from support.waiting import eventually


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass(frozen=True)
class Cli:
    target: str

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        environment = {
            **os.environ,
            "CORDUM_TARGET": self.target,
            # Wide enough that rich tables never fold an id.
            "COLUMNS": "250",
            # Lines reach the pipe as they are printed (for tests that read as it runs).
            "PYTHONUNBUFFERED": "1",
        }
        environment.pop("CORDUM_API_KEY", None)
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cordum.sdk.cli.main",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )

    @staticmethod
    async def finish(proc: asyncio.subprocess.Process, stdout: bytes = b"") -> Run:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode is not None
        return Run(proc.returncode, (stdout + out).decode(), err.decode())

    async def __call__(self, *args: str) -> Run:
        return await self.finish(await self.start(*args))


@pytest.fixture
def cli(cordum: App) -> Cli:
    return Cli(f"127.0.0.1:{cordum.grpc_port}")


@pytest_asyncio.fixture
async def client(cordum: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cordum.grpc_port}", timeout=10.0) as client:
        yield client


@pytest.fixture
def release() -> asyncio.Event:
    return asyncio.Event()


@pytest_asyncio.fixture
async def worker(
    nats_url: str, redis_url: str, prefix: str, release: asyncio.Event
) -> AsyncIterator[Worker]:
    worker = Worker(
        worker_id=f"w-{prefix}", nats_url=nats_url, redis_url=redis_url, heartbeat_interval=0.2
    )

    async def echo(ctx: Any, data: Any) -> Any:
        return {"echo": data, "job_id": ctx.job_id}

    async def fail(ctx: Any, data: Any) -> Any:
        raise JobFailed("no luck")

    async def slow(ctx: Any, data: Any) -> Any:
        await release.wait()
        return {"slow": True}

    worker.add_handler(f"job.t.ok.{prefix}", echo)
    worker.add_handler(f"job.t.approve.{prefix}", echo)
    worker.add_handler(f"job.t.fail.{prefix}", fail)
    worker.add_handler(f"job.t.slow.{prefix}", slow)
    async with worker:
        yield worker
        release.set()


async def state_of(client: AsyncClient, job_id: str, *names: str) -> None:
    async def state() -> str:
        return state_name((await client.jobs.get(job_id)).state)

    await eventually(state, until=lambda s: s in names, what=f"{job_id} in {names}")


# -- job ---------------------------------------------------------------------------------------


async def test_submit_wait_json_prints_the_finished_job_and_result(
    cli: Cli, worker: Worker, prefix: str
) -> None:
    run = await cli(
        "job", "submit", "--topic", f"job.t.ok.{prefix}", "--input", '{"n": 1}',
        "--label", "team=a", "--label", "env=test", "--wait", "--timeout", "20", "--json",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    doc = run.json()
    assert doc["done"] is True
    assert doc["job"]["state"] == "JOB_STATE_SUCCEEDED"
    # protojson with the proto's field names, as the REST API has them.
    assert doc["job"]["worker_id"] == worker.worker_id
    assert doc["job"]["labels"] == {"team": "a", "env": "test"}
    assert doc["result"] == {"echo": {"n": 1}, "job_id": doc["job_id"]}


async def test_submit_wait_follows_states_and_prints_the_result(
    cli: Cli, worker: Worker, prefix: str, tmp_path: Any
) -> None:
    document = tmp_path / "input.json"
    document.write_text('{"from": "file"}')
    run = await cli(
        "job", "submit", "--topic", f"job.t.ok.{prefix}", "--input", f"@{document}", "--wait"
    )
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["echo"] == {"from": "file"}
    assert "SUCCEEDED" in run.stderr  # the progress display's log of state changes


async def test_submit_wait_exits_1_when_the_job_fails(
    cli: Cli, worker: Worker, prefix: str
) -> None:
    run = await cli("job", "submit", "--topic", f"job.t.fail.{prefix}", "--prompt", "x", "--wait")
    assert run.code == 1
    assert run.stdout == ""
    assert run.stderr.splitlines()[-1].startswith("cordumctl: job ")
    assert "ended FAILED" in run.stderr and "no luck" in run.stderr


async def test_submit_then_get_list_and_result(
    cli: Cli, client: AsyncClient, worker: Worker, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}"
    submitted = await cli("job", "submit", "--topic", topic, "--prompt", "hi")
    assert submitted.code == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    await client.jobs.wait(job_id, timeout=10)

    # Flags after the positional id are honoured (upstream's cordumctl ignored them).
    got = await cli("job", "get", job_id, "--json")
    assert got.code == 0, got.stderr
    assert got.json()["id"] == job_id
    assert got.json()["state"] == "JOB_STATE_SUCCEEDED"
    shown = await cli("job", "get", job_id)
    assert job_id in shown.stdout and "SUCCEEDED" in shown.stdout

    listed = await cli("job", "list", "--topic", topic, "--limit", "5", "--json")
    assert listed.code == 0, listed.stderr
    assert [j["id"] for j in listed.json()] == [job_id]
    table = await cli("job", "list", "--topic", topic, "--state", "SUCCEEDED")
    assert job_id in table.stdout and "SUCCEEDED" in table.stdout

    result = await cli("job", "result", job_id)
    assert result.code == 0, result.stderr
    assert result.json() == {"echo": result.json()["echo"], "job_id": job_id}
    assert result.json()["echo"]["prompt"] == "hi"
    raw = await cli("job", "result", job_id, "--json")
    assert raw.json()["state"] == "JOB_STATE_SUCCEEDED"
    assert raw.json()["result"]["job_id"] == job_id


async def test_watch_prints_each_state_change(
    cli: Cli, client: AsyncClient, worker: Worker, prefix: str, release: asyncio.Event
) -> None:
    submitted = await client.jobs.submit(topic=f"job.t.slow.{prefix}", prompt="x")
    await state_of(client, submitted.job_id, "DISPATCHED", "RUNNING")
    proc = await cli.start("job", "watch", submitted.job_id)
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        first = await proc.stdout.readline()
    # The first event is the current state; only then does the job end.
    assert b"DISPATCHED" in first or b"RUNNING" in first, first
    release.set()
    run = await cli.finish(proc, first)
    assert run.code == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "SUCCEEDED" in lines[-1]
    assert len(lines) >= 2

    again = await cli("job", "watch", submitted.job_id, "--json")
    events = [json.loads(line) for line in again.stdout.splitlines()]
    assert [e["state"] for e in events] == ["JOB_STATE_SUCCEEDED"]


async def test_cancel_ends_a_running_job_and_result_says_why_there_is_none(
    cli: Cli, client: AsyncClient, worker: Worker, prefix: str
) -> None:
    submitted = await client.jobs.submit(topic=f"job.t.slow.{prefix}", prompt="x")
    await state_of(client, submitted.job_id, "DISPATCHED", "RUNNING")

    run = await cli("job", "cancel", submitted.job_id, "--reason", "enough")
    assert run.code == 0, run.stderr
    assert run.stdout.split() == [submitted.job_id, "CANCELLED"]

    result = await cli("job", "result", submitted.job_id)
    assert result.code == 1
    assert result.stderr.startswith(f"cordumctl: job {submitted.job_id} ended CANCELLED")
    assert len(result.stderr.splitlines()) == 1

    again = await cli("job", "cancel", submitted.job_id, "--json")
    assert again.json()["state"] == "JOB_STATE_CANCELLED"


# -- approval ----------------------------------------------------------------------------------


async def test_approval_list_approve_and_reject(
    cli: Cli, client: AsyncClient, worker: Worker, prefix: str
) -> None:
    topic = f"job.t.approve.{prefix}"
    held = await client.jobs.submit(topic=topic, prompt="deploy")
    other = await client.jobs.submit(topic=topic, prompt="drop tables")
    await state_of(client, held.job_id, "APPROVAL_REQUIRED")
    await state_of(client, other.job_id, "APPROVAL_REQUIRED")

    listed = await cli("approval", "list", "--json")
    assert listed.code == 0, listed.stderr
    waiting = {a["job"]["id"]: a for a in listed.json()}
    assert {held.job_id, other.job_id} <= waiting.keys()
    assert waiting[held.job_id]["decision"]["rule_id"] == "approve-rule"
    table = await cli("approval", "list")
    assert held.job_id in table.stdout and "approve-rule" in table.stdout

    approved = await cli("approval", "approve", held.job_id, "--reason", "fine", "--note", "t-1")
    assert approved.code == 0, approved.stderr
    assert approved.stdout.startswith(f"{held.job_id} approved")
    job = await client.jobs.wait(held.job_id, timeout=10)
    assert state_name(job.state) == "SUCCEEDED"
    assert job.approval.reason == "fine" and job.approval.note == "t-1"

    rejected = await cli("approval", "reject", other.job_id, "--reason", "no", "--json")
    assert rejected.code == 0, rejected.stderr
    assert rejected.json()["state"] == "JOB_STATE_DENIED"

    twice = await cli("approval", "approve", held.job_id)
    assert twice.code == 1
    assert twice.stderr.startswith("cordumctl: JOB_NOT_AWAITING_APPROVAL: ")


# -- errors ------------------------------------------------------------------------------------


async def test_bad_input_prints_the_reason_and_each_field_and_exits_1(cli: Cli) -> None:
    run = await cli("job", "submit", "--topic", "not-a-topic", "--priority", "urgent")
    assert run.code == 1
    assert run.stdout == ""
    first, *fields = run.stderr.splitlines()
    assert first.startswith("cordumctl: INVALID_ARGUMENT: ")
    named = {line.split(":")[0].strip() for line in fields}
    assert {"topic", "priority"} <= named


async def test_unknown_job_is_one_line(cli: Cli, prefix: str) -> None:
    run = await cli("job", "get", f"missing-{prefix}")
    assert run.code == 1
    assert run.stderr.splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith("cordumctl: JOB_NOT_FOUND: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--input", "{not json"), "cordumctl: --input: not valid JSON"),
        (("--input", "@/nonexistent/input.json"), "cordumctl: --input: cannot read"),
        (("--label", "novalue"), "cordumctl: --label: expected key=value"),
    ],
)
async def test_bad_flag_values_are_one_line(cli: Cli, args: tuple[str, ...], message: str) -> None:
    run = await cli("job", "submit", "--topic", "job.t.ok.x", *args)
    assert run.code == 1
    assert run.stderr.startswith(message)
    assert len(run.stderr.splitlines()) == 1


async def test_unreachable_target_is_one_clear_line(cli: Cli) -> None:
    run = await cli("--target", "127.0.0.1:1", "job", "list")
    assert run.code == 1
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("cordumctl: cannot reach Cordum at 127.0.0.1:1: ")
