"""The Cordum worker runtime: run Python functions as CAP 2.17 job handlers.

::

    worker = Worker(worker_id="echo-1")

    @worker.handler("job.echo")
    async def echo(ctx: JobContext, data: Any) -> Any:
        return {"echo": data}

    asyncio.run(worker.run())

Seen from the control plane, a :class:`Worker` behaves like a ``cap-sdk-python`` 2.17
``cap.runtime.Agent``: it queue-subscribes every handler topic (queue group = topic) and
``worker.<id>.jobs``, announces itself once on ``sys.handshake``, heartbeats on
``sys.heartbeat``, reads the job input JSON from the ``redis://`` ``context_ptr``, writes the
output JSON to ``res:<job_id>`` and publishes one ``JobResult`` per job on ``sys.job.result``,
with CAP's failure texts (``context not found``, ``handler failed``, ...).

Additions over a CAP Agent (all wire-compatible, none needs control-plane support):

* The first heartbeat goes out immediately at start (CAP waits one interval), so the control
  plane learns the worker's capacity at once. Heartbeats report real load: ``active_jobs``,
  ``cpu_load`` and ``memory_load`` (both 0-100, see :class:`_LoadSampler`) and ``labels``.
* ``sys.job.cancel`` is honoured: the handler task is cancelled and the result is
  ``JOB_STATUS_CANCELLED`` with the cancel reason as ``error_message``.
* ``budget.deadline_ms`` is enforced from the moment the handler starts: the handler is
  cancelled and the result is ``JOB_STATUS_TIMEOUT`` / ``deadline exceeded``.
* A ``job_id`` already in flight on this worker is not run a second time.
* Handlers may report progress on ``sys.job.progress`` (:meth:`JobContext.progress`).
* After a NATS reconnect the handshake (and a heartbeat) is announced again at once, and
  reconnects are tried every 0.5 s (nats-py's default is 2 s): a restarted nats-server takes
  the control plane back first, and dispatches published before the worker is back are lost
  (the control plane re-queues them once heartbeats show the worker idle).
* :meth:`Worker.stop` answers jobs that were delivered but never started with
  ``JOB_STATUS_FAILED_RETRYABLE`` / ``worker shutting down`` (they are safe to re-dispatch),
  and gives running jobs ``grace`` seconds; jobs still running after that are cancelled and
  reported the same way.
* With ``opentelemetry-api`` installed, each job is a ``cordum.job.handle`` span continuing
  the control plane's trace from the NATS headers (``traceparent``), sent on with the result
  (see ``cordum.sdk._tracing``; pass ``tracer_provider`` or configure OTel's global one).
* Handler exceptions are reported as CAP does, with the fixed text ``handler failed`` (the
  exception text never leaves the worker, it may hold secrets or user data), plus
  ``error_code`` = the exception class name. Raise :class:`JobFailed` to send a message on
  purpose: ``handler failed: <message>``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import inspect
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, NamedTuple, Self, TypeVar

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.agent.v1 import buspacket_pb2, handshake_pb2, heartbeat_pb2, job_pb2
from cordum.sdk import cap
from cordum.sdk._fastredis import FastRedis
from cordum.sdk._tracing import WorkerTracing

__all__ = ["Handler", "JobContext", "JobFailed", "Worker"]

log = logging.getLogger(__name__)
_job_log = logging.getLogger(__name__ + ".job")

T = TypeVar("T")

Handler = Callable[["JobContext", Any], Any]
"""``(ctx, data) -> JSON-able value``; ``async def`` or plain (run in a thread)."""

DEFAULT_MAX_BYTES: Final = 2 * 1024 * 1024
# Seconds between NATS reconnect attempts.
RECONNECT_WAIT_S: Final = 0.5
SDK_NAME: Final = "cordum-python"


class JobFailed(Exception):
    """Raise from a handler to fail the job with a message meant for the control plane.

    The result carries ``error_message = "handler failed: <message>"`` and
    ``error_code = code`` (default ``JobFailed``). Any other exception is reported with the
    fixed text ``handler failed`` only.
    """

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).__name__


@dataclass(frozen=True, kw_only=True, slots=True)
class JobContext:
    """Everything a handler knows about its job. ``data`` (the input JSON) is passed apart."""

    worker_id: str
    job_id: str
    trace_id: str
    topic: str
    request: job_pb2.JobRequest
    packet: buspacket_pb2.BusPacket
    env: Mapping[str, str]
    labels: Mapping[str, str]
    budget: job_pb2.Budget
    deadline_ms: int
    """``budget.deadline_ms``; 0 means no deadline. Counted from the handler's start."""
    cancelled: asyncio.Event
    """Set when the job is cancelled, times out or the worker shuts down. Async handlers are
    also cancelled (``CancelledError``); plain handlers run in a thread and must poll this."""
    logger: logging.LoggerAdapter[logging.Logger]
    started_at: float
    """``time.monotonic()`` when the handler started."""
    _report: Callable[[int, str], Awaitable[None]] = field(repr=False)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or ``None`` without one."""
        if self.deadline_ms <= 0:
            return None
        return self.started_at + self.deadline_ms / 1000 - time.monotonic()

    async def progress(self, percent: int, message: str = "") -> None:
        """Publish ``JobProgress`` on ``sys.job.progress`` (best effort: failures are logged)."""
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be within 0..100, got {percent}")
        await self._report(percent, message)


# --- per-job bookkeeping ----------------------------------------------------------------------


class _Interrupt(NamedTuple):
    """Why a job stopped before its handler finished, as it is reported."""

    status: job_pb2.JobStatus.ValueType
    message: str
    code: job_pb2.ErrorCode.ValueType = job_pb2.ERROR_CODE_UNSPECIFIED


_DEADLINE = _Interrupt(
    job_pb2.JOB_STATUS_TIMEOUT, "deadline exceeded", job_pb2.ERROR_CODE_JOB_TIMEOUT
)
_SHUTDOWN = _Interrupt(
    job_pb2.JOB_STATUS_FAILED_RETRYABLE,
    "worker shutting down",
    job_pb2.ERROR_CODE_JOB_WORKER_UNAVAILABLE,
)


@dataclass(frozen=True, slots=True)
class _Route:
    topic: str
    fn: Handler
    is_async: bool


@dataclass(eq=False, kw_only=True)
class _Job:
    packet: buspacket_pb2.BusPacket
    route: _Route
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # queued -> fetching -> running -> finishing. Once finishing (the handler is done) the
    # outcome is fixed and cancels no longer apply.
    phase: str = "queued"
    interrupt: _Interrupt | None = None
    task: asyncio.Task[None] | None = None
    handler_task: asyncio.Task[Any] | None = None
    # Its OpenTelemetry span (None without opentelemetry-api).
    span: Any = None

    @property
    def request(self) -> job_pb2.JobRequest:
        return self.packet.job_request

    @property
    def job_id(self) -> str:
        return self.packet.job_request.job_id

    def stop_with(self, interrupt: _Interrupt) -> bool:
        """Record why the job must stop and cancel its handler; the first reason wins."""
        if self.interrupt is not None or self.phase == "finishing":
            return False
        self.interrupt = interrupt
        self.cancelled.set()
        if self.handler_task is not None:
            self.handler_task.cancel()
        return True


@dataclass(frozen=True, slots=True)
class _Write:
    """A handler's output to store at ``key`` before ``result`` (its success) is sent."""

    key: str
    blob: bytes
    result: job_pb2.JobResult


@dataclass(slots=True)
class _Finish:
    job: _Job
    result: job_pb2.JobResult
    write: _Write | None
    published: asyncio.Future[None]


class _Batches(Generic[T]):
    """Runs ``handle`` on batches: whatever was added while the previous batch ran forms the
    next one, so N jobs finishing together cost one Redis round trip and one NATS flush."""

    def __init__(
        self,
        handle: Callable[[list[T]], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[Any]],
    ) -> None:
        self._handle = handle
        self._spawn = spawn
        self._items: list[T] = []
        self._running = False

    def add(self, item: T) -> None:
        self._items.append(item)
        if not self._running:
            self._running = True
            self._spawn(self._run())

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # let the deliveries already waiting join this batch
            while self._items:
                batch, self._items = self._items, []
                await self._handle(batch)
        finally:
            self._running = False


class _Slots:
    """At most ``limit`` jobs hold a slot (context fetch -> result publish).

    A semaphore whose waiters can also give up: when the job is cancelled or the worker
    stops, a waiting delivery must be answered at once instead of after a free slot.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_use = 0
        self._changed = asyncio.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    async def acquire(self, give_up: Callable[[], bool]) -> bool:
        async with self._changed:
            await self._changed.wait_for(lambda: give_up() or self._in_use < self._limit)
            if give_up():
                return False
            self._in_use += 1
            return True

    async def release(self) -> None:
        async with self._changed:
            self._in_use -= 1
            self._changed.notify_all()

    async def wake(self) -> None:
        """Make waiters re-check ``give_up``."""
        async with self._changed:
            self._changed.notify_all()


class _LoadSampler:
    """Process load for heartbeats, on the 0-100 scale of ``cpu_load``.

    ``cpu_load`` is the process's CPU time over wall time since the previous sample, as a
    percentage of ONE core, capped at 100: a Python worker's event loop is bound to one core
    (GIL), so that is its real capacity. Windows shorter than ``min_window`` keep the previous
    value (0 at first), which keeps start-up work out of the first, immediate heartbeat.
    ``memory_load`` is resident memory as a percentage of physical memory (Linux procfs; 0
    elsewhere; the host's memory, not a container limit).
    """

    def __init__(self, min_window: float = 1.0) -> None:
        self._min_window = min_window
        self._cpu = _cpu_seconds()
        self._wall = time.monotonic()
        self._cpu_load = 0.0

    def sample(self) -> tuple[float, float]:
        cpu, wall = _cpu_seconds(), time.monotonic()
        if wall - self._wall >= self._min_window:
            busy = 100.0 * (cpu - self._cpu) / (wall - self._wall)
            self._cpu_load = min(100.0, max(0.0, busy))
            self._cpu, self._wall = cpu, wall
        return self._cpu_load, _memory_percent()


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _memory_percent() -> float:
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
        total_pages = os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, IndexError):
        return 0.0
    return min(100.0, 100.0 * resident_pages / total_pages) if total_pages > 0 else 0.0


class _InputError(Exception):
    """The job's input could not be loaded; ``str()`` is CAP's ``error_message``."""


def _sdk_version() -> str:
    try:
        return importlib.metadata.version("cordum")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _check_subject_part(kind: str, value: str) -> None:
    """Reject names that would not be one literal NATS subject."""
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{kind} must be non-empty and without whitespace: {value!r}")
    tokens = value.split(".")
    if any(token in ("", "*", ">") for token in tokens):
        raise ValueError(f"{kind} must be a literal NATS subject (no wildcards): {value!r}")


def _is_async(fn: Handler) -> bool:
    # The second test covers objects with an ``async def __call__``.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(fn.__call__)


# --- the worker -----------------------------------------------------------------------------


class Worker:
    """A CAP 2.17 worker process: handlers, NATS subscriptions, heartbeats, results.

    ``max_context_bytes`` / ``max_result_bytes`` of ``None`` mean no limit;
    ``result_ttl_s=None`` writes results without expiry, like CAP (the control plane owns
    Redis hygiene). A worker is started once; use a new instance after :meth:`stop`.
    """

    def __init__(
        self,
        *,
        worker_id: str,
        nats_url: str | None = None,
        redis_url: str | None = None,
        pool: str = "",
        max_parallel: int = 1,
        heartbeat_interval: float = 5.0,
        labels: Mapping[str, str] | None = None,
        signer: cap.Signer | None = None,
        verifier: cap.Verifier | None = None,
        io_timeout: float = 5.0,
        max_context_bytes: int | None = DEFAULT_MAX_BYTES,
        max_result_bytes: int | None = DEFAULT_MAX_BYTES,
        result_ttl_s: int | None = None,
        tracer_provider: Any | None = None,
    ) -> None:
        _check_subject_part("worker_id", worker_id)
        if max_parallel < 1:
            raise ValueError("max_parallel must be >= 1")
        if heartbeat_interval <= 0 or io_timeout <= 0:
            raise ValueError("heartbeat_interval and io_timeout must be > 0")
        if result_ttl_s is not None and result_ttl_s <= 0:
            raise ValueError("result_ttl_s must be > 0 (or None for no expiry)")
        self._worker_id = worker_id
        self._nats_url = nats_url or os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
        self._redis_url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        self._pool = pool
        self._max_parallel = max_parallel
        self._heartbeat_interval = heartbeat_interval
        self._labels = dict(labels or {})
        self._signer = signer
        self._verifier = verifier
        self._io_timeout = io_timeout
        self._max_context_bytes = max_context_bytes
        self._max_result_bytes = max_result_bytes
        self._result_ttl_s = result_ttl_s
        self._sdk_version = f"{SDK_NAME}/{_sdk_version()}"
        self._tracing = WorkerTracing(tracer_provider, self._sdk_version)

        self._routes: dict[str, _Route] = {}
        self._jobs: dict[str, _Job] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = _Slots(max_parallel)
        spawn = functools.partial(self._spawn, name=f"cordum-io-{worker_id}")
        self._reads: _Batches[tuple[str, asyncio.Future[bytes]]] = _Batches(self._read_batch, spawn)
        self._finishes: _Batches[_Finish] = _Batches(self._finish_batch, spawn)
        self._load = _LoadSampler()
        self._state = "new"  # new -> starting -> running -> stopping -> stopped
        self._stopped = asyncio.Event()
        self._nc: NatsClient | None = None
        self._redis: FastRedis | None = None
        self._job_subs: list[Subscription] = []
        self._cancel_sub: Subscription | None = None

    # --- registration ---

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def topics(self) -> list[str]:
        return sorted(self._routes)

    @property
    def active_jobs(self) -> int:
        """Jobs holding a slot right now (what heartbeats report)."""
        return self._slots.in_use

    def handler(self, topic: str) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add_handler`; returns the function unchanged."""

        def register(fn: Handler) -> Handler:
            self.add_handler(topic, fn)
            return fn

        return register

    def add_handler(self, topic: str, fn: Handler) -> None:
        if self._state != "new":
            raise RuntimeError("handlers must be registered before start()")
        _check_subject_part("topic", topic)
        if topic in self._routes:
            raise ValueError(f"a handler for {topic!r} is already registered")
        self._routes[topic] = _Route(topic, fn, _is_async(fn))

    # --- life cycle ---

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, subscribe, announce the handshake and send the first heartbeat."""
        if self._state != "new":
            raise RuntimeError("a Worker can be started only once")
        if not self._routes:
            raise RuntimeError("no handlers registered")
        self._state = "starting"
        try:
            self._nc = await self._connect()
            await self._subscribe(self._nc)
            await self._publish(cap.SUBJECT_HANDSHAKE, self._handshake_packet())
            self._spawn(self._heartbeat_loop(), name=f"cordum-heartbeat-{self._worker_id}")
        except BaseException:
            await self._close_connections()
            self._state = "stopped"
            self._stopped.set()
            raise
        self._state = "running"
        log.info("worker %s serving %s", self._worker_id, ", ".join(self.topics))

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Start, serve until cancelled (or SIGTERM/SIGINT), then :meth:`stop`."""
        await self.start()
        stop_requested = asyncio.Event()
        installed = self._install_signal_handlers(stop_requested) if install_signal_handlers else []
        try:
            await stop_requested.wait()
        finally:
            loop = asyncio.get_running_loop()
            for signum in installed:
                loop.remove_signal_handler(signum)
            await self.stop()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work, let running jobs finish for up to ``grace`` seconds, disconnect.

        Deliveries that never got a slot are answered ``FAILED_RETRYABLE``
        (``worker shutting down``); so are jobs still running after ``grace`` (their handlers
        are cancelled). Results of jobs that finish in time are published as usual.
        """
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        if self._state == "stopping":
            await self._stopped.wait()
            return
        self._state = "stopping"
        deadline = asyncio.get_running_loop().time() + max(0.0, grace)
        try:
            await self._slots.wake()  # queued deliveries give up now
            await self._drain_job_subscriptions(deadline)
            await self._wait_for_jobs(deadline)
            await self._interrupt_jobs()
            await self._cancel_tasks()
            await self._close_connections()
        finally:
            self._state = "stopped"
            self._stopped.set()
            log.info("worker %s stopped", self._worker_id)

    def _install_signal_handlers(self, stop_requested: asyncio.Event) -> list[int]:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum, stop_requested)
            except (NotImplementedError, RuntimeError):  # not on this platform / thread
                continue
            installed.append(signum)
        return installed

    def _on_signal(self, signum: int, stop_requested: asyncio.Event) -> None:
        log.info("worker %s: %s received, stopping", self._worker_id, signal.Signals(signum).name)
        stop_requested.set()

    async def _connect(self) -> NatsClient:
        nc = NatsClient()
        try:
            # nats-py retries the initial connect on its own; bound it like CAP does.
            async with asyncio.timeout(self._io_timeout):
                await nc.connect(
                    servers=self._nats_url,
                    name=self._worker_id,
                    connect_timeout=self._io_timeout,
                    # A worker lives long: keep reconnecting instead of closing silently.
                    max_reconnect_attempts=-1,
                    # Be back soon after the server: what is published to us meanwhile is lost.
                    reconnect_time_wait=RECONNECT_WAIT_S,
                    drain_timeout=max(1, round(self._io_timeout)),
                    error_cb=self._on_nats_error,
                    disconnected_cb=self._on_nats_disconnected,
                    reconnected_cb=self._on_nats_reconnected,
                )
        except BaseException:
            await nc.close()
            raise
        return nc

    async def _subscribe(self, nc: NatsClient) -> None:
        # The cancel subscription exists before any job can arrive.
        self._cancel_sub = await nc.subscribe(cap.SUBJECT_CANCEL, cb=self._on_cancel_message)
        for topic, route in sorted(self._routes.items()):
            callback = functools.partial(self._on_job_message, route)
            self._job_subs.append(await nc.subscribe(topic, queue=topic, cb=callback))
        direct = cap.direct_subject(self._worker_id)
        self._job_subs.append(await nc.subscribe(direct, cb=self._on_direct_message))
        # The server has our interest once the flush returns, before anyone sees the handshake.
        await nc.flush(timeout=max(1, round(self._io_timeout)))

    async def _drain_job_subscriptions(self, deadline: float) -> None:
        subs, self._job_subs = self._job_subs, []
        if not subs:
            return
        try:
            async with asyncio.timeout_at(deadline):
                results = await asyncio.gather(*(s.drain() for s in subs), return_exceptions=True)
        except TimeoutError:
            log.warning("worker %s: draining job subscriptions timed out", self._worker_id)
            return
        for result in results:
            if isinstance(result, Exception):
                log.warning(
                    "worker %s: draining a subscription failed: %r", self._worker_id, result
                )

    async def _wait_for_jobs(self, deadline: float) -> None:
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _interrupt_jobs(self) -> None:
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        if not tasks:
            return
        for job in self._jobs.values():
            if job.stop_with(_SHUTDOWN):
                log.warning(
                    "worker %s: job %s interrupted by shutdown", self._worker_id, job.job_id
                )
        # Each job now needs at most: handler cancellation + one publish, both bounded.
        await asyncio.wait(tasks, timeout=3 * self._io_timeout)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._io_timeout)
        for task in pending:
            log.error("worker %s: task %s ignores cancellation", self._worker_id, task.get_name())

    async def _close_connections(self) -> None:
        nc = self._nc
        if nc is not None and not nc.is_closed:
            # Drain, not close: leftover deliveries are still answered (publishing stays
            # possible while subscriptions drain) and recent results are flushed.
            try:
                await nc.drain()
            except Exception as exc:
                log.warning("worker %s: NATS drain failed (%r), closing", self._worker_id, exc)
                await nc.close()
        self._nc = None
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Every task the worker starts is tracked here and awaited or cancelled by stop()."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- NATS callbacks ---

    async def _on_nats_error(self, exc: Exception) -> None:
        log.warning("worker %s: NATS error: %r", self._worker_id, exc)

    async def _on_nats_disconnected(self) -> None:
        level = logging.DEBUG if self._state in ("stopping", "stopped") else logging.WARNING
        log.log(level, "worker %s: disconnected from NATS", self._worker_id)

    async def _on_nats_reconnected(self) -> None:
        # CAP announces only once; a control plane that lost state learns our topics again.
        log.info("worker %s: reconnected to NATS, announcing again", self._worker_id)
        await self._publish(cap.SUBJECT_HANDSHAKE, self._handshake_packet())
        await self._publish(cap.SUBJECT_HEARTBEAT, self._heartbeat_packet())

    async def _on_job_message(self, route: _Route, msg: Msg) -> None:
        # Like CAP, a topic subscription runs its own handler whatever request.topic says.
        packet = self._admit(msg)
        if packet is not None:
            await self._accept(packet, route, msg.headers)

    async def _on_direct_message(self, msg: Msg) -> None:
        packet = self._admit(msg)
        if packet is None:
            return
        route = self._routes.get(packet.job_request.topic)
        if route is None:
            log.warning(
                "worker %s: no handler for topic %r on direct subject (job %s dropped)",
                self._worker_id,
                packet.job_request.topic,
                packet.job_request.job_id,
            )
            return
        await self._accept(packet, route, msg.headers)

    async def _on_cancel_message(self, msg: Msg) -> None:
        try:
            packet = cap.decode(msg.data, self._verifier)
        except cap.PacketError as exc:
            log.warning("worker %s: dropping packet on %s: %s", self._worker_id, msg.subject, exc)
            return
        if packet.WhichOneof("payload") != "job_cancel":
            return
        cancel = packet.job_cancel
        job = self._jobs.get(cancel.job_id)
        if job is None:  # every worker sees every cancel; most are for other workers
            return
        if job.stop_with(_Interrupt(job_pb2.JOB_STATUS_CANCELLED, cancel.reason or "cancelled")):
            log.info(
                "worker %s: job %s cancelled by %s: %s",
                self._worker_id,
                cancel.job_id,
                cancel.requested_by,
                cancel.reason,
            )
            await self._slots.wake()  # the job may still be waiting for a slot
        else:
            log.info("worker %s: cancel for job %s came too late", self._worker_id, cancel.job_id)

    def _admit(self, msg: Msg) -> buspacket_pb2.BusPacket | None:
        """CAP §2.5: parse, validate, verify; anything else is dropped with a warning."""
        try:
            packet = cap.decode(msg.data, self._verifier)
        except cap.PacketError as exc:
            log.warning("worker %s: dropping packet on %s: %s", self._worker_id, msg.subject, exc)
            return None
        if packet.WhichOneof("payload") != "job_request":
            log.debug(
                "worker %s: ignoring a %s packet", self._worker_id, packet.WhichOneof("payload")
            )
            return None
        return packet

    async def _accept(
        self,
        packet: buspacket_pb2.BusPacket,
        route: _Route,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Take a slot and start the job; extra deliveries wait here, in the subscription."""
        job_id = packet.job_request.job_id
        if job_id in self._jobs:
            log.info(
                "worker %s: job %s is already in flight, duplicate ignored", self._worker_id, job_id
            )
            return
        job = _Job(packet=packet, route=route)
        job.span = self._tracing.start_job(
            headers,
            {
                "cordum.job_id": job_id,
                "cordum.trace_id": packet.trace_id,
                "cordum.topic": packet.job_request.topic,
                "cordum.worker_id": self._worker_id,
            },
        )
        self._jobs[job_id] = job
        try:
            got_slot = await self._slots.acquire(
                lambda: job.interrupt is not None or self._state != "running"
            )
        except asyncio.CancelledError:  # the connection is being closed under us
            self._jobs.pop(job_id, None)
            raise
        if not got_slot:
            job.stop_with(_SHUTDOWN)  # no-op when a cancel came first
            with self._tracing.use(job.span):
                await self._finish(job, self._interrupted_result(job, execution_ms=0))
            return
        job.task = self._spawn(self._run_job(job), name=f"cordum-job-{job_id}")

    # --- running a job ---

    async def _run_job(self, job: _Job) -> None:
        # The span is current while the handler runs (its task copies this context).
        with self._tracing.use(job.span):
            await self._run_job_traced(job)

    async def _run_job_traced(self, job: _Job) -> None:
        try:
            write: _Write | None = None
            try:
                result = await self._execute(job)
                if isinstance(result, _Write):
                    result, write = result.result, result
            except Exception:  # a runtime bug; handler errors never get here
                log.exception("worker %s: job %s crashed the runtime", self._worker_id, job.job_id)
                result = self._result(job, job_pb2.JOB_STATUS_FAILED, error_message="worker error")
            await self._finish(job, result, write)
        finally:
            await self._slots.release()

    async def _execute(self, job: _Job) -> job_pb2.JobResult | _Write:
        if job.interrupt is not None:  # cancelled between getting its slot and starting
            return self._interrupted_result(job, execution_ms=0)
        job.phase = "fetching"
        try:
            data = await self._load_context(job.request.context_ptr)
        except _InputError as exc:
            return self._result(job, job_pb2.JOB_STATUS_FAILED, error_message=str(exc))
        if job.interrupt is not None:
            return self._interrupted_result(job, execution_ms=0)
        started = time.monotonic()
        task = await self._run_handler(job, data, started)
        execution_ms = int((time.monotonic() - started) * 1000)
        if job.interrupt is not None:
            return self._interrupted_result(job, execution_ms=execution_ms)
        if task.cancelled():  # the handler cancelled itself
            return self._handler_failed(job, asyncio.CancelledError(), execution_ms)
        exc = task.exception()
        if exc is not None:
            return self._handler_failed(job, exc, execution_ms)
        return self._output(job, task.result(), execution_ms)

    async def _run_handler(self, job: _Job, data: Any, started: float) -> asyncio.Task[Any]:
        """Run the handler as its own task, so cancels and the deadline can stop it."""
        ctx = self._context(job, started)
        task = self._spawn(self._invoke(job.route, ctx, data), name=f"cordum-handler-{job.job_id}")
        job.handler_task = task
        job.phase = "running"
        deadline_ms = job.request.budget.deadline_ms
        done, _ = await asyncio.wait(
            {task}, timeout=deadline_ms / 1000 if deadline_ms > 0 else None
        )
        if not done:
            job.stop_with(_DEADLINE)
        if not task.done():
            # Cancelled by a cancel, the deadline or shutdown: let it unwind, within bounds.
            _, pending = await asyncio.wait({task}, timeout=self._io_timeout)
            if pending:
                log.error(
                    "worker %s: handler of job %s ignores cancellation", self._worker_id, job.job_id
                )
        job.phase = "finishing"
        if task.done() and not task.cancelled():
            task.exception()  # mark it retrieved: an interrupted handler's error is not reported
        return task

    @staticmethod
    async def _invoke(route: _Route, ctx: JobContext, data: Any) -> Any:
        if route.is_async:
            return await route.fn(ctx, data)
        # Plain functions must not block the event loop (heartbeats, other jobs).
        value = await asyncio.to_thread(route.fn, ctx, data)
        if inspect.isawaitable(value):
            value = await value
        return value

    def _context(self, job: _Job, started: float) -> JobContext:
        request = job.request
        extra = {
            "worker_id": self._worker_id,
            "job_id": job.job_id,
            "trace_id": job.packet.trace_id,
        }
        return JobContext(
            worker_id=self._worker_id,
            job_id=job.job_id,
            trace_id=job.packet.trace_id,
            topic=request.topic,
            request=request,
            packet=job.packet,
            env=dict(request.env),
            labels=dict(request.labels),
            budget=request.budget,
            deadline_ms=request.budget.deadline_ms,
            cancelled=job.cancelled,
            logger=logging.LoggerAdapter(_job_log, extra),
            started_at=started,
            _report=functools.partial(self._report_progress, job),
        )

    async def _load_context(self, ptr: str) -> Any:
        """CAP §2.6: GET the ``redis://`` key on our own Redis; UTF-8 JSON, size-bounded.
        The GETs of jobs starting together share one pipeline (one round trip)."""
        try:
            key = cap.pointer_key(ptr)
        except ValueError as exc:
            raise _InputError(str(exc)) from exc
        fetched: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._reads.add((key, fetched))
        raw = await fetched
        if self._max_context_bytes is not None and len(raw) > self._max_context_bytes:
            raise _InputError("context exceeds max size")
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise _InputError(f"context decode failed: {exc}") from exc

    async def _read_batch(self, items: list[tuple[str, asyncio.Future[bytes]]]) -> None:
        def fail(error: _InputError) -> None:
            for _, fetched in items:
                if not fetched.done():
                    fetched.set_exception(error)

        try:
            async with asyncio.timeout(self._io_timeout):
                values = await self._redis_client().execute([("GET", key) for key, _ in items])
        except TimeoutError:
            fail(_InputError("context fetch timed out"))
            return
        except (OSError, ValueError) as exc:
            fail(_InputError(str(exc)))
            return
        for (_, fetched), value in zip(items, values, strict=True):
            if fetched.done():
                continue
            if isinstance(value, Exception):
                fetched.set_exception(_InputError(str(value)))
            elif value is None:
                fetched.set_exception(_InputError("context not found"))
            else:
                fetched.set_result(value)

    def _output(self, job: _Job, value: Any, execution_ms: int) -> job_pb2.JobResult | _Write:
        """The handler's value as the write of ``res:<job_id>`` and the success it leads to,
        or the failure when it cannot be written."""
        try:
            # CAP's encoding (json.dumps defaults), except NaN/Infinity: they are not JSON.
            blob = json.dumps(value, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            return self._write_failed(job, str(exc), execution_ms)
        if self._max_result_bytes is not None and len(blob) > self._max_result_bytes:
            return self._write_failed(job, "result exceeds max size", execution_ms)
        key = cap.result_key(job.job_id)
        success = self._result(
            job,
            job_pb2.JOB_STATUS_SUCCEEDED,
            result_ptr=cap.redis_pointer(key),
            execution_ms=execution_ms,
        )
        return _Write(key, blob, success)

    def _write_failed(self, job: _Job, reason: str, execution_ms: int) -> job_pb2.JobResult:
        return self._result(
            job,
            job_pb2.JOB_STATUS_FAILED,
            error_message=f"result write failed: {reason}",
            execution_ms=execution_ms,
        )

    def _handler_failed(
        self, job: _Job, exc: BaseException, execution_ms: int
    ) -> job_pb2.JobResult:
        if isinstance(exc, JobFailed):
            log.warning("worker %s: job %s failed: %s", self._worker_id, job.job_id, exc.message)
            message, code = f"handler failed: {exc.message}", exc.code
        else:
            log.error(
                "worker %s: handler of job %s raised", self._worker_id, job.job_id, exc_info=exc
            )
            message, code = "handler failed", type(exc).__name__
        return self._result(
            job,
            job_pb2.JOB_STATUS_FAILED,
            error_message=message,
            error_code=code,
            execution_ms=execution_ms,
        )

    def _interrupted_result(self, job: _Job, *, execution_ms: int) -> job_pb2.JobResult:
        interrupt = job.interrupt or _SHUTDOWN
        return self._result(
            job,
            interrupt.status,
            error_message=interrupt.message,
            error_code_enum=interrupt.code,
            execution_ms=execution_ms,
        )

    def _result(
        self, job: _Job, status: job_pb2.JobStatus.ValueType, **fields: Any
    ) -> job_pb2.JobResult:
        return job_pb2.JobResult(
            job_id=job.job_id, status=status, worker_id=self._worker_id, **fields
        )

    async def _finish(
        self, job: _Job, result: job_pb2.JobResult, write: _Write | None = None
    ) -> None:
        """Write the output (if any), then publish the result; the job stays 'in flight'
        (duplicates ignored) until then. Jobs finishing together share one Redis pipeline
        and one NATS flush."""
        published: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finishes.add(_Finish(job, result, write, published))
        try:
            await published
        finally:
            self._jobs.pop(job.job_id, None)

    async def _finish_batch(self, items: list[_Finish]) -> None:
        try:
            writes = [item for item in items if item.write is not None]
            if writes:
                await self._write_outputs(writes)
            nc = self._nc
            if nc is None:
                return
            try:
                async with asyncio.timeout(self._io_timeout):
                    for item in items:
                        packet = cap.envelope(
                            sender_id=self._worker_id,
                            trace_id=item.job.packet.trace_id,
                            job_result=item.result,
                        )
                        result, span = item.result, item.job.span
                        if span is not None:
                            status = job_pb2.JobStatus.Name(result.status)
                            self._tracing.finish(span, status, result.error_message)
                        await nc.publish(
                            cap.SUBJECT_RESULT,
                            cap.encode(packet, signer=self._signer),
                            headers=self._tracing.headers(span),
                        )
            except Exception as exc:
                log.error(
                    "worker %s: publish on %s failed: %r", self._worker_id, cap.SUBJECT_RESULT, exc
                )
        finally:
            for item in items:
                if not item.published.done():
                    item.published.set_result(None)

    async def _write_outputs(self, items: list[_Finish]) -> None:
        """SET every ``res:<job_id>``; an item whose write failed gets the failure result."""
        ttl = () if self._result_ttl_s is None else ("EX", self._result_ttl_s)
        commands = []
        for item in items:
            assert item.write is not None
            commands.append(("SET", item.write.key, item.write.blob, *ttl))
        replies: list[Any]
        try:
            async with asyncio.timeout(self._io_timeout):
                replies = await self._redis_client().execute(commands)
        except TimeoutError:
            replies = [TimeoutError()] * len(items)
        except (OSError, ValueError) as exc:
            replies = [exc] * len(items)
        for item, reply in zip(items, replies, strict=True):
            if isinstance(reply, Exception):
                reason = "timed out" if isinstance(reply, TimeoutError) else str(reply)
                item.result = self._write_failed(item.job, reason, item.result.execution_ms)

    async def _report_progress(self, job: _Job, percent: int, message: str) -> None:
        progress = job_pb2.JobProgress(
            job_id=job.job_id, percent=percent, message=message, status=job_pb2.JOB_STATUS_RUNNING
        )
        packet = cap.envelope(
            sender_id=self._worker_id, trace_id=job.packet.trace_id, job_progress=progress
        )
        await self._publish(cap.SUBJECT_PROGRESS, packet)

    # --- announcements ---

    def _handshake_packet(self) -> buspacket_pb2.BusPacket:
        handshake = handshake_pb2.Handshake(
            component_id=self._worker_id,
            role=handshake_pb2.COMPONENT_ROLE_WORKER,
            supported_versions=[cap.PROTOCOL_VERSION],
            capabilities=dict.fromkeys(self._routes, True),
            sdk_version=self._sdk_version,
            ready_topics=self.topics,
        )
        return cap.envelope(
            sender_id=self._worker_id, trace_id=uuid.uuid4().hex, handshake=handshake
        )

    def _heartbeat_packet(self) -> buspacket_pb2.BusPacket:
        cpu_load, memory_load = self._load.sample()
        heartbeat = heartbeat_pb2.Heartbeat(
            worker_id=self._worker_id,
            pool=self._pool,
            active_jobs=self._slots.in_use,
            max_parallel_jobs=self._max_parallel,
            labels=self._labels,
            cpu_load=cpu_load,
            memory_load=memory_load,
        )
        # CAP uses the worker id as the heartbeat's trace id.
        return cap.envelope(
            sender_id=self._worker_id, trace_id=self._worker_id, heartbeat=heartbeat
        )

    async def _heartbeat_loop(self) -> None:
        # First beat right away (CAP waits one interval): capacity is known from the start.
        while True:
            await self._publish(cap.SUBJECT_HEARTBEAT, self._heartbeat_packet())
            await asyncio.sleep(self._heartbeat_interval)

    # --- I/O helpers ---

    def _redis_client(self) -> FastRedis:
        # Lazy like CAP: a worker starts without Redis; only its jobs fail. A lean pipelined
        # connection: the GETs and SETs of jobs running together share a round trip.
        if self._redis is None:
            self._redis = FastRedis.from_url(self._redis_url)
        return self._redis

    async def _publish(self, subject: str, packet: buspacket_pb2.BusPacket) -> bool:
        """Encode (and sign) then publish; failures are logged, never raised."""
        nc = self._nc
        if nc is None:
            return False
        data = cap.encode(packet, signer=self._signer)
        try:
            async with asyncio.timeout(self._io_timeout):
                await nc.publish(subject, data)
        except Exception as exc:
            log.error("worker %s: publish on %s failed: %r", self._worker_id, subject, exc)
            return False
        return True
