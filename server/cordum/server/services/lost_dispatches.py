"""Dispatches that never reached their worker, told apart by the worker's idle heartbeats.

Plain NATS drops a message nobody is subscribed to: a dispatch published on `worker.<id>.jobs`
while that worker is reconnecting (after a nats-server restart the control plane is often back
before the workers), restarting, or that it otherwise missed. CAP 2.17 workers never report
RUNNING, so such a job would sit DISPATCHED until its deadline or the running timeout (hours).

The rule. A job sent to worker W at time T was lost when W then reported `active_jobs == 0` in
two heartbeats in a row, the first received more than `grace_s` after T, the two at least the
registry's idle gap apart (`WorkerState.idle_pair_at`). CAP counts a job from its context fetch
to its result publish, so at both heartbeats the job was not on W: it never arrived, or it was
finished and its result published before the first of them. So, if the job is still
DISPATCHED by that same dispatch (compare-and-set on `dispatched_ms` and `attempts`: a result
or a newer dispatch that landed meanwhile wins):
- `res:<id>` exists: the worker finished it and only its result message is late or lost;
  complete it from the stored result, as the reconciler does;
- otherwise re-queue it without charging the attempt (as the reconciler does for a dispatcher
  that died) and say why in its event log.
At most `max_requeues` times per job (`lost_dispatches` on the record): a worker that keeps
dropping a job, or that never reports its load, must not loop it forever; past that the job
is left to its deadline and the timeouts, as before.

Two paths apply the rule:
- fast, in the scheduler replica that dispatched the job: it remembers its own dispatches to
  known workers in memory (bounded by count and age, forgotten when it applies their result)
  and, when a heartbeat completes an idle pair of that worker, checks the ones sent before it
  with one pipelined read. A heartbeat costs no Redis work unless this replica has such
  candidates; each dispatch is read at most once.
- fallback, in the reconciler's scan of DISPATCHED jobs, which it reads anyway: a restarted
  scheduler (its memory is gone), entries evicted from memory, a dispatch whose publish
  failed. Every replica hears every heartbeat, so any replica's registry can judge any job.

Jobs published on the topic subject (no live worker known for the topic) are not judged: any
connected worker in the topic's queue group may hold them, including workers that never
heartbeat (CAP `run_worker`). They keep the reconciler's `dispatch_timeout_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.server.metrics import Metrics
from cordum.server.services.job_events import JobEventPublisher
from cordum.server.services.workers import WorkerRegistry, WorkerState
from cordum.server.stores.jobs import JobStore

logger = logging.getLogger(__name__)

# How many times one job may be re-queued as lost (record field).
LOST_FIELD = "lost_dispatches"


@dataclass(frozen=True, slots=True)
class Dispatch:
    job_id: str
    worker_id: str
    # As the admission stored it on the record (identifies the dispatch).
    dispatched_ms: int
    # When it was published (epoch s).
    sent_at: float


@dataclass(frozen=True)
class Settled:
    requeued: int = 0
    recovered: int = 0


async def requeue(
    store: JobStore,
    events: JobEventPublisher,
    job_id: str,
    *,
    from_state: str,
    now_ms: int,
    why: str,
    fields: dict[str, str | bytes | int] | None = None,
    expect: dict[str, str | bytes | int] | None = None,
) -> bool:
    """Back to PENDING (compare-and-set on the state and `expect`), due now, announced."""
    outcome = await store.transition(
        job_id,
        allowed_from=[from_state],
        to="PENDING",
        message=f"re-queued: {why}",
        now_ms=now_ms,
        fields={"pending_reason": why, **(fields or {})},
        expect=expect,
    )
    if outcome.ok:
        await store.schedule_due(job_id, now_ms)
        await events.publish(job_id, "PENDING", why)
    return outcome.ok


def stored_result(job_id: str, worker_id: str) -> agent.JobResult:
    """The result of a job whose worker wrote `res:<id>` but whose result message is late
    or lost: applied like the message would have been."""
    return agent.JobResult(
        job_id=job_id,
        status=agent.JOB_STATUS_SUCCEEDED,
        result_ptr=cap.redis_pointer(cap.result_key(job_id)),
        worker_id=worker_id,
    )


def _int(value: bytes | None) -> int:
    return int(value) if value else 0


class LostDispatches:
    def __init__(
        self,
        *,
        store: JobStore,
        registry: WorkerRegistry,
        events: JobEventPublisher,
        complete: Callable[[list[agent.JobResult]], Awaitable[None]],
        metrics: Metrics,
        grace_s: float = 1.0,
        max_requeues: int = 3,
        max_tracked: int = 50_000,
        max_age_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.registry = registry
        self.events = events
        self._complete = complete
        self.metrics = metrics
        # Publish -> delivery -> counted in active_jobs must fit in it. Public so an operator
        # (or a test) can tune it.
        self.grace_s = grace_s
        self.max_requeues = max_requeues
        # Memory bounds; the reconciler's scan covers whatever is dropped (0 = track nothing).
        self.max_tracked = max_tracked
        self.max_age_s = max_age_s
        self._clock = clock
        # Every tracked dispatch in the order sent (oldest first), and the same per worker.
        # OrderedDicts: a plain dict whose oldest entries keep being deleted makes finding
        # the first one O(n) (deleted slots are skipped one by one).
        self._all: OrderedDict[str, Dispatch] = OrderedDict()
        self._by_worker: dict[str, OrderedDict[str, Dispatch]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.registry.add_heartbeat_listener(self._on_heartbeat)

    async def stop(self) -> None:
        self.registry.remove_heartbeat_listener(self._on_heartbeat)
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._all

    @property
    def checks_running(self) -> int:
        return len(self._tasks)

    def judge(self, worker_id: str, sent_at: float) -> bool:
        """Whether a dispatch to `worker_id` sent at `sent_at` (epoch s) was lost."""
        return self.registry.idle_since(worker_id, sent_at + self.grace_s)

    # -- memory ---------------------------------------------------------------------------

    def note(self, job_id: str, worker_id: str, dispatched_ms: int) -> None:
        """A dispatch to a known worker was just published."""
        now = self._clock()
        self.forget(job_id)
        self._expire(now)
        if self.max_tracked <= 0:
            return
        dispatch = Dispatch(job_id, worker_id, dispatched_ms, now)
        self._all[job_id] = dispatch
        jobs = self._by_worker.get(worker_id)
        if jobs is None:
            jobs = self._by_worker[worker_id] = OrderedDict()
        jobs[job_id] = dispatch
        while len(self._all) > self.max_tracked:
            self.forget(next(iter(self._all)))

    def forget(self, job_id: str) -> None:
        dispatch = self._all.pop(job_id, None)
        if dispatch is None:
            return
        jobs = self._by_worker.get(dispatch.worker_id)
        if jobs is not None:
            jobs.pop(job_id, None)
            if not jobs:
                del self._by_worker[dispatch.worker_id]

    def _expire(self, now: float) -> None:
        horizon = now - self.max_age_s
        while self._all:
            oldest = next(iter(self._all.values()))
            if oldest.sent_at >= horizon:
                return
            self.forget(oldest.job_id)

    # -- the fast path --------------------------------------------------------------------

    def _on_heartbeat(self, state: WorkerState) -> None:
        self._expire(self._clock())
        jobs = self._by_worker.get(state.worker_id)
        if not jobs or not state.idle_pair_at:
            return
        cutoff = state.idle_pair_at - self.grace_s
        due: list[Dispatch] = []
        for dispatch in jobs.values():  # in the order sent
            if dispatch.sent_at >= cutoff:
                break
            due.append(dispatch)
        if not due:
            return
        # Each is looked at once: whatever this check decides, the reconciler covers the rest.
        for dispatch in due:
            self.forget(dispatch.job_id)
        task = asyncio.create_task(self._check(due), name=f"lost-dispatches-{state.worker_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, due: list[Dispatch]) -> None:
        try:
            await self.settle(due)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("checking %d possibly lost dispatches failed", len(due))

    # -- both paths -----------------------------------------------------------------------

    async def settle(self, dispatches: Sequence[Dispatch]) -> Settled:
        """Apply the rule's outcome to dispatches judged lost: complete the ones whose result
        is stored, re-queue the rest; skip any that moved on. One pipelined read, then one
        script call per job re-queued."""
        if not dispatches:
            return Settled()
        pipe = self.store.redis.pipeline(transaction=False)
        for d in dispatches:
            pipe.hmget(
                self.store.job_key(d.job_id), "state", "dispatched_ms", "attempts", LOST_FIELD
            )
            pipe.exists(cap.result_key(d.job_id))
        replies = await pipe.execute()
        now_ms = int(self._clock() * 1000)
        results: list[agent.JobResult] = []
        requeued = 0
        for i, d in enumerate(dispatches):
            (state, dispatched, attempts, lost), stored = replies[2 * i], replies[2 * i + 1]
            if state != b"DISPATCHED" or _int(dispatched) != d.dispatched_ms:
                continue  # its result came, or it moved on
            if stored:
                results.append(stored_result(d.job_id, d.worker_id))
                continue
            times = _int(lost)
            if times >= self.max_requeues:
                logger.warning(
                    "job %s looks lost on worker %s again (%d times already): left to its timeouts",
                    d.job_id,
                    d.worker_id,
                    times,
                )
                continue
            why = (
                f"dispatch lost: worker {d.worker_id} reported no active jobs in two "
                f"heartbeats after attempt {_int(attempts)} was sent"
            )
            moved = await requeue(
                self.store,
                self.events,
                d.job_id,
                from_state="DISPATCHED",
                now_ms=now_ms,
                why=why,
                # Not the job's fault: the attempt is given back.
                fields={"attempts": max(_int(attempts) - 1, 0), LOST_FIELD: times + 1},
                expect={"dispatched_ms": dispatched or b"", "attempts": attempts or b""},
            )
            if moved:
                requeued += 1
                logger.info("re-queued %s: %s", d.job_id, why)
        if results:
            await self._complete(results)
        if requeued:
            self.metrics.reconciler_actions.labels("jobs", "lost_dispatch").inc(requeued)
        return Settled(requeued, len(results))
