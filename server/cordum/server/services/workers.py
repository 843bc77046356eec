"""The worker registry: which workers are alive, what they serve, how loaded they are.

Built from `sys.heartbeat` and `sys.handshake`, subscribed without a queue group so every
process sees every worker. A CAP 2.17 Agent says which topics it serves only in its one-shot
handshake (heartbeats carry just the worker id, pool and capacity), so both are merged here.
Between heartbeats the scheduler counts its own dispatches per worker, so it does not send
every job to the same "least loaded" worker (an upstream sharp edge).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.agent.v1 import buspacket_pb2, handshake_pb2, heartbeat_pb2
from cordum.sdk import cap

logger = logging.getLogger(__name__)

# CAP workers heartbeat every 5 s; a worker is lost after ~3 missed intervals.
DEFAULT_TTL_S = 15.0
# Lost workers stay listed (include_lost) this long, then are forgotten.
DEFAULT_FORGET_S = 300.0


@dataclass
class WorkerState:
    worker_id: str
    first_seen: float
    last_seen: float
    heartbeat: heartbeat_pb2.Heartbeat = field(default_factory=heartbeat_pb2.Heartbeat)
    handshake: handshake_pb2.Handshake | None = None
    # Dispatches we made since the last heartbeat; added to the reported load.
    local_dispatches: int = 0

    @property
    def topics(self) -> list[str]:
        if self.handshake is not None and self.handshake.ready_topics:
            return list(self.handshake.ready_topics)
        return [self.heartbeat.pool] if self.heartbeat.pool else []

    @property
    def load(self) -> int:
        return self.heartbeat.active_jobs + self.local_dispatches

    @property
    def capacity(self) -> int:
        return self.heartbeat.max_parallel_jobs

    def serves(self, topic: str) -> bool:
        return topic in self.topics


class WorkerRegistry:
    def __init__(
        self,
        nats: NATS,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        forget_s: float = DEFAULT_FORGET_S,
        on_drop: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nats = nats
        # Public so an operator (or a test) can tune how fast a silent worker counts as lost.
        self.ttl_s = ttl_s
        self._forget_s = forget_s
        self._on_drop = on_drop or (lambda subject, reason: None)
        self._clock = clock
        self._workers: dict[str, WorkerState] = {}
        self._subs: list[Subscription] = []
        self._started_at = clock()

    async def start(self) -> None:
        self._started_at = self._clock()
        self._subs = [
            await self._nats.subscribe(cap.SUBJECT_HEARTBEAT, cb=self._on_message),
            await self._nats.subscribe(cap.SUBJECT_HANDSHAKE, cb=self._on_message),
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []

    async def _on_message(self, msg: Msg) -> None:
        try:
            packet = cap.decode(msg.data)
        except cap.PacketError as exc:
            self._on_drop(msg.subject, exc.reason)
            return
        self.observe(packet)

    def observe(self, packet: buspacket_pb2.BusPacket) -> None:
        kind = packet.WhichOneof("payload")
        if kind == "heartbeat":
            state = self._touch(packet.heartbeat.worker_id)
            state.heartbeat.CopyFrom(packet.heartbeat)
            # The worker just reported its real load, which includes our dispatches.
            state.local_dispatches = 0
        elif kind == "handshake":
            state = self._touch(packet.handshake.component_id)
            state.handshake = handshake_pb2.Handshake()
            state.handshake.CopyFrom(packet.handshake)

    def _touch(self, worker_id: str) -> WorkerState:
        now = self._clock()
        state = self._workers.get(worker_id)
        if state is None:
            state = self._workers[worker_id] = WorkerState(worker_id, now, now)
            logger.info("worker joined", extra={"worker_id": worker_id})
        state.last_seen = now
        return state

    def is_live(self, state: WorkerState) -> bool:
        return self._clock() - state.last_seen <= self.ttl_s

    def is_lost(self, worker_id: str) -> bool:
        """Whether a worker we dispatched to has stopped heartbeating.

        A worker this registry never heard of (this process just started, or it was
        forgotten) counts as lost only after a whole TTL without a word from it, so a
        restarted scheduler does not re-queue the jobs of workers that are fine.
        """
        state = self._workers.get(worker_id)
        if state is not None:
            return not self.is_live(state)
        return self._clock() - self._started_at > self.ttl_s

    def workers(self, *, include_lost: bool = False) -> list[WorkerState]:
        now = self._clock()
        for worker_id in [
            w for w, s in self._workers.items() if now - s.last_seen > self._forget_s
        ]:
            del self._workers[worker_id]
        states = sorted(self._workers.values(), key=lambda s: s.worker_id)
        return states if include_lost else [s for s in states if self.is_live(s)]

    def live_for_topic(self, topic: str) -> list[WorkerState]:
        return [s for s in self.workers() if s.serves(topic)]

    def note_dispatch(self, worker_id: str) -> None:
        state = self._workers.get(worker_id)
        if state is not None:
            state.local_dispatches += 1
