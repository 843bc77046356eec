"""Job state-change events on the bus, and the gateway-side hub that turns them into wake-ups
for submit-and-wait callers and watch streams.

Subjects: `<ns>cordum.job.events.<kind>.<STATE>` (kind `wf` for workflow step jobs, `job`
otherwise; see `Subjects.job_event`), so the workflow engine hears only the terminal events of
step jobs, while the hub (and any outside listener) takes `<ns>cordum.job.events.>`.

In a process that runs the gateway, this process's own events reach its hub directly (no bus
hop) and are published on a connection of their own opened with `no_echo`: other processes
still get every event, and the hub is never handed its own event a second time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.server.bus import Subjects
from cordum.server.bus_trust import BusTrust
from cordum.server.inbound import Inbound
from cordum.server.stores.jobs import TERMINAL, JobRecord, ms_timestamp, state_enum
from cordum.server.workflows.dag import JOB_ID_RE
from cordum.v1 import job_pb2

logger = logging.getLogger(__name__)

JOB_KIND = "job"
WORKFLOW_KIND = "wf"
_TERMINAL_ENUMS = frozenset(state_enum(s) for s in TERMINAL)


def event_kind(job_id: str) -> str:
    return WORKFLOW_KIND if JOB_ID_RE.match(job_id) else JOB_KIND


def new_event(job_id: str, state: str, message: str, now_ms: int | None = None) -> job_pb2.JobEvent:
    event = job_pb2.JobEvent(job_id=job_id, state=state_enum(state), message=message)
    event.time.CopyFrom(ms_timestamp(now_ms if now_ms is not None else int(time.time() * 1000)))
    return event


def job_event(job_id: str, state: str, message: str, now_ms: int | None = None) -> bytes:
    return new_event(job_id, state, message, now_ms).SerializeToString()


def is_terminal(event: job_pb2.JobEvent) -> bool:
    return event.state in _TERMINAL_ENUMS


@dataclass(frozen=True, slots=True)
class HubEvent:
    """An event as the hub hands it out. `record` and `result` come along only with a
    terminal event published in this process for a job someone here waits for (read by the
    same script call that ended the job): the waiter then needs no read of its own."""

    event: job_pb2.JobEvent
    record: JobRecord | None = None
    result: bytes | None = None


class JobEventHub:
    """Fans job events out to local listeners by job id (one bus subscription per process):
    watch streams get every event through a queue, submit-and-wait callers a future that the
    job's terminal event resolves."""

    def __init__(
        self,
        nats: NATS,
        subjects: Subjects,
        *,
        queue_size: int = 256,
        inbound: Inbound | None = None,
    ) -> None:
        self._nats = nats
        self._subjects = subjects
        self._queue_size = queue_size
        self._inbound = inbound or Inbound()
        self._listeners: dict[str, set[asyncio.Queue[HubEvent]]] = defaultdict(set)
        self._waiters: dict[str, list[asyncio.Future[HubEvent]]] = {}
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        self._subs = [
            await self._nats.subscribe(self._subjects.job_events_all, cb=self._on_message),
            await self._nats.subscribe(self._subjects.job_events, cb=self._on_message),
        ]

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        event = self._inbound.message(msg, "job_event", job_pb2.JobEvent.FromString)
        if event is not None:
            self.deliver(HubEvent(event))

    def wanted(self, job_id: str) -> bool:
        """Someone in this process listens for this job."""
        return job_id in self._waiters or job_id in self._listeners

    def deliver(self, item: HubEvent) -> None:
        job_id = item.event.job_id
        if is_terminal(item.event):
            for future in self._waiters.pop(job_id, ()):
                if not future.done():
                    future.set_result(item)
        for queue in list(self._listeners.get(job_id) or ()):
            if queue.full():
                # A slow watcher loses the oldest events, never blocks the bus.
                queue.get_nowait()
            queue.put_nowait(item)

    # -- terminal waits -------------------------------------------------------------------

    def wait_terminal(self, job_id: str) -> asyncio.Future[HubEvent]:
        """A future for the job's next terminal event. Call `forget_wait` when done with it."""
        future: asyncio.Future[HubEvent] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        return future

    def forget_wait(self, job_id: str, future: asyncio.Future[HubEvent]) -> None:
        futures = self._waiters.get(job_id)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._waiters[job_id]

    # -- streams ----------------------------------------------------------------------------

    def listen(self, job_id: str) -> asyncio.Queue[HubEvent]:
        queue: asyncio.Queue[HubEvent] = asyncio.Queue(self._queue_size)
        self._listeners[job_id].add(queue)
        return queue

    def forget(self, job_id: str, queue: asyncio.Queue[HubEvent]) -> None:
        queues = self._listeners.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._listeners[job_id]

    async def events(self, job_id: str) -> AsyncIterator[job_pb2.JobEvent]:
        queue = self.listen(job_id)
        try:
            while True:
                yield (await queue.get()).event
        finally:
            self.forget(job_id, queue)


class JobEventPublisher:
    """Publishes job events: to this process's hub directly (when there is one) and on the
    bus for everyone else. Costs one NATS publish per event."""

    def __init__(
        self,
        nats: NATS,
        subjects: Subjects,
        hub: JobEventHub | None = None,
        trust: BusTrust | None = None,
    ) -> None:
        self._nats = nats
        self._subjects = subjects
        self._hub = hub
        self._trust = trust or BusTrust()

    def wanted(self, job_id: str) -> bool:
        """A caller in this process waits for this job (its record is worth returning)."""
        return self._hub is not None and self._hub.wanted(job_id)

    async def publish(
        self,
        job_id: str,
        state: str,
        message: str = "",
        *,
        record: JobRecord | None = None,
        result: bytes | None = None,
    ) -> None:
        event = new_event(job_id, state, message)
        if self._hub is not None:
            self._hub.deliver(HubEvent(event, record, result))
        subject = self._subjects.job_event(event_kind(job_id), state)
        data = event.SerializeToString()
        await self._nats.publish(subject, data, headers=self._trust.headers(data))
