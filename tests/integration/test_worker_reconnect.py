"""The worker runtime across a nats-server restart: it comes back by itself, announces its
handshake (and a heartbeat) again at once, so a control plane learns it is back without
waiting for the next heartbeat, and takes jobs again. A private nats-server: the session's
one must not go down under the other tests."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from redis.asyncio import Redis

from cordum.agent.v1 import job_pb2
from cordum.sdk import cap
from cordum.server.stack.process import pick_free_port
from cordum.server.stack.services import RunningService, start_nats

from support.jobs import make_worker
from support.waiting import eventually


class Server:
    """nats-server on a fixed port, killed and started again on that same port."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = pick_free_port()
        self.service: RunningService | None = None

    def start(self) -> str:
        self.service = start_nats(
            data_dir=self.base / "data",
            log_path=self.base / "nats-server.log",
            port=self.port,
            jetstream=False,
        )
        return self.service.url

    def kill(self) -> None:
        assert self.service is not None
        self.service.process.send_signal(signal.SIGKILL)
        self.service.stop()  # reaps it

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.stop()


async def test_after_a_nats_restart_the_worker_announces_itself_and_serves_again(
    server: Server, redis_url: str, prefix: str
) -> None:
    url = server.start()
    topic = f"job.reconnect.{prefix}"
    worker = make_worker(f"w-{prefix}", url, redis_url, heartbeat_interval=60)

    @worker.handler(topic)
    async def echo(ctx: Any, data: Any) -> Any:
        return {"echo": data}

    seen: list[str] = []  # payload kinds the worker sent, in order
    results: list[job_pb2.JobResult] = []

    async def on_packet(msg: Msg) -> None:
        packet = cap.decode(msg.data)
        if packet.sender_id == worker.worker_id:
            kind = packet.WhichOneof("payload")
            seen.append(kind or "")
            if kind == "job_result":
                results.append(packet.job_result)

    # The observer reconnects quickly too, so it is back before the worker announces itself.
    observer = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.05)
    redis = Redis.from_url(redis_url)
    try:
        for subject in (cap.SUBJECT_HANDSHAKE, cap.SUBJECT_HEARTBEAT, cap.SUBJECT_RESULT):
            await observer.subscribe(subject, cb=on_packet)
        await observer.flush()
        async with worker:

            async def announced(count: int) -> bool:
                return seen.count("handshake") >= count

            await eventually(lambda: announced(1), within=15, what="the first handshake")
            heartbeats = seen.count("heartbeat")

            server.kill()
            server.start()

            await eventually(lambda: announced(2), within=15, what="the handshake again")
            # A heartbeat with it (the regular ones come only every 60 s here).

            async def beat_again() -> bool:
                return seen.count("heartbeat") > heartbeats

            await eventually(beat_again, within=15, what="a heartbeat after the reconnect")
            # Its subscriptions are back: a job sent to it directly is served.
            job_id = f"job-{uuid.uuid4().hex}"
            await redis.set(cap.context_key(job_id), json.dumps({"n": 1}), ex=60)
            request = job_pb2.JobRequest(
                job_id=job_id,
                topic=topic,
                context_ptr=cap.redis_pointer(cap.context_key(job_id)),
            )
            packet = cap.envelope(sender_id="test-scheduler", trace_id=job_id, job_request=request)
            await observer.publish(cap.direct_subject(worker.worker_id), cap.encode(packet))

            async def answered() -> bool:
                return any(r.job_id == job_id for r in results)

            await eventually(answered, within=15, what="the job's result")
    finally:
        await observer.close()
        await redis.aclose()
    result = next(r for r in results if r.job_id == job_id)
    assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
