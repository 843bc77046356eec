"""Live bus events for every stream transport: StreamEvents over gRPC (server-sent events
through Envoy) and the WebSocket bridge. One service, one set of bus subscriptions per
process, fanned out in process to every open stream.

The path of a message, and why nothing on it waits for a client:

    NATS callback ──put_nowait──► inbox (bounded) ──► pump task: decode; whose job/run is it
    (cached, one Redis pipeline per drained batch) ──append──► each matching stream's queue

- The NATS callbacks only enqueue, so a slow client (or Redis) never holds up the NATS
  client. If the pump falls `INBOX_LIMIT` messages behind, events would be lost; rather than
  leave silent gaps, every stream is ended (`stream_end`, "server overloaded").
- Each stream has a bounded queue. A stream whose queue is full is detached at once (it
  costs the pump nothing more) and gets `stream_end` after the events it already has; its
  transport then closes it. A transport that can cut its connection (`on_stuck`: the
  WebSocket) does so when its client stops reading altogether (nothing taken from the queue
  for `grace_s`), freeing its buffers; either way what a stalled client pins is bounded.
- The bus subscriptions exist only while some stream is open: an idle gateway decodes no
  heartbeats, results or job events for nobody.

Scoping: an event about a job is its job's (tenant, topic, run), read from the job record;
an event about a run alone is its run's tenant. Events about jobs or runs this control
plane does not know (another control plane on the same NATS, or expired) are not shown.
Worker heartbeats, handshakes and `sys.alert` belong to no tenant: keys for every tenant
see them, tenant-bound keys do not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from cordum.server.errors import Violations, unavailable
from cordum.server.inbound import Inbound
from cordum.server.metrics import Metrics
from cordum.server.safety import glob
from cordum.server.services.caller import Caller
from cordum.server.services.event_sources import (
    KINDS,
    STREAM_END,
    STREAM_START,
    Source,
    control_event,
)
from cordum.server.services.job_validation import ID_RE
from cordum.server.stores.event_scopes import JobScope, ScopeStore
from cordum.v1 import event_pb2

logger = logging.getLogger(__name__)

# Bus messages waiting for the pump before the streams are ended as overloaded.
INBOX_LIMIT = 10_000
# Messages the pump handles per Redis round trip at most; between batches it yields, so
# the streams' transports get to send (a burst is spread over several turns of the loop).
MAX_BATCH = 128
# Job and run owners remembered (they never change); a miss costs one pipelined HGET.
SCOPE_CACHE = 20_000
MAX_TOPIC = 200

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class EndReason:
    # Metric label: slow_consumer, overloaded, interrupted, shutdown.
    code: str
    message: str


SHUTDOWN = EndReason("shutdown", "server shutting down")
OVERLOADED = EndReason("overloaded", "server overloaded: bus events were lost; reconnect")


def _now() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


# -- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventFilter:
    """What one stream wants. `tenant` None: every tenant (a key for `*`)."""

    tenant: str | None = None
    kinds: frozenset[str] = frozenset()
    topic: glob.Glob | None = None
    job_id: str = ""
    run_id: str = ""

    @classmethod
    def build(
        cls,
        caller: Caller,
        *,
        kinds: Sequence[str] = (),
        topic: str = "",
        job_id: str = "",
        run_id: str = "",
    ) -> EventFilter:
        """Raises INVALID_ARGUMENT naming every bad field. `kinds` entries may also be
        comma-separated lists (`?kinds=job_state,job_result`)."""
        v = Violations()
        wanted = {k.strip() for item in kinds for k in item.split(",") if k.strip()}
        unknown = sorted(wanted - KINDS)
        if unknown:
            v.add("kinds", f"unknown kind(s) {unknown}; known: {', '.join(sorted(KINDS))}")
        compiled = None
        if topic:
            problem = glob.validate(topic) if len(topic) <= MAX_TOPIC else "too long"
            if problem is None:
                compiled = glob.compile_glob(topic)
            else:
                v.add("topic", f"not a valid topic glob ({problem}), e.g. `job.billing.*`")
        for name, value in (("job_id", job_id), ("run_id", run_id)):
            if value and not ID_RE.match(value):
                allowed = ID_RE.pattern.removeprefix("^").removesuffix("$")
                v.add(name, f"must match {allowed}")
        v.raise_if_any()
        return cls(
            tenant=caller.tenant,
            kinds=frozenset(wanted),
            topic=compiled,
            job_id=job_id,
            run_id=run_id,
        )

    def matches(self, event: event_pb2.Event, tenant: str | None) -> bool:
        if self.tenant is not None and tenant != self.tenant:
            return False
        if self.kinds and event.kind not in self.kinds:
            return False
        if self.job_id and event.job_id != self.job_id:
            return False
        if self.run_id and event.run_id != self.run_id:
            return False
        return self.topic is None or (bool(event.topic) and self.topic.match(event.topic))


# -- one stream ------------------------------------------------------------------------------


class Subscription:
    """One open stream: a bounded queue the pump appends to, iterated by the transport.
    Iteration yields `stream_start`, the matching events, and, once the stream is ended,
    what is still queued followed by one `stream_end`."""

    def __init__(self, event_filter: EventFilter, limit: int, transport: str) -> None:
        self.filter = event_filter
        self.transport = transport
        self._limit = limit
        self._items: deque[event_pb2.Event] = deque()
        self._wake = asyncio.Event()
        self.end_reason: EndReason | None = None
        self.ended = asyncio.Event()
        self._final_sent = False
        # Events handed to the transport so far (the watchdog's sign of life).
        self.taken = 0
        self.offer(control_event(STREAM_START, "subscribed", _now()))

    def offer(self, event: event_pb2.Event) -> bool:
        """Queue `event`; False when the queue is full (the stream is too slow)."""
        if len(self._items) >= self._limit:
            return False
        self._items.append(event)
        self._wake.set()
        return True

    def end(self, reason: EndReason) -> None:
        if self.end_reason is None:
            self.end_reason = reason
            self.ended.set()
            self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> event_pb2.Event:
        while True:
            if self._items:
                self.taken += 1
                return self._items.popleft()
            if self.end_reason is not None:
                if self._final_sent:
                    raise StopAsyncIteration
                self._final_sent = True
                self.taken += 1
                return control_event(STREAM_END, self.end_reason.message, _now())
            self._wake.clear()
            await self._wake.wait()


# -- the service ---------------------------------------------------------------------------


class _LRU(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, key: K) -> bool:
        return key in self._items


class EventStreams:
    def __init__(
        self,
        nats: NATS,
        sources: Sequence[Source],
        scopes: ScopeStore,
        *,
        inbound: Inbound | None = None,
        queue_size: int = 256,
        grace_s: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._nats = nats
        self._sources = list(sources)
        self._scopes = scopes
        self._inbound = inbound or Inbound()
        self.queue_size = queue_size
        self.grace_s = grace_s
        self._metrics = metrics
        self._streams: set[Subscription] = set()
        self._inbox: asyncio.Queue[tuple[Source, Msg]] = asyncio.Queue(INBOX_LIMIT)
        self._nats_subs: list[NatsSubscription] = []
        self._lock = asyncio.Lock()
        self._pump_task: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        self._jobs: _LRU[str, JobScope] = _LRU(SCOPE_CACHE)
        self._runs: _LRU[str, str] = _LRU(SCOPE_CACHE)
        self._stopped = False

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def listening(self) -> bool:
        """Whether the bus subscriptions are up (only while some stream is open)."""
        return bool(self._nats_subs)

    async def start(self) -> None:
        self._pump_task = asyncio.get_running_loop().create_task(
            self._pump(), name="event-streams-pump"
        )

    async def stop(self) -> None:
        self._stopped = True
        self.end_all(SHUTDOWN)
        for task in [*self._chores, self._pump_task]:
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        await self._unsubscribe()

    def end_all(self, reason: EndReason) -> None:
        """End every open stream (each gets `stream_end` with `reason` after its queue)."""
        for stream in list(self._streams):
            self._detach(stream, reason)

    # -- opening a stream ----------------------------------------------------------------

    @asynccontextmanager
    async def open(
        self,
        event_filter: EventFilter,
        *,
        transport: str,
        on_stuck: Callable[[], None] | None = None,
    ) -> AsyncIterator[Subscription]:
        """A live stream for the duration of the block. The bus subscriptions are up before
        this returns, so every event published after it is delivered (`stream_start`, the
        first event, says so to the client). `on_stuck` cuts the transport: it is called
        when an ended stream's transport takes nothing from its queue for `grace_s`."""
        stream = Subscription(event_filter, self.queue_size, transport)
        async with self._lock:
            if self._stopped:
                raise unavailable("the server is shutting down")
            try:
                await self._subscribe()
            except Exception as error:
                logger.warning("event streams cannot subscribe to the bus: %s", error)
                raise unavailable(f"the bus is unavailable: {error}") from error
            self._streams.add(stream)
        if self._metrics is not None:
            self._metrics.event_streams.labels(transport).inc()
        watchdog = None
        if on_stuck is not None:
            watchdog = asyncio.get_running_loop().create_task(self._watch(stream, on_stuck))
        try:
            yield stream
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if self._metrics is not None:
                self._metrics.event_streams.labels(transport).dec()
            self._streams.discard(stream)
            self._maybe_idle()

    async def _watch(self, stream: Subscription, on_stuck: Callable[[], None]) -> None:
        """Cut an ended stream whose transport took nothing from its queue for `grace_s`
        (a client still reading its backlog is left to finish it)."""
        await stream.ended.wait()
        taken = -1
        while taken != stream.taken:
            taken = stream.taken
            await asyncio.sleep(self.grace_s)
        logger.info("event stream (%s) did not take its last event; cutting it", stream.transport)
        on_stuck()

    def _detach(self, stream: Subscription, reason: EndReason) -> None:
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        stream.end(reason)
        if self._metrics is not None:
            self._metrics.event_streams_ended.labels(reason.code).inc()
        self._maybe_idle()

    # -- bus subscriptions -----------------------------------------------------------------

    async def _subscribe(self) -> None:
        """Called with the lock held."""
        if self._nats_subs:
            return
        try:
            for source in self._sources:
                self._nats_subs.append(
                    await self._nats.subscribe(source.subject, cb=self._receiver(source))
                )
            # The server has every SUB once this returns: nothing published later is missed.
            await self._nats.flush()
        except BaseException:
            await self._unsubscribe_locked()
            raise

    def _receiver(self, source: Source) -> Callable[[Msg], object]:
        async def receive(msg: Msg) -> None:
            try:
                self._inbox.put_nowait((source, msg))
            except asyncio.QueueFull:
                self._overloaded()

        return receive

    def _overloaded(self) -> None:
        if self._streams:
            logger.warning("event streams overloaded (%d bus messages waiting)", INBOX_LIMIT)
            self.end_all(OVERLOADED)

    def _maybe_idle(self) -> None:
        if not self._streams and self._nats_subs:
            task = asyncio.get_running_loop().create_task(self._unsubscribe())
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)

    async def _unsubscribe(self) -> None:
        async with self._lock:
            if not self._streams:
                await self._unsubscribe_locked()

    async def _unsubscribe_locked(self) -> None:
        subs, self._nats_subs = self._nats_subs, []
        for sub in subs:
            with suppress(Exception):  # the connection may be closing
                await sub.unsubscribe()

    # -- the pump --------------------------------------------------------------------------

    async def _pump(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while len(batch) < MAX_BATCH and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            if not self._streams:
                continue
            try:
                await self._deliver(batch)
            except Exception as error:
                logger.exception("event streams: a batch of %d bus messages failed", len(batch))
                self.end_all(EndReason("interrupted", f"event stream interrupted: {error}"))
            await asyncio.sleep(0)

    async def _deliver(self, batch: list[tuple[Source, Msg]]) -> None:
        now = _now()
        events: list[event_pb2.Event] = []
        for source, msg in batch:
            # Never raises: what does not decode (or verify) is dropped and counted.
            events.extend(source.decode(msg, self._inbound, now))
        await self._learn_scopes(events)
        for event in events:
            known, tenant = self._scope(event)
            if not known:
                continue
            for stream in list(self._streams):
                if stream.filter.matches(event, tenant) and not stream.offer(event):
                    self._detach(stream, self._too_slow())

    def _too_slow(self) -> EndReason:
        return EndReason(
            "slow_consumer",
            f"client too slow: more than {self.queue_size} events waiting; reconnect and "
            "read faster, or ask for fewer events (kinds, topic, job_id, run_id)",
        )

    async def _learn_scopes(self, events: list[event_pb2.Event]) -> None:
        jobs = sorted({e.job_id for e in events if e.job_id and e.job_id not in self._jobs})
        runs = sorted({e.run_id for e in events if e.run_id and e.run_id not in self._runs})
        if not jobs and not runs:
            return
        found_jobs, found_runs = await self._scopes.read(jobs, runs)
        for job_id, scope in found_jobs.items():
            self._jobs.put(job_id, scope)
        for run_id, tenant in found_runs.items():
            self._runs.put(run_id, tenant)

    def _scope(self, event: event_pb2.Event) -> tuple[bool, str | None]:
        """(whether this control plane knows what the event is about, its tenant); the
        tenant is None for events about no job or run (workers, platform alerts)."""
        if event.job_id:
            job = self._jobs.get(event.job_id)
            if job is not None:
                event.topic = job.topic
                if not event.run_id:
                    event.run_id = job.run_id
                return True, job.tenant
        if event.run_id:
            tenant = self._runs.get(event.run_id)
            if tenant is not None:
                return True, tenant
        if event.job_id or event.run_id:
            return False, None
        return True, None
