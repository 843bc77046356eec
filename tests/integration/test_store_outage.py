"""While Redis is unreachable or still replaying its AOF after a restart, every API call that
needs it answers UNAVAILABLE with reason DEPENDENCY_UNAVAILABLE (retryable), whichever service
it reaches, never UNKNOWN. Found by the chaos suite: during a valkey-server restart, StartRun
answered UNKNOWN ("Unexpected ConnectionError") and SubmitJob UNKNOWN ("ResponseError:
LOADING").
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from cordum.sdk import AsyncClient
from cordum.sdk.errors import Unavailable
from cordum.server.app import App
from cordum.server.stack.binaries import valkey_server_path
from cordum.server.stack.process import ManagedProcess
from cordum.server.stack.services import RunningService, start_valkey

from support.cordum import app_settings, running_app
from support.waiting import eventually

WORKFLOW = {
    "id": "outage",
    "name": "one job step",
    "steps": {"a": {"type": "job", "topic": "job.t.ok.outage", "input": {}}},
}


@pytest_asyncio.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RunningService]:
    """A valkey-server of this test's own, so stopping it affects no other test."""
    service = start_valkey(data_dir=tmp_path / "data", log_path=tmp_path / "valkey.log")
    try:
        yield service
    finally:
        service.stop()


@pytest_asyncio.fixture
async def gateway(nats_url: str, own_redis: RunningService, config_dir: Path) -> AsyncIterator[App]:
    settings = app_settings(nats_url, own_redis.url, config_dir, roles=["gateway", "safety"])
    async with running_app(settings) as app:
        yield app


async def test_calls_answer_unavailable_while_redis_is_down(
    gateway: App, own_redis: RunningService
) -> None:
    async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}", timeout=20) as client:
        await client.workflows.upsert(WORKFLOW)
        started = await client.runs.start("outage")
        submitted = await client.jobs.submit(topic="job.t.ok.outage", input={})
        own_redis.stop()
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "StartRun": lambda: client.runs.start("outage"),
            "GetRun": lambda: client.runs.get(started.run_id),
            "GetWorkflow": lambda: client.workflows.get("outage"),
            "SubmitJob": lambda: client.jobs.submit(topic="job.t.ok.outage", input={}),
            "GetJob": lambda: client.jobs.get(submitted.job_id),
        }
        for name, call in calls.items():
            with pytest.raises(Unavailable) as caught:
                await call()
            assert caught.value.reason == "DEPENDENCY_UNAVAILABLE", name


def valkey_answers(port: int, prefix: bytes) -> bool:
    """A raw PING (redis-py would retry through LOADING): the reply starts with `prefix`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(prefix)
    except OSError:
        return False


async def test_submits_answer_unavailable_while_redis_replays_its_aof(
    nats_url: str, config_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = start_valkey(data_dir=data, log_path=tmp_path / "valkey.log")
    port = first.port
    try:
        # Enough keys in the AOF that the slowed replay below lasts seconds.
        filler = Redis.from_url(first.url)
        pipe = filler.pipeline(transaction=False)
        for i in range(10_000):
            pipe.set(f"filler:{i}", "x")
        await pipe.execute()
        await filler.aclose()
        settings = app_settings(
            nats_url, first.url, config_dir, roles=["gateway", "safety", "scheduler"]
        )
        async with (
            running_app(settings) as app,
            AsyncClient(f"127.0.0.1:{app.grpc_port}", timeout=20) as client,
        ):
            await client.jobs.submit(topic="job.t.ok.outage", input={})
            first.stop()
            # The same data and port, replaying the AOF slowly and answering LOADING meanwhile
            # (valkey's own test knobs: a delay per key, events served every KiB).
            argv = [
                valkey_server_path(),
                *("--bind", "127.0.0.1", "--port", str(port), "--dir", str(data)),
                *("--appendonly", "yes", "--save", ""),
                *("--key-load-delay", "300", "--loading-process-events-interval-bytes", "1024"),
            ]
            with ManagedProcess("valkey-loading", argv, log_path=tmp_path / "valkey.log"):
                await eventually(
                    lambda: asyncio.to_thread(valkey_answers, port, b"-LOADING"),
                    within=20,
                    what="valkey to replay its AOF",
                )
                with pytest.raises(Unavailable) as caught:
                    await client.jobs.submit(topic="job.t.ok.outage", input={})
                assert caught.value.reason == "DEPENDENCY_UNAVAILABLE"
                assert valkey_answers(port, b"-LOADING"), "the replay ended too soon to tell"
                # Once the replay is done, submits work again.
                await eventually(
                    lambda: asyncio.to_thread(valkey_answers, port, b"+PONG"),
                    within=60,
                    what="the replay to end",
                )
                submitted = await client.jobs.submit(topic="job.t.ok.outage", input={})
                assert submitted.job_id
    finally:
        first.stop()
