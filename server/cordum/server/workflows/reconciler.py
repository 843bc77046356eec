"""The workflow reconciler: what makes runs survive a crashed engine and lost messages.

Timers (delays, retry backoff, step and run timeouts, approvals resuming) are durable in
Redis and claimed by every engine's timer loop, so they need nothing here. What a timer
cannot see, one engine (a Redis lease picks it) looks for every scan, over the active runs:
- results missed: a step RUNNING whose job is already terminal in the job store (its job
  event was published while no engine listened) → the engine applies the job's state;
- dispatches lost: a step RUNNING whose job record does not exist (the engine died between
  writing the run and submitting the job) → the engine submits it again, with the same job
  id, so a submit that did happen is never doubled;
- a step job waiting for a human approval is left alone (it is not lost);
- a subworkflow step RUNNING → its run gets a pass, which reads the child run (an ending
  whose advance message was lost becomes the step's outcome; a child never created, the
  engine dying between the parent's write and the child's creation, is created);
and it trims the run listing indexes to the run TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

from cordum.server.metrics import Metrics
from cordum.server.stores.jobs import TERMINAL
from cordum.server.workflows import dag
from cordum.server.workflows.engine import Engine, now_ms
from cordum.v1 import run_pb2

logger = logging.getLogger(__name__)

BATCH = 200
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class ReconcileReport:
    scanned: int = 0
    missed: int = 0
    lost: int = 0
    trimmed: int = 0
    # Runs poked because a subworkflow step of theirs is running.
    parents: int = 0
    skipped: bool = False
    details: list[str] = field(default_factory=list)


class WorkflowReconciler:
    def __init__(
        self,
        *,
        engine: Engine,
        interval_s: float,
        owner: str = "",
        # A RUNNING step younger than this may still be between its write and its submit.
        lost_after_ms: int = 2000,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.interval_s = interval_s
        self.owner = f"{owner}-{uuid.uuid4().hex[:6]}"
        self.lost_after_ms = lost_after_ms
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._release = self.store.redis.register_script(_RELEASE)
        self._trimmed_at = 0.0

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._loop(self._stopping), name="workflow-reconciler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        # The event ends the loop even when the cancellation is lost: a stop that landed in
        # the middle of the first tick was seen swallowed below us, and the loop then slept
        # on forever (a test that stopped the reconciler hung when run on its own).
        self._stopping.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("workflow reconciler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.interval_s)

    async def tick(self) -> ReconcileReport:
        report = ReconcileReport()
        redis = self.store.redis
        lock = f"{self.store.prefix}lock:wf-reconciler"
        ttl_ms = max(int(self.interval_s * 2000), 1000)
        if not await redis.set(lock, self.owner, nx=True, px=ttl_ms):
            report.skipped = True
            return report
        try:
            now = now_ms()
            offset = 0
            while True:
                ids = await self.store.active_runs(BATCH, offset)
                if not ids:
                    break
                await self._scan(ids, now, report)
                if len(ids) < BATCH:
                    break
                offset += BATCH
            if now / 1000 - self._trimmed_at > 60:
                self._trimmed_at = now / 1000
                horizon = now - self.store.limits.run_ttl_s * 1000
                report.trimmed = await self.store.trim_indexes(horizon)
        finally:
            await self._release(keys=[lock], args=[self.owner])
            if self.metrics is not None:
                for action in ("missed", "lost", "trimmed"):
                    if count := getattr(report, action):
                        self.metrics.reconciler_actions.labels("workflows", action).inc(count)
        if report.missed or report.lost:
            logger.info(
                "workflow reconciler: %d missed results, %d lost dispatches",
                report.missed,
                report.lost,
            )
        return report

    async def _scan(self, run_ids: list[str], now: int, report: ReconcileReport) -> None:
        stored_runs = await self.store.load_runs(run_ids)
        running: list[tuple[str, str, int]] = []  # (run id, job id, started ms)
        for run_id, stored in zip(run_ids, stored_runs, strict=True):
            if stored is None or stored.run.status in dag.TERMINAL_RUN:
                continue
            report.scanned += 1
            parent = False
            for sr in stored.run.steps.values():
                if sr.status == run_pb2.STEP_STATUS_RUNNING and sr.job_id:
                    running.append((run_id, sr.job_id, sr.started_at.ToMilliseconds()))
                elif sr.status == run_pb2.STEP_STATUS_RUNNING and sr.child_run_id:
                    parent = True
            if parent:
                report.parents += 1
                self.engine.poke(run_id)
        if not running:
            return
        jobs = self.engine.jobs
        pipe = jobs.redis.pipeline(transaction=False)
        for _, job_id, _ in running:
            pipe.hget(jobs.job_key(job_id), "state")
        states = await pipe.execute()
        lost: dict[str, list[str]] = {}
        job_ttl_ms = jobs.limits.job_ttl_s * 1000
        for (run_id, job_id, started), raw in zip(running, states, strict=True):
            state = raw.decode() if raw else ""
            if state in TERMINAL:
                report.missed += 1
                report.details.append(f"{job_id}: missed {state}")
                self.engine.observe(run_id, job_id, state)
            elif not state and self.lost_after_ms <= now - started < job_ttl_ms:
                # (A record older than the job TTL expired: re-sending would run it twice.)
                report.lost += 1
                report.details.append(f"{job_id}: lost dispatch")
                lost.setdefault(run_id, []).append(job_id)
        for run_id, job_ids in lost.items():
            self.engine.redispatch(run_id, job_ids)
