"""The gateway's job API: submit (single, batch, and wait), read, list, cancel, results,
decisions, remediation, traces and watch streams.

Submit costs one Redis round trip (a script that checks idempotency and writes the input,
the record and the indexes) and one NATS publish; concurrent submits share the round trip.
With a scheduler in the same process, the submit goes to it directly: no NATS message, and
the same script call creates the job and applies its safety decision (`Scheduler.submit_local`).
Submit-and-wait then gets the job's record and result with its terminal event (read by the
script that ended the job), so a job costs this process no read of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from nats.aio.client import Client as NATS

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.server.bus import Batcher, Subjects
from cordum.server.bus_trust import BusTrust
from cordum.server.errors import CordumError, failed_precondition, invalid_field, not_found
from cordum.server.jetstream import DurablePublisher
from cordum.server.metrics import Metrics
from cordum.server.services.caller import Caller, hidden_job
from cordum.server.services.job_events import HubEvent, JobEventHub, JobEventPublisher
from cordum.server.services.job_validation import (
    BuiltJob,
    build_job,
    check_id,
    check_tenant_filter,
)
from cordum.server.services.scheduler import Scheduler
from cordum.server.stores.jobs import (
    ACTIVE,
    TERMINAL,
    JobPage,
    JobRecord,
    JobStore,
    NewJob,
    SubmitOutcome,
    ms_timestamp,
    state_enum,
    state_name,
)
from cordum.server.tracing import Tracing
from cordum.v1 import error_reason_pb2, job_pb2, job_service_pb2

# Runtime state of a job that a job made from it (remediation, DLQ retry) must not inherit.
RUNTIME_FIELDS = (
    "state",
    "safety",
    "approval",
    "result_ptr",
    "worker_id",
    "error_code",
    "error_message",
    "execution_ms",
    "attempts",
    "pending_reason",
    "created_at",
    "updated_at",
    "deadline",
    "artifact_ptrs",
)

logger = logging.getLogger(__name__)
R = error_reason_pb2

MAX_WAIT_MS = 600_000
DEFAULT_WAIT_MS = 30_000
MAX_BATCH = 1000
MAX_PAGE = 500


def now_ms() -> int:
    return int(time.time() * 1000)


def page_size(value: int, default: int = 50) -> int:
    if value < 0:
        raise invalid_field("page_size", "must not be negative")
    return min(value or default, MAX_PAGE)


@dataclass(frozen=True)
class Submitted:
    job: job_pb2.Job
    replay: bool


class JobService:
    def __init__(
        self,
        *,
        store: JobStore,
        nats: NATS,
        subjects: Subjects,
        hub: JobEventHub,
        metrics: Metrics,
        events: JobEventPublisher | None = None,
        scheduler: Scheduler | None = None,
        sender_id: str = "cordum-gateway",
        default_retries: int = 0,
        trust: BusTrust | None = None,
        tracing: Tracing | None = None,
        durable: DurablePublisher | None = None,
    ) -> None:
        self.store = store
        self.nats = nats
        # Submits and DLQ notices (JetStream mode: acked by the stream, with message ids).
        self.durable = durable or DurablePublisher(nats)
        self.subjects = subjects
        self.hub = hub
        self.events = events or JobEventPublisher(nats, subjects, hub)
        # The scheduler of this process, when it runs here: submits are handed to it.
        self.scheduler = scheduler
        self.metrics = metrics
        self.sender_id = sender_id
        self.default_retries = default_retries
        # Signs what we publish (when the App has a key).
        self.trust = trust or BusTrust()
        self.tracing = tracing or Tracing()
        self._writes: Batcher[tuple[NewJob, asyncio.Future[SubmitOutcome]]] = Batcher(
            self._write_batch, name="gateway-submit"
        )
        # Finished submit-and-wait calls read record + result together, one pipeline per
        # batch of callers.
        self._reads: Batcher[tuple[str, asyncio.Future[tuple[JobRecord | None, bytes | None]]]] = (
            Batcher(self._read_batch, name="gateway-read")
        )

    # -- submit -----------------------------------------------------------------------

    def build(
        self, req: job_service_pb2.SubmitJobRequest, caller: Caller, idem_header: str = ""
    ) -> BuiltJob:
        return build_job(
            req,
            caller,
            now_ms=now_ms(),
            idempotency_header=idem_header,
            default_retries=self.default_retries,
        )

    async def _write_batch(self, items: list[tuple[NewJob, asyncio.Future[SubmitOutcome]]]) -> None:
        try:
            outcomes = await self.store.submit_many([new for new, _ in items], now_ms())
        except Exception as exc:
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), outcome in zip(items, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def _read_batch(
        self, items: list[tuple[str, asyncio.Future[tuple[JobRecord | None, bytes | None]]]]
    ) -> None:
        try:
            found = await self.store.get_with_result_many([job_id for job_id, _ in items])
        except Exception as exc:
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), value in zip(items, found, strict=True):
            if not future.done():
                future.set_result(value)

    async def _read_with_result(self, job_id: str) -> tuple[JobRecord | None, bytes | None]:
        future: asyncio.Future[tuple[JobRecord | None, bytes | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._reads.add((job_id, future))
        return await future

    async def _write(self, new: NewJob) -> SubmitOutcome:
        if self.scheduler is not None:
            future = self.scheduler.submit_local(new)
        else:
            future = asyncio.get_running_loop().create_future()
            self._writes.add((new, future))
        try:
            return await future
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise CordumError(
                grpc.StatusCode.UNAVAILABLE,
                R.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
                f"job store unavailable: {exc}",
            ) from exc

    async def publish_submit(
        self, request: agent.JobRequest, trace_id: str, *, why: str = "submit"
    ) -> None:
        """Ask a scheduler to decide on a stored PENDING job (this process's, else any).
        `why` tells this request apart from the job's other ones (JetStream de-duplicates
        by job id + why)."""
        if self.scheduler is not None:
            self.scheduler.readmit(request, trace_id)
            return
        packet = cap.envelope(sender_id=self.sender_id, trace_id=trace_id, job_request=request)
        # The caller's span (the API call) goes along in the headers: the scheduler's spans
        # of this job join its trace.
        await self.durable.publish(
            self.subjects.submit,
            self.trust.encode(packet),
            msg_id=f"{request.job_id}:{why}",
            headers=self.tracing.headers(),
        )

    async def submit_built(self, built: BuiltJob, caller: Caller) -> Submitted:
        new = built.new
        outcome = await self._write(new)
        if outcome.status == "exists":
            raise CordumError(
                grpc.StatusCode.ALREADY_EXISTS,
                R.ERROR_REASON_ALREADY_EXISTS,
                f"job {new.job.id} already exists",
            )
        if outcome.status == "replay":
            record = await self.store.get(outcome.job_id)
            if record is None or not caller.can_see(record.tenant):
                raise CordumError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    R.ERROR_REASON_IDEMPOTENCY_KEY_REUSED,
                    "idempotency key already used",
                )
            return Submitted(record.job, replay=True)
        if self.scheduler is None:
            # Stored before published: if the publish is lost, the pending replayer re-sends it.
            await self.publish_submit(new.request, new.job.trace_id)
        self.metrics.jobs_submitted.labels(new.job.topic).inc()
        job = job_pb2.Job()
        job.CopyFrom(new.job)
        job.state = job_pb2.JOB_STATE_PENDING
        stamp = ms_timestamp(now_ms())
        job.created_at.CopyFrom(stamp)
        job.updated_at.CopyFrom(stamp)
        return Submitted(job, replay=False)

    async def submit(
        self, req: job_service_pb2.SubmitJobRequest, caller: Caller, idem_header: str = ""
    ) -> Submitted:
        return await self.submit_built(self.build(req, caller, idem_header), caller)

    async def submit_batch(
        self, reqs: Sequence[job_service_pb2.SubmitJobRequest], caller: Caller
    ) -> list[Submitted | CordumError]:
        if len(reqs) > MAX_BATCH:
            raise invalid_field("jobs", f"at most {MAX_BATCH} jobs per batch")

        async def one(req: job_service_pb2.SubmitJobRequest) -> Submitted | CordumError:
            try:
                return await self.submit(req, caller)
            except CordumError as error:
                return error

        return list(await asyncio.gather(*(one(r) for r in reqs)))

    async def submit_and_wait(
        self,
        req: job_service_pb2.SubmitJobRequest,
        timeout_ms: int,
        caller: Caller,
        idem_header: str = "",
    ) -> tuple[Submitted, JobRecord | None, bytes | None]:
        if timeout_ms < 0 or timeout_ms > MAX_WAIT_MS:
            raise invalid_field("timeout_ms", f"must be between 0 and {MAX_WAIT_MS}")
        built = self.build(req, caller, idem_header)
        job_id = built.new.job.id
        # Wait before submitting, so a fast worker cannot finish before we look.
        done = self.hub.wait_terminal(job_id)
        ended: HubEvent | None = None
        try:
            submitted = await self.submit_built(built, caller)
            record = None
            if submitted.replay:
                self.hub.forget_wait(job_id, done)
                job_id = submitted.job.id
                done = self.hub.wait_terminal(job_id)
                record = await self.store.get(job_id)
            if record is None or record.state not in TERMINAL:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout((timeout_ms or DEFAULT_WAIT_MS) / 1000):
                        ended = await done
        finally:
            self.hub.forget_wait(job_id, done)
        if ended is not None and ended.record is not None:
            # Read by the script that ended the job, in this process: no read of our own.
            return submitted, ended.record, ended.result
        record, result = await self._read_with_result(job_id)
        return submitted, record, result

    # -- reads ------------------------------------------------------------------------

    async def get(self, job_id: str, caller: Caller) -> JobRecord:
        check_id(job_id, "job_id")
        record = await self.store.get(job_id)
        if record is None or not caller.can_see(record.tenant):
            raise hidden_job(job_id)
        return record

    async def list(self, req: job_service_pb2.ListJobsRequest, caller: Caller) -> JobPage:
        state = req.state.strip().upper().removeprefix("JOB_STATE_")
        if state and state not in (*ACTIVE, *TERMINAL):
            raise invalid_field("state", f"unknown state {req.state!r}")
        caller.check_tenant(req.tenant_id, "tenant_id")
        check_tenant_filter(req.tenant_id, "tenant_id")
        if req.trace_id:
            check_id(req.trace_id, "trace_id")
        tenant = caller.tenant_for(req.tenant_id)
        after = req.updated_after.ToMilliseconds() if req.HasField("updated_after") else 0
        before = req.updated_before.ToMilliseconds() if req.HasField("updated_before") else 0
        return await self.store.list_jobs(
            tenant=tenant,
            state=state,
            topic=req.topic,
            trace_id=req.trace_id,
            updated_after_ms=after,
            updated_before_ms=before,
            page_size=page_size(req.page_size),
            page_token=req.page_token,
        )

    async def cancel(self, job_id: str, reason: str, caller: Caller) -> JobRecord:
        record = await self.get(job_id, caller)
        if record.state == "CANCELLED":
            return record
        if record.state in TERMINAL:
            raise failed_precondition(
                R.ERROR_REASON_JOB_TERMINAL, f"job {job_id} already ended {record.state}"
            )
        why = reason or "cancelled by request"
        outcome = await self.store.transition(
            job_id,
            allowed_from=ACTIVE,
            to="CANCELLED",
            message=f"cancelled by {caller.principal or 'api'}: {why}",
            now_ms=now_ms(),
            fields={"error_message": why, "error_code": "cancelled"},
        )
        if not outcome.ok and outcome.previous != "CANCELLED":
            raise failed_precondition(
                R.ERROR_REASON_JOB_TERMINAL, f"job {job_id} already ended {outcome.previous}"
            )
        if outcome.ok:
            cancel = agent.JobCancel(
                job_id=job_id, reason=why, requested_by=caller.principal or self.sender_id
            )
            packet = cap.envelope(sender_id=self.sender_id, trace_id=job_id, job_cancel=cancel)
            # Workers that honour cancellation stop; the late result of those that don't is
            # discarded by the scheduler.
            await self.nats.publish(cap.SUBJECT_CANCEL, self.trust.encode(packet))
            await self.events.publish(job_id, "CANCELLED", why)
        updated = await self.store.get(job_id)
        assert updated is not None
        return updated

    async def result(self, job_id: str, caller: Caller) -> tuple[JobRecord, bytes | None]:
        check_id(job_id, "job_id")
        record, result = await self.store.get_with_result(job_id)
        if record is None or not caller.can_see(record.tenant):
            raise hidden_job(job_id)
        return record, result if record.state == "SUCCEEDED" else None

    async def decisions(
        self, req: job_service_pb2.ListJobDecisionsRequest, caller: Caller
    ) -> tuple[list[job_pb2.SafetyDecision], str]:
        size = page_size(req.page_size)
        await self.get(req.job_id, caller)
        try:
            offset = int(req.page_token or "0")
        except ValueError as exc:
            raise invalid_field("page_token", "malformed page token") from exc
        raw = await self.store.decisions(req.job_id, offset, size + 1)
        decisions = [job_pb2.SafetyDecision.FromString(b) for b in raw[:size]]
        return decisions, str(offset + size) if len(raw) > size else ""

    async def trace(self, trace_id: str, caller: Caller) -> list[JobRecord]:
        check_id(trace_id, "trace_id")
        records = await self.store.get_many(await self.store.trace(trace_id))
        visible = [r for r in records if r is not None and caller.can_see(r.tenant)]
        return sorted(visible, key=lambda r: r.job.created_at.ToNanoseconds())

    async def watch(
        self, job_id: str, caller: Caller
    ) -> AsyncIterator[tuple[job_pb2.JobEvent, JobRecord]]:
        queue = self.hub.listen(job_id)
        try:
            record = await self.get(job_id, caller)
            first = job_pb2.JobEvent(
                job_id=job_id,
                state=record.job.state,
                message="current state",
                time=record.job.updated_at,
            )
            yield first, record
            if record.state in TERMINAL:
                return
            while True:
                event = (await queue.get()).event
                record = await self.store.get(job_id) or record
                yield event, record
                if state_name(event.state) in TERMINAL:
                    return
        finally:
            self.hub.forget(job_id, queue)

    # -- remediation ------------------------------------------------------------------

    async def remediate(self, job_id: str, remediation_id: str, caller: Caller) -> Submitted:
        record = await self.get(job_id, caller)
        options = list(record.job.safety.remediations)
        if not options:
            raise failed_precondition(
                R.ERROR_REASON_NO_REMEDIATIONS, f"job {job_id} has no remediations"
            )
        if remediation_id:
            chosen = next((o for o in options if o.id == remediation_id), None)
            if chosen is None:
                raise not_found(
                    R.ERROR_REASON_REMEDIATION_NOT_FOUND, f"no remediation {remediation_id!r}"
                )
        elif len(options) == 1:
            chosen = options[0]
        else:
            raise invalid_field(
                "remediation_id", f"required: choose one of {[o.id for o in options]}"
            )
        context = await self.store.redis.get(cap.context_key(job_id))
        if context is None:
            raise not_found(R.ERROR_REASON_MEMORY_NOT_FOUND, f"the input of {job_id} expired")
        new_id = str(uuid.uuid4())
        request = agent.JobRequest()
        request.CopyFrom(record.request)
        request.job_id = new_id
        request.parent_job_id = job_id
        request.context_ptr = cap.redis_pointer(cap.context_key(new_id))
        request.memory_id = record.request.memory_id
        request.ClearField("dispatch")
        if chosen.replacement_topic:
            request.topic = chosen.replacement_topic
        if chosen.replacement_capability:
            request.meta.capability = chosen.replacement_capability
        labels = {k: v for k, v in request.labels.items() if not k.lower().startswith("approval_")}
        labels.update(chosen.add_labels)
        for key in chosen.remove_labels:
            labels.pop(key, None)
        labels["remediation_of"] = job_id
        labels["remediation_id"] = chosen.id
        request.labels.clear()
        request.labels.update(labels)
        request.meta.labels.clear()
        request.meta.labels.update(labels)
        job = job_pb2.Job()
        job.CopyFrom(record.job)
        for name in RUNTIME_FIELDS:
            job.ClearField(name)
        job.id = new_id
        job.parent_job_id = job_id
        job.topic = request.topic
        job.capability = request.meta.capability
        job.context_ptr = request.context_ptr
        job.idempotency_key = ""
        job.labels.clear()
        job.labels.update(labels)
        new = NewJob(job=job, request=request, ctx_key=cap.context_key(new_id), ctx_json=context)
        return await self.submit_built(BuiltJob(new, ""), caller)


def result_value(raw: bytes | None) -> object | None:
    """The worker's output as JSON, or its text when it is not JSON."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def state_of(name: str) -> int:
    return state_enum(name)
