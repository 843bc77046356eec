"""The workflow engine: turns job events, timers and "advance" requests into scheduling passes
over runs (see dag.py for the rules), one compare-and-set write per pass.

Why the engine consumes `cordum.job.events` and not the raw `sys.job.result`: the scheduler
publishes one JobEvent after every job state change it commits, including the terminal states
no worker reports (DENIED by policy, TIMEOUT by the job reconciler, CANCELLED by an API call,
FAILED when no worker can ever take the job). A raw result misses all of those, and it races
the job state: it is on the bus before the scheduler has applied it (or decided it is a late
duplicate of an already-terminal job). An event is sent only after the job store holds the
state, so the engine reads the job record (the authority) and can never apply a result the
job store ignored. Engines share the events through a NATS queue group, so N engine
processes split the runs; two engines touching one run are kept apart by the CAS write
(the loser reloads and recomputes), and one process serialises its own work per run.

Per step on the hot path (plain NATS), with one dispatch and one result:
  dispatch: 1 CAS script (shared by every step the same pass starts) + 1 job-submit script
            (pipelined with the other jobs of the pass) + 1 NATS publish (sys.job.submit)
  result:   1 NATS message in (the job event) + 1 round trip (run, job record and result
            pipelined) + 1 CAS script (which also dispatches the steps it unlocks) +
            1 NATS publish of the run's timeline events (watch streams)
so a job step costs ~4 Redis round trips and 3 NATS messages, and results arriving together
for one run share the load and the write. Timers cost 1 claim script per poll per engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.server.bus import Subjects
from cordum.server.bus_trust import BusTrust
from cordum.server.inbound import Inbound
from cordum.server.jetstream import DurablePublisher
from cordum.server.jsonvalue import normalize
from cordum.server.services.job_events import WORKFLOW_KIND, job_event
from cordum.server.stores.jobs import ACTIVE, TERMINAL, JobStore, record_from_hash, state_name
from cordum.server.workflows import dag
from cordum.server.workflows.dag import JobOutcome, Plan
from cordum.server.workflows.definition import CompiledWorkflow, SchemaLookup, compile_workflow
from cordum.server.workflows.stepjobs import build_step_job
from cordum.server.workflows.store import StoredRun, WorkflowStore, stored_from_reply
from cordum.server.workflows.subworkflows import ChildRuns, child_outcome, running_children
from cordum.v1 import job_pb2, run_pb2, run_service_pb2

logger = logging.getLogger(__name__)
R = run_pb2


def now_ms() -> int:
    return int(time.time() * 1000)


def run_events_subject(subjects: Subjects) -> str:
    """Every run update's new timeline events (GetRunTimelineResponse), for watch streams."""
    return f"{subjects.namespace}cordum.run.events"


def advance_subject(subjects: Subjects) -> str:
    """`<run id>`: a gateway asks the engines for a pass over that run now."""
    return f"{subjects.namespace}cordum.workflow.advance"


def number_events(stored: StoredRun, events: Sequence[run_pb2.RunEvent]) -> None:
    for i, event in enumerate(events, start=1):
        event.seq = stored.seq + i


class RunEffects:
    """What a committed plan does outside the run record: submit step jobs, cancel jobs,
    publish alerts and the timeline events. Shared by the engine and the gateway services
    (cancel, approve), so both act alike."""

    def __init__(
        self,
        *,
        jobs: JobStore,
        nats: NATS,
        subjects: Subjects,
        sender_id: str = "workflow-engine",
        trust: BusTrust | None = None,
        durable: DurablePublisher | None = None,
        store: WorkflowStore | None = None,
    ) -> None:
        self.jobs = jobs
        self.nats = nats
        # Subworkflow steps' child runs (None: a process without the run store).
        self.children = ChildRuns(store) if store is not None else None
        self.definitions = DefinitionCache(store) if store is not None else None
        # Step job submits (JetStream mode: acked by the stream, with message ids).
        self.durable = durable or DurablePublisher(nats)
        self.subjects = subjects
        self.sender_id = sender_id
        # Signs what we publish (when the App has a key).
        self.trust = trust or BusTrust()
        self.events_subject = run_events_subject(subjects)
        # Job ids this process cancelled: their CANCELLED events need no pass.
        self.cancelled: OrderedDict[str, None] = OrderedDict()

    async def carry_out(self, run: run_pb2.Run, wf: CompiledWorkflow, plan: Plan) -> None:
        if plan.dispatches:
            await self.dispatch(run, wf, plan.dispatches)
        if plan.cancels:
            await self.cancel_jobs(plan.cancels)
        if self.children is not None:
            if plan.children and await self.children.start(run, plan.children):
                # A child could not be created: the run's next pass fails that attempt.
                await self.request_advance(run.id)
            for child_id, reason in plan.child_cancels:
                await self.children.cancel(child_id, reason, self)
        if run.parent_run_id and run.status in dag.TERMINAL_RUN and plan.changed:
            # The parent's step waits for this: advance it now, not on a reconciler tick.
            await self.request_advance(run.parent_run_id)
        for alert in plan.alerts:
            packet = cap.envelope(sender_id=self.sender_id, trace_id=run.id, alert=alert)
            await self.nats.publish(self.subjects.workflow_event, self.trust.encode(packet))
        await self.publish_events(plan.events)

    async def dispatch(
        self, run: run_pb2.Run, wf: CompiledWorkflow, dispatches: Sequence[dag.Dispatch]
    ) -> None:
        now = now_ms()
        news = [build_step_job(run, wf, d, now) for d in dispatches]
        outcomes = await self.jobs.submit_many(news, now)
        for new, outcome in zip(news, outcomes, strict=True):
            # "exists": already submitted (a re-dispatch racing the first one); the
            # scheduler's pending replayer covers a publish lost in between.
            if outcome.status == "ok":
                packet = cap.envelope(
                    sender_id=self.sender_id, trace_id=run.id, job_request=new.request
                )
                await self.durable.publish(
                    self.subjects.submit, self.trust.encode(packet), msg_id=f"{new.job.id}:submit"
                )

    async def cancel_jobs(self, cancels: Iterable[tuple[str, str]]) -> None:
        for job_id, reason in cancels:
            outcome = await self.jobs.transition(
                job_id,
                allowed_from=ACTIVE,
                to="CANCELLED",
                message=f"cancelled by the workflow engine: {reason}",
                now_ms=now_ms(),
            )
            if not outcome.ok:
                continue
            self.cancelled[job_id] = None
            while len(self.cancelled) > 10_000:
                self.cancelled.popitem(last=False)
            cancel = agent.JobCancel(job_id=job_id, reason=reason, requested_by=self.sender_id)
            packet = cap.envelope(sender_id=self.sender_id, trace_id=job_id, job_cancel=cancel)
            await self.nats.publish(cap.SUBJECT_CANCEL, self.trust.encode(packet))
            await self.publish_job_event(job_id, "CANCELLED", reason)

    async def publish_events(self, events: Sequence[run_pb2.RunEvent]) -> None:
        if events:
            data = run_service_pb2.GetRunTimelineResponse(events=events).SerializeToString()
            await self.nats.publish(self.events_subject, data, headers=self.trust.headers(data))

    async def request_advance(self, run_id: str) -> None:
        """Ask the engines (queue group) for a pass over `run_id`."""
        data = run_id.encode()
        await self.nats.publish(
            advance_subject(self.subjects), data, headers=self.trust.headers(data)
        )

    async def publish_job_event(self, job_id: str, state: str, why: str) -> None:
        data = job_event(job_id, state, why)
        await self.nats.publish(self.subjects.job_events, data, headers=self.trust.headers(data))


class DefinitionCache:
    """Compiled definitions by `<workflow>@<revision>`, loaded from a run's own snapshot
    (a run keeps the definition it started with, whatever happens to the workflow)."""

    def __init__(self, store: WorkflowStore, size: int = 256) -> None:
        self.store = store
        self.size = size
        self._items: OrderedDict[str, CompiledWorkflow] = OrderedDict()

    def get(self, key: str) -> CompiledWorkflow | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, compiled: CompiledWorkflow) -> None:
        self._items[compiled.key] = compiled
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    async def for_run(self, run_id: str, stored: StoredRun) -> CompiledWorkflow | None:
        found = self.get(stored.def_key)
        if found is not None:
            return found
        definition = await self.store.load_definition(run_id)
        if definition is None:
            return None
        compiled, problems = compile_workflow(definition)
        if problems:
            logger.error("run %s: its workflow snapshot does not compile: %s", run_id, problems)
            return None
        self._items[stored.def_key] = compiled
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return compiled


@dataclass(frozen=True)
class EngineConfig:
    timer_poll_s: float = 0.1
    # A claimed timer is pushed this far out; the pass sets the real next time.
    timer_lease_ms: int = 30_000
    timer_batch: int = 200
    # Runs advanced at once by one process.
    max_concurrent_runs: int = 64
    cas_attempts: int = 50
    compiled_cache: int = 256


@dataclass
class _Mail:
    # job id -> the state its event announced (terminal or APPROVAL_REQUIRED)
    jobs: dict[str, str] = field(default_factory=dict)
    redispatch: set[str] = field(default_factory=set)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        *,
        store: WorkflowStore,
        jobs: JobStore,
        nats: NATS,
        subjects: Subjects,
        effects: RunEffects,
        schemas: SchemaLookup | None,
        config: EngineConfig | None = None,
        inbound: Inbound | None = None,
    ) -> None:
        self.store = store
        self.jobs = jobs
        self.nats = nats
        self.subjects = subjects
        self.effects = effects
        self.inbound = inbound or Inbound()
        self.schemas = schemas
        self.config = config or EngineConfig()
        self._mail: dict[str, _Mail] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self.definitions = DefinitionCache(store, self.config.compiled_cache)
        self._sem = asyncio.Semaphore(self.config.max_concurrent_runs)
        self._subs: list[Subscription] = []
        self._timer_task: asyncio.Task[None] | None = None
        self.running = False
        # Passes that wrote a run update (observability; tests see engines share work).
        self.writes = 0

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        queue = self.subjects.queue("workflow")
        # Only what a run acts on: step jobs' terminal and approval events (their own
        # subjects), plus the bare subject of publishers that do not classify events.
        subjects = [
            self.subjects.job_event(WORKFLOW_KIND, state)
            for state in (*sorted(TERMINAL), "APPROVAL_REQUIRED")
        ]
        self._subs = [
            *[
                await self.nats.subscribe(subject, queue=queue, cb=self._on_job_event)
                for subject in [*subjects, self.subjects.job_events]
            ],
            await self.nats.subscribe(
                advance_subject(self.subjects), queue=queue, cb=self._on_advance
            ),
        ]
        self._timer_task = asyncio.create_task(self._timer_loop(), name="workflow-timers")
        self.running = True

    async def stop(self) -> None:
        self.running = False
        for sub in self._subs:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await sub.unsubscribe()
        self._subs = []
        if self._timer_task is not None:
            self._timer_task.cancel()
            await asyncio.gather(self._timer_task, return_exceptions=True)
            self._timer_task = None
        drivers = list(self._drivers.values())
        if drivers:
            # Let passes in flight finish their write and its effects, then stop.
            await asyncio.wait(drivers, timeout=5)
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        for mail in self._mail.values():
            for waiter in mail.waiters:
                if not waiter.done():
                    waiter.cancel()
        self._mail.clear()

    # -- intake -----------------------------------------------------------------------

    async def _on_job_event(self, msg: Msg) -> None:
        event = self.inbound.message(msg, "job_event", _decode_job_event)
        if event is None:
            return
        job_id, state = event
        if state not in TERMINAL and state != "APPROVAL_REQUIRED":
            return
        ref = dag.parse_job_id(job_id)
        if ref is None:
            return  # not a step job
        if state == "CANCELLED" and job_id in self.effects.cancelled:
            return  # we cancelled it ourselves: the run already knows
        self._post(ref.run_id).jobs[job_id] = state

    async def _on_advance(self, msg: Msg) -> None:
        run_id = self.inbound.message(msg, "run_advance", _decode_run_id)
        if run_id:
            self.poke(run_id)

    def _post(self, run_id: str) -> _Mail:
        mail = self._mail.get(run_id)
        if mail is None:
            mail = self._mail[run_id] = _Mail()
        if run_id not in self._drivers:
            self._drivers[run_id] = asyncio.get_running_loop().create_task(
                self._drive(run_id), name=f"workflow-run-{run_id}"
            )
        return mail

    def poke(self, run_id: str) -> None:
        """Schedule a pass over the run (coalesced with whatever else is pending for it)."""
        self._post(run_id)

    def observe(self, run_id: str, job_id: str, state: str) -> None:
        """Feed a job state read elsewhere (the reconciler's missed results)."""
        self._post(run_id).jobs[job_id] = state

    def redispatch(self, run_id: str, job_ids: Iterable[str]) -> None:
        """Re-submit step jobs whose submission was lost (no job record)."""
        self._post(run_id).redispatch.update(job_ids)

    async def advance_now(self, run_id: str) -> None:
        """A pass over the run, awaited (approvals resume at once, not on a tick)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._post(run_id).waiters.append(waiter)
        await waiter

    # -- per-run work -----------------------------------------------------------------

    async def _drive(self, run_id: str) -> None:
        try:
            while True:
                mail = self._mail.pop(run_id, None)
                if mail is None:
                    return
                try:
                    async with self._sem:
                        await self._process(run_id, mail)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("workflow pass over run %s failed; retrying soon", run_id)
                    with contextlib.suppress(Exception):
                        await self.store.wake(run_id, now_ms() + 1000)
                finally:
                    for waiter in mail.waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            # No await between the empty mailbox and this: nothing can slip in unseen.
            self._drivers.pop(run_id, None)

    async def compiled(self, run_id: str, stored: StoredRun) -> CompiledWorkflow | None:
        return await self.definitions.for_run(run_id, stored)

    async def schemas_for(self, wf: CompiledWorkflow) -> dict[str, dict[str, Any] | None]:
        ids = {cs.input_schema_id for cs in wf.steps.values() if cs.input_schema_id} | {
            cs.output_schema_id for cs in wf.steps.values() if cs.output_schema_id
        }
        if not ids or self.schemas is None:
            return {}
        return {schema_id: await self.schemas.get_schema(schema_id) for schema_id in ids}

    async def _load(
        self, run_id: str, job_ids: Sequence[str], with_results: Sequence[str]
    ) -> tuple[StoredRun | None, dict[str, Any], dict[str, bytes | None]]:
        """The run, job records and results in one round trip."""
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.hmget(self.store.run_key(run_id), ["data", "ver", "seq", "defkey"])
        for job_id in job_ids:
            pipe.hgetall(self.jobs.job_key(job_id))
        for job_id in with_results:
            pipe.get(cap.result_key(job_id))
        replies = await pipe.execute()
        stored = stored_from_reply(replies[0])
        records = {
            job_id: record_from_hash(raw)
            for job_id, raw in zip(job_ids, replies[1 : 1 + len(job_ids)], strict=True)
        }
        results = dict(zip(with_results, replies[1 + len(job_ids) :], strict=True))
        return stored, records, results

    async def _process(self, run_id: str, mail: _Mail) -> None:
        job_ids = sorted(mail.jobs)
        for _ in range(self.config.cas_attempts):
            with_results = [j for j in job_ids if mail.jobs[j] == "SUCCEEDED"]
            stored, records, results = await self._load(run_id, job_ids, with_results)
            if stored is None:
                return  # deleted (or never existed)
            wf = await self.compiled(run_id, stored)
            if wf is None:
                return
            now = now_ms()
            outcomes: list[JobOutcome] = []
            for job_id in job_ids:
                record = records.get(job_id)
                if record is None:
                    continue
                if record.state in TERMINAL or record.state == "APPROVAL_REQUIRED":
                    outcomes.append(await self._outcome(record, results.get(job_id)))
            run = stored.run
            for job_id in dag.due_job_timeouts(run, wf, now):
                outcome = await self._time_out(job_id, wf, run, now)
                if outcome is not None:
                    outcomes.append(outcome)
            children = await self._children(run, wf)
            plan = dag.advance(
                run, wf, now, outcomes, schemas=await self.schemas_for(wf), children=children
            )
            if plan.changed:
                number_events(stored, plan.events)
                ver = await self.store.save_run(
                    stored, plan.run, plan.events, now_ms=now, wake_ms=plan.wake_ms
                )
                if ver is None:
                    continue  # someone else wrote first: reload, recompute
                self.writes += 1
                await self.effects.carry_out(plan.run, wf, plan)
            elif not await self.store.set_timer(run_id, stored.ver, plan.wake_ms):
                continue
            if mail.redispatch:
                await self._redispatch(plan.run, wf, mail.redispatch)
            return
        logger.warning("run %s: gave up after %d write conflicts", run_id, self.config.cas_attempts)
        await self.store.wake(run_id, now_ms() + 500)

    async def _children(self, run: run_pb2.Run, wf: CompiledWorkflow) -> list[dag.ChildOutcome]:
        """Outcomes of the run's running subworkflow attempts whose child run ended; a child
        that was never created (crash after the parent's write) is created now."""
        pairs = running_children(run, wf)
        if not pairs or self.effects.children is None:
            return []
        found = await self.store.load_runs([child_id for _, child_id in pairs])
        out: list[dag.ChildOutcome] = []
        missing: list[dag.ChildStart] = []
        for (key, child_id), stored in zip(pairs, found, strict=True):
            if stored is None:
                sr = run.steps[key]
                missing.append(
                    dag.ChildStart(
                        key=key,
                        step=wf.steps[key.partition("[")[0]],
                        run_id=child_id,
                        attempt=sr.attempts,
                        payload=dag.from_value(sr.input) if sr.HasField("input") else {},
                    )
                )
                continue
            outcome = child_outcome(stored.run)
            if outcome is not None:
                out.append(dag.ChildOutcome(key, child_id, outcome))
        if missing:
            problems = await self.effects.children.start(run, missing)
            for start in missing:
                if start.key in problems:
                    failed = JobOutcome(
                        job_id="",
                        state="FAILED",
                        error_message=problems[start.key],
                        error_code="CHILD_NOT_STARTED",
                    )
                    out.append(dag.ChildOutcome(start.key, start.run_id, failed))
        return out

    async def _outcome(self, record: Any, raw: bytes | None) -> JobOutcome:
        job = record.job
        outcome = JobOutcome(
            job_id=job.id,
            state=record.state,
            result_ptr=job.result_ptr,
            error_message=job.error_message,
            error_code=job.error_code,
        )
        if record.state != "SUCCEEDED":
            if record.state == "APPROVAL_REQUIRED":
                outcome.error_message = job.safety.reason or "the job waits for a human approval"
            return outcome
        if job.result_ptr and job.result_ptr != cap.redis_pointer(cap.result_key(job.id)):
            try:
                raw = await self.store.redis.get(cap.pointer_key(job.result_ptr))
            except ValueError:
                raw = None
        if raw is not None:
            outcome.output_size = len(raw)
            try:
                outcome.output = normalize(json.loads(raw))
            except ValueError:
                outcome.output = raw.decode(errors="replace")
        return outcome

    async def _time_out(
        self, job_id: str, wf: CompiledWorkflow, run: run_pb2.Run, now: int
    ) -> JobOutcome | None:
        """End a step attempt past its timeout in the job store. Whatever the job store holds
        afterwards is the outcome, so a result that got there first still counts."""
        ref = dag.parse_job_id(job_id)
        cs = wf.steps.get(ref.step_id) if ref else None
        seconds = cs.timeout_ms // 1000 if cs else 0
        why = f"step timeout ({seconds}s) exceeded"
        moved = await self.jobs.transition(
            job_id,
            allowed_from=ACTIVE,
            to="TIMEOUT",
            message=why,
            now_ms=now,
            dlq_status="JOB_STATUS_TIMEOUT",
            dlq_code="step_timeout",
        )
        if moved.ok:
            cancel = agent.JobCancel(job_id=job_id, reason=why, requested_by=self.effects.sender_id)
            packet = cap.envelope(
                sender_id=self.effects.sender_id, trace_id=job_id, job_cancel=cancel
            )
            await self.nats.publish(cap.SUBJECT_CANCEL, self.effects.trust.encode(packet))
            await self.effects.publish_job_event(job_id, "TIMEOUT", why)
            return JobOutcome(
                job_id=job_id, state="TIMEOUT", error_message=why, error_code="TIMEOUT"
            )
        if moved.missing:
            # Never submitted (lost dispatch): the attempt timed out all the same.
            return JobOutcome(
                job_id=job_id, state="TIMEOUT", error_message=why, error_code="TIMEOUT"
            )
        record, raw = await self.jobs.get_with_result(job_id)
        if record is None or record.state not in TERMINAL:
            return None
        return await self._outcome(record, raw)

    async def _redispatch(self, run: run_pb2.Run, wf: CompiledWorkflow, job_ids: set[str]) -> None:
        dispatches = []
        for job_id in sorted(job_ids):
            ref = dag.parse_job_id(job_id)
            if ref is None:
                continue
            sr = run.steps.get(ref.key)
            cs = wf.steps.get(ref.step_id)
            if sr is None or cs is None or sr.job_id != job_id:
                continue
            if sr.status != R.STEP_STATUS_RUNNING or run.status in dag.TERMINAL_RUN:
                continue
            dispatches.append(
                dag.Dispatch(
                    key=ref.key,
                    step=cs,
                    job_id=job_id,
                    attempt=ref.attempt,
                    payload=dag.from_value(sr.input) if sr.HasField("input") else {},
                    index=ref.index,
                    item=dag.from_value(sr.item) if sr.HasField("item") else None,
                )
            )
        if dispatches:
            logger.info("run %s: re-dispatching %d lost step jobs", run.id, len(dispatches))
            await self.effects.dispatch(run, wf, dispatches)

    # -- timers -----------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        cfg = self.config
        while True:
            try:
                ids = await self.store.claim_due(now_ms(), cfg.timer_batch, cfg.timer_lease_ms)
                for run_id in ids:
                    self.poke(run_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("workflow timer poll failed; retrying")
            await asyncio.sleep(cfg.timer_poll_s)


def _decode_run_id(data: bytes) -> str:
    return data.decode().strip()


def _decode_job_event(data: bytes) -> tuple[str, str] | None:
    event = job_pb2.JobEvent.FromString(data)
    if not event.job_id:
        return None
    return event.job_id, state_name(event.state)
