"""The worker registry: which workers are alive, what they serve, how loaded they are.

Built from `sys.heartbeat` and `sys.handshake`, subscribed without a queue group so every
process sees every worker. A CAP 2.17 Agent says which topics it serves only in its one-shot
handshake (heartbeats carry just the worker id, pool and capacity), so both are merged here.
Between heartbeats the scheduler counts its own dispatches per worker, so it does not send
every job to the same "least loaded" worker (an upstream sharp edge).

Heartbeats also say when a worker holds no job at all (`active_jobs == 0`, counted by CAP from
context fetch to result publish). Two such heartbeats in a row, received some time apart, are
what the scheduler uses to tell that a job it dispatched to the worker never arrived
(services/lost_dispatches.py): `WorkerState.idle_pair_at`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.agent.v1 import buspacket_pb2, handshake_pb2, heartbeat_pb2
from cordum.sdk import cap
from cordum.server.inbound import Inbound

logger = logging.getLogger(__name__)

# CAP workers heartbeat every 5 s; a worker is lost after ~3 missed intervals.
DEFAULT_TTL_S = 15.0
# Lost workers stay listed (include_lost) this long, then are forgotten.
DEFAULT_FORGET_S = 300.0
# Two idle heartbeats count as a pair only this far apart (receipt times): heartbeats a worker
# buffered while disconnected arrive in one burst and are one observation, and a result the
# worker published just before the first one gets this long to be applied.
DEFAULT_IDLE_GAP_S = 0.5


@dataclass
class WorkerState:
    worker_id: str
    first_seen: float
    last_seen: float
    heartbeat: heartbeat_pb2.Heartbeat = field(default_factory=heartbeat_pb2.Heartbeat)
    handshake: handshake_pb2.Handshake | None = None
    # Dispatches we made since the last heartbeat; added to the reported load.
    local_dispatches: int = 0
    # Receipt times of the heartbeats of the current run of idle ones (active_jobs == 0),
    # only as many as the pairing below needs.
    idle_run: deque[float] = field(default_factory=deque)
    # Receipt time of the first of the latest two idle heartbeats in a row (at least the
    # idle gap apart); 0 = none yet. Only grows: a job sent well before it was not on the
    # worker at either heartbeat, so unless its result is under way it never arrived.
    idle_pair_at: float = 0.0

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
        idle_gap_s: float = DEFAULT_IDLE_GAP_S,
        inbound: Inbound | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nats = nats
        # Public so an operator (or a test) can tune how fast a silent worker counts as lost.
        self.ttl_s = ttl_s
        self._forget_s = forget_s
        self.idle_gap_s = idle_gap_s
        self._inbound = inbound or Inbound()
        self._clock = clock
        self._workers: dict[str, WorkerState] = {}
        self._subs: list[Subscription] = []
        self._started_at = clock()
        # Told of every heartbeat after it is applied (the scheduler's lost-dispatch check);
        # must not block or raise.
        self._heartbeat_listeners: list[Callable[[WorkerState], None]] = []

    def add_heartbeat_listener(self, listener: Callable[[WorkerState], None]) -> None:
        self._heartbeat_listeners.append(listener)

    def remove_heartbeat_listener(self, listener: Callable[[WorkerState], None]) -> None:
        if listener in self._heartbeat_listeners:
            self._heartbeat_listeners.remove(listener)

    async def start(self) -> None:
        self._started_at = self._clock()
        self._subs = [
            await self._nats.subscribe(cap.SUBJECT_HEARTBEAT, cb=self._on_heartbeat),
            await self._nats.subscribe(cap.SUBJECT_HANDSHAKE, cb=self._on_handshake),
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []

    async def _on_heartbeat(self, msg: Msg) -> None:
        packet = self._inbound.packet(msg, "heartbeat")
        if packet is not None:
            self.observe(packet)

    async def _on_handshake(self, msg: Msg) -> None:
        packet = self._inbound.packet(msg, "handshake")
        if packet is not None:
            self.observe(packet)

    def observe(self, packet: buspacket_pb2.BusPacket) -> None:
        kind = packet.WhichOneof("payload")
        if kind == "heartbeat":
            state = self._touch(packet.heartbeat.worker_id)
            state.heartbeat.CopyFrom(packet.heartbeat)
            # The worker just reported its real load, which includes our dispatches.
            state.local_dispatches = 0
            self._note_idle(state)
            for listener in self._heartbeat_listeners:
                try:
                    listener(state)
                except Exception:
                    logger.exception("heartbeat listener failed")
        elif kind == "handshake":
            state = self._touch(packet.handshake.component_id)
            state.handshake = handshake_pb2.Handshake()
            state.handshake.CopyFrom(packet.handshake)

    def _note_idle(self, state: WorkerState) -> None:
        run = state.idle_run
        if state.heartbeat.active_jobs != 0:
            run.clear()
            return
        now = state.last_seen
        run.append(now)
        # Keep the latest earlier beat that is at least the gap before this one, and later ones.
        while len(run) > 2 and now - run[1] >= self.idle_gap_s:
            run.popleft()
        if len(run) >= 2 and now - run[0] >= self.idle_gap_s:
            state.idle_pair_at = max(state.idle_pair_at, run[0])

    def idle_since(self, worker_id: str, sent_at: float) -> bool:
        """Whether the worker reported two idle heartbeats in a row, the first received after
        `sent_at` (epoch s): a dispatch sent before that is not on the worker."""
        state = self._workers.get(worker_id)
        return state is not None and state.idle_pair_at > sent_at

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
