"""The reconciler: the safety net that makes plain (fire-and-forget) NATS dependable.

Every scan, one scheduler replica (a Redis lease decides which):
- times out jobs past their deadline (and tells the worker to stop);
- re-dispatches, or times out, jobs whose worker vanished (no heartbeat), jobs sent to a
  topic no worker picked up, and jobs running longer than their topic's timeout;
- re-queues (attempt refunded) dispatches their live worker never got, judged by its idle
  heartbeats: the fallback of the scheduler's in-memory check (services/lost_dispatches.py);
- replays PENDING jobs whose submit message was lost (the pending replayer);
- trims the listing indexes to the job TTL, so no key grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.server.services.lost_dispatches import (
    LOST_FIELD,
    Dispatch,
    requeue,
    stored_result,
)
from cordum.server.services.scheduler import Scheduler, now_ms, stop_task
from cordum.server.stores.jobs import ACTIVE, STATES, JobRecord

logger = logging.getLogger(__name__)

BATCH = 200
# Pages of stale candidates looked at per state and tick.
MAX_PAGES = 50

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class TickReport:
    timed_out: int = 0
    requeued: int = 0
    replayed: int = 0
    recovered: int = 0
    trimmed: int = 0
    skipped: bool = False
    details: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(
        self,
        *,
        scheduler: Scheduler,
        interval_s: float,
        owner: str = "",
        pending_replay_ms: int | None = None,
        recovery_grace_ms: int = 5000,
    ) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
        self.interval_s = interval_s
        self.owner = f"{owner}-{uuid.uuid4().hex[:6]}"
        self.pending_replay_ms = pending_replay_ms or max(int(interval_s * 2000), 5000)
        # How old a dispatch must be before its result or its dispatcher is looked for.
        self.recovery_grace_ms = recovery_grace_ms
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._release = self.store.redis.register_script(_RELEASE)

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._loop(self._stopping), name="reconciler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # The event ends the loop even if a cancellation landing mid-tick is lost below
            # us (seen with the workflow reconciler's first tick).
            self._stopping.set()
            await stop_task(task)

    async def _loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.interval_s)
            if stopping.is_set():
                return
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reconciler tick failed")

    async def tick(self) -> TickReport:
        report = TickReport()
        lock = f"{self.store.prefix}lock:reconciler"
        ttl_ms = max(int(self.interval_s * 2000), 1000)
        if not await self.store.redis.set(lock, self.owner, nx=True, px=ttl_ms):
            report.skipped = True
            return report
        try:
            now = now_ms()
            await self._deadlines(now, report)
            await self._recover(now, report)
            await self._stale(now, report)
            await self._replay_pending(now, report)
            await self._trim(now, report)
        finally:
            await self._release(keys=[lock], args=[self.owner])
            self._count(report)
        if report.timed_out or report.requeued or report.replayed:
            logger.info(
                "reconciled: %d timed out, %d re-queued, %d replayed",
                report.timed_out,
                report.requeued,
                report.replayed,
            )
        return report

    def _count(self, report: TickReport) -> None:
        actions = self.scheduler.metrics.reconciler_actions
        for action in ("timed_out", "requeued", "replayed", "recovered", "trimmed"):
            count = getattr(report, action)
            if count:
                actions.labels("jobs", action).inc(count)

    async def _end(
        self, record: JobRecord, now: int, code: str, why: str, report: TickReport
    ) -> None:
        outcome = await self.store.transition(
            record.job.id,
            allowed_from=ACTIVE,
            to="TIMEOUT",
            message=why,
            now_ms=now,
            dlq_status="JOB_STATUS_TIMEOUT",
            dlq_code=code,
        )
        if not outcome.ok:
            return
        report.timed_out += 1
        report.details.append(f"{record.job.id}: {why}")
        sched = self.scheduler
        await sched.events.publish(record.job.id, "TIMEOUT", why)
        if outcome.previous in ("DISPATCHED", "RUNNING"):
            # Tell the worker to stop; its late result will be discarded anyway.
            cancel = agent.JobCancel(
                job_id=record.job.id, reason=why, requested_by=sched.config.sender_id
            )
            packet = cap.envelope(
                sender_id=sched.config.sender_id, trace_id=record.job.id, job_cancel=cancel
            )
            await sched.out.publish(cap.SUBJECT_CANCEL, sched.trust.encode(packet))
        await sched.publish_dlq(record.job.id, "TIMEOUT", code, why)

    async def _requeue_or_end(
        self, record: JobRecord, now: int, code: str, why: str, report: TickReport
    ) -> None:
        if record.job.attempts <= record.job.max_retries:
            await self._requeue(record, now, why, report)
            return
        await self._end(record, now, code, why, report)

    async def _recover(self, now: int, report: TickReport) -> None:
        """Plain NATS loses messages held by a replica that dies. Two cases are detectable:
        the worker wrote `res:<id>` but its result message died with the replica that
        received it (complete the job from the stored result), and the replica that
        recorded a dispatch died (its lease expired) before publishing it (re-queue the
        job without charging the attempt; a dispatch that did go out may run twice —
        at-least-once — but the job still completes once)."""
        sched = self.scheduler
        horizon = now - self.recovery_grace_ms
        for state in ("DISPATCHED", "RUNNING"):
            ids = await self.store.stale(state, horizon, BATCH)
            if not ids:
                continue
            records = [r for r in await self.store.get_many(ids) if r is not None]
            pipe = self.store.redis.pipeline(transaction=False)
            for record in records:
                pipe.exists(cap.result_key(record.job.id))
                dispatcher = record.fields.get("dispatcher", b"").decode()
                pipe.exists(sched.lease_key(dispatcher) if dispatcher else "")
            flags = await pipe.execute()
            recovered = []
            for i, record in enumerate(records):
                has_result, dispatcher_alive = flags[2 * i], flags[2 * i + 1]
                if record.state != state:
                    continue
                if has_result:
                    recovered.append(stored_result(record.job.id, record.job.worker_id))
                elif record.fields.get("dispatcher") and not dispatcher_alive:
                    await self._requeue(
                        record,
                        now,
                        "the scheduler that dispatched it stopped",
                        report,
                        refund_attempt=True,
                    )
            if recovered:
                await sched.complete(recovered)
                report.recovered += len(recovered)

    async def _requeue(
        self,
        record: JobRecord,
        now: int,
        why: str,
        report: TickReport,
        *,
        refund_attempt: bool = False,
    ) -> bool:
        fields: dict[str, str | bytes | int] = {}
        if refund_attempt:
            fields["attempts"] = max(record.job.attempts - 1, 0)
        ok = await requeue(
            self.store,
            self.scheduler.events,
            record.job.id,
            from_state=record.state,
            now_ms=now,
            why=why,
            fields=fields,
        )
        if ok:
            report.requeued += 1
        return ok

    async def _deadlines(self, now: int, report: TickReport) -> None:
        ids = await self.store.past_deadline(now, BATCH)
        records = await self.store.get_many(ids)
        for job_id, record in zip(ids, records, strict=True):
            if record is not None and record.state in ACTIVE:
                await self._end(record, now, "deadline_exceeded", "deadline exceeded", report)
            else:  # expired or already ended: just forget the deadline
                await self.store.redis.zrem(f"{self.store.prefix}jobs:deadline", job_id)

    async def _stale(self, now: int, report: TickReport) -> None:
        sched = self.scheduler
        reconciler = sched.timeouts.reconciler
        dispatch_ms = reconciler.dispatch_timeout_seconds * 1000
        registry = sched.registry
        # Only jobs older than the shortest timeout that could apply can be stale; per-topic
        # running timeouts count too (a 1 s topic timeout must not wait for the others).
        topic_timeouts = [t.timeout_seconds for t in sched.timeouts.topics.values()]
        shortest = min(
            int(registry.ttl_s * 1000),
            dispatch_ms,
            reconciler.running_timeout_seconds * 1000,
            *(seconds * 1000 for seconds in topic_timeouts if seconds),
        )
        horizon = now - shortest
        for state in ("DISPATCHED", "RUNNING"):
            # Page through: healthy long-running jobs must not hide the stale ones behind
            # the first batch. Jobs that change state shift later pages; the next tick
            # catches what this one skipped.
            for page in range(MAX_PAGES):
                ids = await self.store.stale(state, horizon, BATCH, offset=page * BATCH)
                await self._check_stale(state, ids, now, dispatch_ms, report)
                if len(ids) < BATCH:
                    break

    async def _check_stale(
        self, state: str, ids: list[str], now: int, dispatch_ms: int, report: TickReport
    ) -> None:
        sched = self.scheduler
        lost = sched.lost_dispatches
        judged_lost: list[Dispatch] = []
        for record in await self.store.get_many(ids) if ids else []:
            if record is None or record.state != state:
                continue
            since = int(record.fields.get("dispatched_ms", b"0") or 0)
            age = now - since
            worker = record.job.worker_id
            running_ms = sched.timeouts.running_timeout_s(record.job.topic) * 1000
            if age >= running_ms:
                await self._requeue_or_end(
                    record, now, "timeout", f"no result within {running_ms // 1000}s", report
                )
            elif worker and sched.registry.is_lost(worker):
                await self._requeue_or_end(
                    record, now, "worker_lost", f"worker {worker} stopped heartbeating", report
                )
            elif (
                state == "DISPATCHED"
                and worker
                and int(record.fields.get(LOST_FIELD, b"0") or 0) < lost.max_requeues
                and lost.judge(worker, since / 1000)
            ):
                judged_lost.append(Dispatch(record.job.id, worker, since, since / 1000))
            elif not worker and age >= dispatch_ms:
                await self._requeue_or_end(
                    record,
                    now,
                    "dispatch_timeout",
                    f"no worker took it within {dispatch_ms // 1000}s",
                    report,
                )
        settled = await lost.settle(judged_lost)
        report.requeued += settled.requeued
        report.recovered += settled.recovered

    async def _replay_pending(self, now: int, report: TickReport) -> None:
        ids = await self.store.stale("PENDING", now - self.pending_replay_ms, BATCH)
        if not ids:
            return
        due_key = f"{self.store.prefix}jobs:due"
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.zscore(due_key, job_id)
        scores = await pipe.execute()
        waiting = [job_id for job_id, score in zip(ids, scores, strict=True) if score is None]
        for record in await self.store.get_many(waiting):
            if record is not None and record.state == "PENDING":
                # Its submit message was lost (or its scheduler died holding it): ask again.
                self.scheduler.readmit(record.request, record.job.trace_id)
                report.replayed += 1

    async def _trim(self, now: int, report: TickReport) -> None:
        redis, prefix = self.store.redis, self.store.prefix
        horizon = now - self.store.limits.job_ttl_s * 1000
        tenants = [t.decode() for t in await redis.smembers(f"{prefix}jobs:tenants")]
        pipe = redis.pipeline(transaction=False)
        for tenant in tenants:
            base = f"{prefix}jobs:t:{tenant}"
            pipe.zremrangebyscore(base, "-inf", horizon)
            for state in STATES:
                pipe.zremrangebyscore(f"{base}:s:{state}", "-inf", horizon)
        for state in ACTIVE:
            pipe.zremrangebyscore(f"{prefix}jobs:active:{state}", "-inf", horizon)
        report.trimmed = sum(int(n) for n in await pipe.execute())
