"""`client.events` (AsyncClient and Client) and `cordumctl events` against the session app:
jobs held for approval are cancelled once the stream is live, and the stream filtered by
one job's id shows `stream_start`, then that job's events only."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from cordum.sdk import AsyncClient, Client, InvalidArgument
from cordum.sdk.convert import state_name
from cordum.server.app import App
from cordum.v1 import event_pb2

from support.cli import Cli, Running
from support.waiting import eventually


@pytest.fixture
def target(cordum: App) -> str:
    return f"127.0.0.1:{cordum.grpc_port}"


@pytest_asyncio.fixture
async def cli(target: str) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Starts cordumctl; whatever a failed test left running is killed afterwards."""
    started: list[Running] = []

    async def start(*args: str) -> Running:
        started.append(await Cli(target).start(*args))
        return started[-1]

    yield start
    for running in started:
        if running.proc.returncode is None:
            running.proc.kill()
        await running.finish()


async def held_job(client: AsyncClient, prefix: str) -> str:
    """A job the test policy holds for approval: nothing happens to it until the test acts."""
    submitted = await client.jobs.submit(topic=f"job.t.approve.{prefix}", prompt="hold")

    async def state() -> str:
        return state_name((await client.jobs.get(submitted.job_id)).state)

    await eventually(state, until=lambda s: s == "APPROVAL_REQUIRED", within=30, what="held")
    return submitted.job_id


def is_cancelled(event: event_pb2.Event) -> bool:
    return event.kind == "job_state" and state_name(event.job_event.state) == "CANCELLED"


async def test_async_stream_by_job_id(target: str, prefix: str) -> None:
    async with AsyncClient(target, timeout=10) as client:
        job_id, other = await held_job(client, prefix), await held_job(client, prefix)
        seen: list[event_pb2.Event] = []
        async with asyncio.timeout(30):
            async for event in client.events.stream(job_id=job_id, kinds="job_state"):
                seen.append(event)
                if event.kind == "stream_start":
                    # The other job's events come first, were the filter not applied.
                    await client.jobs.cancel(other)
                    await client.jobs.cancel(job_id)
                if is_cancelled(event):
                    break
    assert seen[0].kind == "stream_start"
    assert [e.kind for e in seen[1:]] == ["job_state"] * (len(seen) - 1)
    assert {e.job_id for e in seen[1:]} == {job_id}
    assert seen[-1].job_event.job_id == job_id


async def test_blocking_stream_by_job_id(target: str, prefix: str) -> None:
    async with AsyncClient(target, timeout=10) as client:
        job_id, other = await held_job(client, prefix), await held_job(client, prefix)
        live = threading.Event()

        def follow() -> list[event_pb2.Event]:
            seen: list[event_pb2.Event] = []
            with Client(target) as blocking:
                for event in blocking.events.stream(job_id=job_id, timeout=30):
                    seen.append(event)
                    live.set()
                    if is_cancelled(event):
                        return seen
            return seen

        following = asyncio.create_task(asyncio.to_thread(follow))

        async def started() -> bool:
            return live.is_set() or following.done()

        await eventually(started, within=30, what="the blocking stream's stream_start")
        await client.jobs.cancel(other)
        await client.jobs.cancel(job_id)
        seen = await asyncio.wait_for(following, 40)
    assert seen[0].kind == "stream_start"
    assert is_cancelled(seen[-1])
    assert {e.job_id for e in seen[1:]} == {job_id}


def test_both_clients_stream_alike() -> None:
    aio, blocking = AsyncClient("127.0.0.1:1"), Client("127.0.0.1:1")
    try:
        names = {n for n in dir(aio.events) if not n.startswith("_")}
        assert names == {n for n in dir(blocking.events) if not n.startswith("_")} == {"stream"}
    finally:
        blocking.close()


async def test_bad_filter_is_invalid_argument_naming_the_field(target: str) -> None:
    async with AsyncClient(target, timeout=10) as client:
        with pytest.raises(InvalidArgument) as caught:
            async for _ in client.events.stream(kinds=["nope"]):
                pass
    assert "kinds" in caught.value.field_violations


async def test_cli_json_count_prints_the_jobs_events(
    target: str, prefix: str, cli: Callable[..., Awaitable[Running]]
) -> None:
    async with AsyncClient(target, timeout=10) as client:
        job_id, other = await held_job(client, prefix), await held_job(client, prefix)
        running = await cli("events", "--job", job_id, "--kind", "job_state", "--json")
        running_counted = await cli(
            "events", "--job", job_id, "--kind", "job_state", "--json", "--count", "1"
        )
        for each in (running, running_counted):
            await eventually(each.so_far, until=lambda s: "stream_start" in s, within=30)
        await client.jobs.cancel(other)
        await client.jobs.cancel(job_id)

        done = await running_counted.finish()
        assert done.code == 0, done.stderr
        lines = [json.loads(line) for line in done.lines()]
        assert [e["kind"] for e in lines] == ["stream_start", "job_state"]
        assert lines[1]["job_id"] == job_id
        assert lines[1]["job_event"]["state"] == "JOB_STATE_CANCELLED"

        # Without --count it runs until Ctrl-C, which ends it without a traceback.
        await eventually(running.so_far, until=lambda s: "JOB_STATE_CANCELLED" in s, within=30)
        running.proc.send_signal(signal.SIGINT)
        stopped = await running.finish()
        assert stopped.code == 130, stopped.stderr
        assert "Traceback" not in stopped.stderr
        kinds = [json.loads(line)["kind"] for line in stopped.lines()]
        assert kinds[0] == "stream_start" and set(kinds[1:]) == {"job_state"}


async def test_cli_prints_one_line_per_event(
    target: str, prefix: str, cli: Callable[..., Awaitable[Running]]
) -> None:
    async with AsyncClient(target, timeout=10) as client:
        job_id = await held_job(client, prefix)
        running = await cli("events", "--job", job_id, "--kind", "job_state", "--count", "1")
        await eventually(running.so_far, until=lambda s: "stream_start" in s, within=30)
        await client.jobs.cancel(job_id)
        done = await running.finish()
    assert done.code == 0, done.stderr
    last = done.lines()[-1].split()
    assert last[1:4] == ["job_state", job_id, f"job.t.approve.{prefix}"]
    assert "CANCELLED" in last
