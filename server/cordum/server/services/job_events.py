"""Job state-change events on the bus (`cordum.job.events`), and the gateway-side hub that
turns them into wake-ups for submit-and-wait callers and watch streams."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.server.stores.jobs import TERMINAL, ms_timestamp, state_enum, state_name
from cordum.v1 import job_pb2

logger = logging.getLogger(__name__)


def job_event(job_id: str, state: str, message: str, now_ms: int | None = None) -> bytes:
    event = job_pb2.JobEvent(job_id=job_id, state=state_enum(state), message=message)
    event.time.CopyFrom(ms_timestamp(now_ms if now_ms is not None else int(time.time() * 1000)))
    return event.SerializeToString()


class JobEventPublisher:
    def __init__(self, nats: NATS, subject: str) -> None:
        self._nats = nats
        self._subject = subject

    async def publish(self, job_id: str, state: str, message: str = "") -> None:
        await self._nats.publish(self._subject, job_event(job_id, state, message))


class JobEventHub:
    """Fans job events out to local listeners by job id (one bus subscription per process)."""

    def __init__(self, nats: NATS, subject: str, *, queue_size: int = 256) -> None:
        self._nats = nats
        self._subject = subject
        self._queue_size = queue_size
        self._listeners: dict[str, set[asyncio.Queue[job_pb2.JobEvent]]] = defaultdict(set)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nats.subscribe(self._subject, cb=self._on_message)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        listeners = None
        try:
            event = job_pb2.JobEvent.FromString(msg.data)
            listeners = self._listeners.get(event.job_id)
        except Exception:  # a foreign or corrupt message on our subject
            logger.warning("dropped undecodable job event")
            return
        for queue in list(listeners or ()):
            if queue.full():
                # A slow watcher loses the oldest events, never blocks the bus.
                queue.get_nowait()
            queue.put_nowait(event)

    def listen(self, job_id: str) -> asyncio.Queue[job_pb2.JobEvent]:
        queue: asyncio.Queue[job_pb2.JobEvent] = asyncio.Queue(self._queue_size)
        self._listeners[job_id].add(queue)
        return queue

    def forget(self, job_id: str, queue: asyncio.Queue[job_pb2.JobEvent]) -> None:
        queues = self._listeners.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._listeners[job_id]

    async def events(self, job_id: str) -> AsyncIterator[job_pb2.JobEvent]:
        queue = self.listen(job_id)
        try:
            while True:
                yield await queue.get()
        finally:
            self.forget(job_id, queue)


def is_terminal(event: job_pb2.JobEvent) -> bool:
    return state_name(event.state) in TERMINAL
