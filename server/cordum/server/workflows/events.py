"""Run timeline events on the bus (`<namespace>cordum.run.events`, one message per run update
holding its new events), and the gateway-side hub that feeds them to watch streams."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.server.inbound import Inbound
from cordum.v1 import run_pb2, run_service_pb2

logger = logging.getLogger(__name__)


class RunEventHub:
    """Fans run events out to local listeners by run id (one bus subscription per process)."""

    def __init__(
        self, nats: NATS, subject: str, *, queue_size: int = 256, inbound: Inbound | None = None
    ) -> None:
        self._nats = nats
        self._subject = subject
        self._queue_size = queue_size
        self._inbound = inbound or Inbound()
        self._listeners: dict[str, set[asyncio.Queue[list[run_pb2.RunEvent]]]] = defaultdict(set)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nats.subscribe(self._subject, cb=self._on_message)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        timeline = self._inbound.message(
            msg, "run_event", run_service_pb2.GetRunTimelineResponse.FromString
        )
        if timeline is None or not timeline.events:
            return
        events = list(timeline.events)
        for queue in list(self._listeners.get(events[0].run_id) or ()):
            if queue.full():
                # A slow watcher loses a batch (it re-reads the gap from the timeline).
                queue.get_nowait()
            queue.put_nowait(events)

    def listen(self, run_id: str) -> asyncio.Queue[list[run_pb2.RunEvent]]:
        queue: asyncio.Queue[list[run_pb2.RunEvent]] = asyncio.Queue(self._queue_size)
        self._listeners[run_id].add(queue)
        return queue

    def forget(self, run_id: str, queue: asyncio.Queue[list[run_pb2.RunEvent]]) -> None:
        queues = self._listeners.get(run_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._listeners[run_id]
