"""A hand-made CAP worker for tests that need to control what a worker says: it announces
itself for one topic, heartbeats every 0.1 s reporting `active` jobs (whatever it really
holds), records the jobs delivered to it and answers only when told to."""

from __future__ import annotations

import asyncio
import contextlib

import nats
from nats.aio.msg import Msg

from cordum.agent.v1 import buspacket_pb2, handshake_pb2, heartbeat_pb2
from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap

from support.jobs import result_packet


class HandWorker:
    """`silent_after_job`: stop heartbeating once a job arrives, as if the worker hung or its
    host died with the job."""

    def __init__(
        self, worker_id: str, topic: str, nats_url: str, *, silent_after_job: bool = False
    ) -> None:
        self.worker_id = worker_id
        self.topic = topic
        self.nats_url = nats_url
        self.silent_after_job = silent_after_job
        self.active = 0
        self.deliveries: list[str] = []
        self.got_job = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HandWorker:
        self.nc = await nats.connect(self.nats_url)
        await self.nc.subscribe(cap.direct_subject(self.worker_id), cb=self._on_job)
        await self.nc.flush()
        handshake = handshake_pb2.Handshake(
            component_id=self.worker_id,
            role=handshake_pb2.COMPONENT_ROLE_WORKER,
            supported_versions=[cap.PROTOCOL_VERSION],
            ready_topics=[self.topic],
        )
        packet = cap.envelope(sender_id=self.worker_id, trace_id="hs", handshake=handshake)
        await self.nc.publish(cap.SUBJECT_HANDSHAKE, cap.encode(packet))
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.nc.close()

    async def _on_job(self, msg: Msg) -> None:
        self.deliveries.append(buspacket_pb2.BusPacket.FromString(msg.data).job_request.job_id)
        self.active = 1  # reported from the next heartbeat on, as CAP counts it
        self.got_job.set()

    async def _beat(self) -> None:
        while not (self.silent_after_job and self.got_job.is_set()):
            beat = heartbeat_pb2.Heartbeat(
                worker_id=self.worker_id, active_jobs=self.active, max_parallel_jobs=1
            )
            packet = cap.envelope(sender_id=self.worker_id, trace_id=self.worker_id, heartbeat=beat)
            await self.nc.publish(cap.SUBJECT_HEARTBEAT, cap.encode(packet))
            await asyncio.sleep(0.1)

    async def answer(self, job_id: str) -> None:
        data = result_packet(job_id, agent.JOB_STATUS_SUCCEEDED, worker_id=self.worker_id)
        await self.nc.publish(cap.SUBJECT_RESULT, data)
        await self.nc.flush()
