"""The scheduler: every PENDING job gets a safety decision, then is dispatched to a worker,
held for approval, throttled, or ended; every worker result ends or retries its job.

Runs as N replicas: submits, results and cancels arrive through NATS queue groups, and
every state change is one compare-and-set Lua script, so replicas never double-dispatch
and duplicate or late messages are recorded and ignored.

Per job, on the hot path (plain NATS):
  submit: 1 safety check (in-process: no I/O; remote: 1 gRPC call) + 1 Redis script
          (pipelined with every other job of the same batch) + 1 NATS publish (dispatch)
          + 1 NATS publish (job event). A gateway in the same process hands its submits over
          directly (`submit_local`): no bus message, and the job is created and admitted by
          the same script call.
  result: 1 Redis script (pipelined per batch; for a caller waiting in this process it also
          returns the record and the result) + 1 NATS publish (job event)
JetStream mode adds 1 ack per bus submit and result (plus 1 pull request per fetched batch),
and the stream stores each dispatch (no round trip: it is not waited for).
The effective config of each job (system → org → team → workflow → step) is attached to the
dispatched request (env CORDUM_EFFECTIVE_CONFIG) and given to the safety kernel, from the
config service's in-process cache (once per distinct scope set per batch: no Redis round
trip per job).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, replace

from google.protobuf import json_format
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind

from cordum.agent.v1 import buspacket_pb2, job_pb2, safety_pb2
from cordum.sdk import cap
from cordum.server.bus import Batcher, Subjects
from cordum.server.config_files import PoolsConfig, TimeoutsConfig
from cordum.server.inbound import Inbound
from cordum.server.jetstream import DurablePublisher
from cordum.server.metrics import Metrics
from cordum.server.safety.client import KernelUnavailable, LocalSafetyClient, SafetyClient
from cordum.server.safety.evaluate import retry_after_ms
from cordum.server.services.config_service import EffectiveConfigSource
from cordum.server.services.job_events import JobEventPublisher
from cordum.server.services.lost_dispatches import LostDispatches
from cordum.server.services.placement import Placement, Unplaceable, place
from cordum.server.services.workers import WorkerRegistry
from cordum.server.stores.jobs import (
    Admission,
    AdmitOutcome,
    CompleteOutcome,
    Completion,
    JobStore,
    NewJob,
    SubmitOutcome,
    ms_timestamp,
)
from cordum.server.tracing import CAP_TRACE_ID, JOB_ID, TOPIC, Context, Tracing
from cordum.v1 import job_pb2 as v1_job_pb2

logger = logging.getLogger(__name__)

_D = safety_pb2.DecisionType
_STATUS = job_pb2.JobStatus

# Worker statuses → the job state they end in (anything else is a failure).
_RESULT_STATES = {
    _STATUS.JOB_STATUS_SUCCEEDED: "SUCCEEDED",
    _STATUS.JOB_STATUS_FAILED: "FAILED",
    _STATUS.JOB_STATUS_FAILED_RETRYABLE: "FAILED",
    _STATUS.JOB_STATUS_FAILED_FATAL: "FAILED",
    _STATUS.JOB_STATUS_TIMEOUT: "TIMEOUT",
    _STATUS.JOB_STATUS_CANCELLED: "CANCELLED",
    _STATUS.JOB_STATUS_DENIED: "DENIED",
}


def now_ms() -> int:
    return int(time.time() * 1000)


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel a background loop and wait for it to end, cancelling again if a cancellation
    got lost inside an await (on Python 3.11 a cancel racing a finishing `wait_for` can be
    swallowed; the loop then goes on and a plain cancel-then-await never returns)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled() and task.exception() is not None:
        logger.error("task %s ended with an error", task.get_name(), exc_info=task.exception())


def job_hash(request: job_pb2.JobRequest) -> str:
    """SHA-256 of the request an approval is bound to (approval labels and injected
    config excluded, so approving does not change it)."""
    clone = job_pb2.JobRequest()
    clone.CopyFrom(request)
    for key in [k for k in clone.labels if k.lower().startswith("approval_")]:
        del clone.labels[key]
    clone.env.pop(EFFECTIVE_CONFIG_ENV, None)
    clone.ClearField("dispatch")
    clone.budget.deadline_ms = request.budget.deadline_ms
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).hexdigest()


EFFECTIVE_CONFIG_ENV = "CORDUM_EFFECTIVE_CONFIG"


def dlq_notice(
    sender_id: str, job_id: str, state: str, code: str, reason: str
) -> tuple[buspacket_pb2.BusPacket, str]:
    """The DLQ notice of a job that ended in `state` (its entry is already in Redis, written
    by the transition), and its message id (JetStream stores one per job, state and code).
    CAP admits a JobResult only when its worker_id is the sender's id."""
    result = job_pb2.JobResult(
        job_id=job_id,
        status=job_pb2.JobStatus.Value(f"JOB_STATUS_{state}"),
        error_code=code,
        error_message=reason,
        worker_id=sender_id,
    )
    packet = cap.envelope(sender_id=sender_id, trace_id=job_id, job_result=result)
    return packet, f"{job_id}:dlq:{state}:{code}"


def request_tenant(request: job_pb2.JobRequest) -> str:
    return request.tenant_id or request.meta.tenant_id or request.env.get("tenant_id", "")


def config_scopes(request: job_pb2.JobRequest) -> tuple[str, str, str, str]:
    """(org, team, workflow, step) of a job's effective config, as upstream reads them."""
    env = request.env
    return (
        request_tenant(request) or "default",
        env.get("team_id", ""),
        request.workflow_id or env.get("workflow_id", ""),
        env.get("step_id", ""),
    )


def policy_request(
    request: job_pb2.JobRequest, effective_config: bytes | None = None
) -> safety_pb2.PolicyCheckRequest:
    """The kernel's view of a job; `effective_config` (when given) replaces whatever the
    request's env carries."""
    if effective_config is None:
        effective_config = request.env.get(EFFECTIVE_CONFIG_ENV, "").encode()
    return safety_pb2.PolicyCheckRequest(
        job_id=request.job_id,
        topic=request.topic,
        tenant=request_tenant(request),
        priority=request.priority,
        budget=request.budget,
        principal_id=request.principal_id,
        labels=dict(request.labels),
        memory_id=request.memory_id,
        meta=request.meta,
        effective_config=effective_config,
    )


@dataclass(frozen=True)
class SchedulerConfig:
    sender_id: str = "cordum-scheduler"
    due_poll_s: float = 0.05
    no_worker_retry_ms: int = 2000
    retry_backoff_base_ms: int = 1000
    retry_backoff_cap_ms: int = 60_000
    kernel_backoff_base_ms: int = 250
    kernel_backoff_cap_ms: int = 30_000
    # Identifies this replica in dispatched jobs; its lease lives while it does.
    instance_id: str = "scheduler"
    lease_ms: int = 5000


@dataclass
class _Decision:
    kind: str  # allow | deny | require | throttle
    response: safety_pb2.PolicyCheckResponse | None
    retry_after_ms: int = 0
    reason: str = ""


@dataclass
class _Pending:
    request: job_pb2.JobRequest
    trace_id: str
    decision: _Decision | None = None
    placement: Placement | Unplaceable | None = None
    hash: str = ""
    # The job's effective config (JSON; b"" = none attached).
    effective: bytes = b""
    # A job handed over by a gateway in this process: created by the admission's script.
    new: NewJob | None = None
    created: asyncio.Future[SubmitOutcome] | None = None
    # When it was submitted (epoch s; 0 = picked up again later: not a dispatch latency),
    # and the submitter's span context (tracing), if it came with one.
    submitted_s: float = 0.0
    trace_ctx: Context | None = None


class Scheduler:
    def __init__(
        self,
        *,
        nats: NATS,
        store: JobStore,
        safety: SafetyClient,
        registry: WorkerRegistry,
        pools: PoolsConfig,
        timeouts: TimeoutsConfig,
        subjects: Subjects,
        metrics: Metrics,
        events: JobEventPublisher,
        config: SchedulerConfig | None = None,
        effective_config: EffectiveConfigSource | None = None,
        out: NATS | None = None,
        inbound: Inbound | None = None,
        tracing: Tracing | None = None,
        durable: DurablePublisher | None = None,
        core_intake: bool = True,
    ) -> None:
        self.nats = nats
        # What this scheduler publishes (dispatches, DLQ notices, cancels) goes out on `out`:
        # in a gateway process, the connection the job events use too, so one flush carries
        # a batch's dispatches and events together.
        self.out = out or nats
        # Dispatches and DLQ notices (JetStream mode: with message ids, DLQ notices acked).
        self.durable = durable or DurablePublisher(self.out)
        # False in JetStream mode: submits and results come from durable consumers
        # (services/durable_intake.py) through admit_messages / complete_messages.
        self.core_intake = core_intake
        self.store = store
        self.safety = safety
        self.registry = registry
        self.pools = pools
        self.timeouts = timeouts
        self.subjects = subjects
        self.metrics = metrics
        self.events = events
        self.config = config or SchedulerConfig()
        self.effective_config = effective_config
        self.tracing = tracing or Tracing()
        # Results in the work queue: (their sender's span context, arrival ns) for the span
        # of their handling; kept only while tracing is on.
        self._result_traces: dict[str, tuple[Context | None, int, str]] = {}
        # Decodes (and verifies) what we receive; its trust signs what we publish.
        self.inbound = inbound or Inbound(metrics=metrics)
        self.trust = self.inbound.trust
        # An in-process kernel answers without I/O: asking it job by job costs no task each.
        self._local_safety = isinstance(safety, LocalSafetyClient)
        self._admits: Batcher[_Pending] = Batcher(self._admit_batch, name="scheduler-admit")
        # Submits handed over in-process and worker results: one Redis round trip (and one
        # NATS flush) per drained batch of both.
        self._work: Batcher[_Pending | job_pb2.JobResult] = Batcher(
            self._work_batch, name="scheduler-work"
        )
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._kernel_failures = 0
        # Our dispatches to known workers, until their result: re-queued when the worker's
        # idle heartbeats show they never arrived (services/lost_dispatches.py).
        self.lost_dispatches = LostDispatches(
            store=store, registry=registry, events=events, complete=self.complete, metrics=metrics
        )

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        queue = self.subjects.queue("scheduler")
        sub = self.nats.subscribe
        self._subs = [
            await sub(cap.SUBJECT_PROGRESS, queue=queue, cb=self._on_progress),
            await sub(self.subjects.cancel, queue=queue, cb=self._on_cancel),
        ]
        if self.core_intake:
            self._subs += [
                await sub(self.subjects.submit, queue=queue, cb=self._on_submit),
                await sub(cap.SUBJECT_RESULT, queue=queue, cb=self._on_result),
            ]
        await self._renew_lease()
        self.lost_dispatches.start()
        self._tasks.append(asyncio.create_task(self._due_loop(), name="scheduler-due"))
        self._tasks.append(asyncio.create_task(self._lease_loop(), name="scheduler-lease"))

    def lease_key(self, instance_id: str) -> str:
        return f"{self.store.prefix}scheduler:alive:{instance_id}"

    async def _renew_lease(self) -> None:
        key = self.lease_key(self.config.instance_id)
        await self.store.redis.set(key, "1", px=self.config.lease_ms)

    async def _lease_loop(self) -> None:
        # Renewed three times per lease: a replica that stops renewing died (or froze), and
        # the reconciler re-queues the dispatches it had recorded but maybe never sent.
        while True:
            await asyncio.sleep(self.config.lease_ms / 3000)
            try:
                await self._renew_lease()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("scheduler lease renewal failed", exc_info=True)

    async def complete(self, results: list[job_pb2.JobResult]) -> None:
        """Apply results that did not come over the bus (recovered by the reconciler)."""
        await self._result_batch(results)

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []
        await self.lost_dispatches.stop()
        await self._work.drain()
        await self._admits.drain()

    # -- intake ------------------------------------------------------------------------

    def _decode(self, msg: Msg, kind: str) -> buspacket_pb2.BusPacket | None:
        """The packet, with the payload `kind` carries; None when dropped (and counted)."""
        return self.inbound.packet(msg, kind)

    def _submitted(self, msg: Msg) -> _Pending | None:
        packet = self._decode(msg, "submit")
        if packet is None:
            return None
        return _Pending(
            packet.job_request,
            packet.trace_id,
            submitted_s=packet.created_at.ToNanoseconds() / 1e9,
            trace_ctx=self.tracing.extract(msg.headers),
        )

    def _received(self, msg: Msg) -> job_pb2.JobResult | None:
        packet = self._decode(msg, "result")
        if packet is None:
            return None
        if self.tracing.enabled:
            self._result_traces[packet.job_result.job_id] = (
                self.tracing.extract(msg.headers),
                time.time_ns(),
                packet.trace_id,
            )
        return packet.job_result

    async def _on_submit(self, msg: Msg) -> None:
        pending = self._submitted(msg)
        if pending is not None:
            self._admits.add(pending)

    async def _on_result(self, msg: Msg) -> None:
        result = self._received(msg)
        if result is not None:
            self._work.add(result)

    async def admit_messages(self, msgs: list[Msg]) -> None:
        """Submits from a durable consumer: decided and written when this returns (the
        consumer acks them then); raises when the batch's Redis work failed."""
        batch = [p for p in map(self._submitted, msgs) if p is not None]
        if batch:
            await self._admit_batch(batch)

    async def complete_messages(self, msgs: list[Msg]) -> None:
        """Results from a durable consumer: applied when this returns, else it raises."""
        results = [r for r in map(self._received, msgs) if r is not None]
        if not results:
            return
        try:
            await self._result_batch(results)
        except Exception:
            for r in results:
                self._result_traces.pop(r.job_id, None)
            raise

    def readmit(self, request: job_pb2.JobRequest, trace_id: str) -> None:
        """Queue a stored PENDING job for another decision (due queue, replayer, approval)."""
        self._admits.add(_Pending(request, trace_id))

    def submit_local(self, new: NewJob) -> asyncio.Future[SubmitOutcome]:
        """A gateway in this process submits: decide first, then create and admit the job
        in one script call (pipelined with the rest of the batch). No bus message. The
        future holds what job_submit.lua would have answered."""
        created: asyncio.Future[SubmitOutcome] = asyncio.get_running_loop().create_future()
        self._work.add(
            _Pending(
                new.request,
                new.job.trace_id,
                new=new,
                created=created,
                submitted_s=time.time(),
                trace_ctx=self.tracing.current(),
            )
        )
        return created

    # -- decisions --------------------------------------------------------------------

    async def _attach_effective_config(self, batch: list[_Pending]) -> None:
        source = self.effective_config
        if source is None:
            return
        # Once per distinct scope set in the batch; the service caches merges in memory.
        found: dict[tuple[str, str, str, str], bytes] = {}
        for p in batch:
            scopes = config_scopes(p.request)
            effective = found.get(scopes)
            if effective is None:
                effective = found[scopes] = (await source(*scopes))[0]
            p.effective = effective

    async def _decide_all(self, batch: list[_Pending]) -> None:
        await self._attach_effective_config(batch)
        if self._local_safety:
            for p in batch:
                p.decision = await self._decide_traced(p)
        else:
            decisions = await asyncio.gather(*(self._decide_traced(p) for p in batch))
            for p, decision in zip(batch, decisions, strict=True):
                p.decision = decision

    async def _decide_traced(self, pending: _Pending) -> _Decision:
        if not self.tracing.enabled:
            return await self._decide(pending)
        with self.tracing.span(
            "cordum.safety.check", pending.trace_ctx, attributes=_span_attributes(pending)
        ) as span:
            decision = await self._decide(pending)
            span.set_attribute("cordum.safety.decision", decision.kind)
            return decision

    async def _decide(self, pending: _Pending) -> _Decision:
        try:
            response = await self.safety.check(policy_request(pending.request, pending.effective))
        except KernelUnavailable as exc:
            # Never a terminal deny: the job waits and asks again (upstream denied it).
            self._kernel_failures += 1
            backoff = min(
                self.config.kernel_backoff_cap_ms,
                self.config.kernel_backoff_base_ms * 2 ** min(self._kernel_failures - 1, 16),
            )
            return _Decision("throttle", None, backoff, f"safety kernel unavailable: {exc}")
        self._kernel_failures = 0
        decision = response.decision
        if decision == _D.DECISION_TYPE_REQUIRE_HUMAN or response.approval_required:
            return _Decision("require", response, reason=response.reason)
        if decision in (_D.DECISION_TYPE_ALLOW, _D.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS):
            return _Decision("allow", response)
        if decision == _D.DECISION_TYPE_THROTTLE:
            delay = retry_after_ms(response) or 5000
            return _Decision("throttle", response, delay, response.reason or "throttled")
        if decision == _D.DECISION_TYPE_DENY:
            return _Decision("deny", response, reason=response.reason or "denied by policy")
        return _Decision(
            "deny", response, reason=f"unsupported safety decision {_D.Name(decision)}"
        )

    def _admission(self, p: _Pending, now: int) -> Admission:
        d = p.decision
        assert d is not None
        response = d.response
        record = b""
        snapshot = ""
        if response is not None:
            snapshot = response.policy_snapshot
            decision = v1_job_pb2.SafetyDecision(
                decision=response.decision,
                reason=response.reason,
                rule_id=response.rule_id,
                policy_snapshot=snapshot,
                constraints=response.constraints,
                approval_required=response.approval_required or d.kind == "require",
                approval_ref=response.approval_ref,
                job_hash=p.hash,
                remediations=response.remediations,
                checked_at=ms_timestamp(now),
            )
            record = decision.SerializeToString()
        base = Admission(
            job_id=p.request.job_id,
            decision=d.kind,
            decision_bytes=record,
            job_hash=p.hash,
            snapshot=snapshot,
            retry_after_ms=d.retry_after_ms,
            reason=d.reason,
            dispatcher=self.config.instance_id,
        )
        if d.kind == "require":
            # Held unless the job carries a matching approval; then it runs as allowed.
            granted = self._allowed(replace(base, decision="allow", reason=""), p, response, now)
            return replace(
                base,
                approved=granted.decision,
                approved_reason=granted.reason,
                worker_id=granted.worker_id,
                subject=granted.subject,
                max_retries_cap=granted.max_retries_cap,
                deadline_ms=granted.deadline_ms,
                max_concurrent=granted.max_concurrent,
                retry_after_ms=granted.retry_after_ms,
                fail_code=granted.fail_code,
            )
        if d.kind != "allow":
            return base
        return self._allowed(base, p, response, now)

    def _allowed(
        self,
        base: Admission,
        p: _Pending,
        response: safety_pb2.PolicyCheckResponse | None,
        now: int,
    ) -> Admission:
        budgets = response.constraints.budgets if response is not None else None
        max_runtime = budgets.max_runtime_ms if budgets is not None else 0
        placement = p.placement
        if isinstance(placement, Unplaceable):
            if placement.final:
                return replace(
                    base, decision="fail", reason=placement.reason, fail_code=placement.code
                )
            return replace(
                base,
                decision="throttle",
                reason=placement.reason,
                retry_after_ms=self.config.no_worker_retry_ms,
            )
        assert placement is not None
        return replace(
            base,
            worker_id=placement.worker_id,
            subject=placement.subject,
            max_retries_cap=budgets.max_retries if budgets and budgets.max_retries > 0 else -1,
            deadline_ms=now + max_runtime if max_runtime > 0 else 0,
            max_concurrent=budgets.max_concurrent_jobs if budgets else 0,
        )

    def _prepare(self, batch: list[_Pending], now: int) -> list[Admission]:
        """Place the decided jobs and turn each decision into the admission to write."""
        workers = self.registry.workers()
        for pending in batch:
            decision = pending.decision
            assert decision is not None
            if decision.kind == "require":
                pending.hash = job_hash(pending.request)
                # Placed too: an approved job is dispatched by the same admission.
                pending.placement = place(pending.request, workers, self.pools)
            elif decision.kind == "allow":
                pending.placement = place(pending.request, workers, self.pools)
                if isinstance(pending.placement, Placement) and pending.placement.worker_id:
                    # Count it now, so the rest of the batch spreads over the workers.
                    self.registry.note_dispatch(pending.placement.worker_id)
        return [self._admission(p, now) for p in batch]

    async def _admit_batch(self, batch: list[_Pending]) -> None:
        await self._decide_all(batch)
        now = now_ms()
        admissions = self._prepare(batch, now)
        outcomes = await self.store.admit_many(admissions, now)
        missing: list[_Pending] = []
        for pending, admission, outcome in zip(batch, admissions, outcomes, strict=True):
            if outcome.kind == "missing":
                missing.append(pending)
                continue
            await self._settle_safely(pending, admission, outcome, now)
        if missing:
            await self._intake(missing, now)

    async def _work_batch(self, batch: list[_Pending | job_pb2.JobResult]) -> None:
        creates = [item for item in batch if isinstance(item, _Pending)]
        results = [item for item in batch if not isinstance(item, _Pending)]
        completions = [self._completion(r) for r in results]
        wanted = [self.events.wanted(c.job_id) for c in completions]
        try:
            await self._decide_all(creates)
            now = now_ms()
            admissions = self._prepare(creates, now)
            items = []
            for p, a in zip(creates, admissions, strict=True):
                assert p.new is not None
                items.append((p.new, a))
            created, completed = await self.store.submit_admit_and_complete(
                items, completions, now, wanted
            )
        except Exception as exc:
            for p in creates:
                if p.created is not None and not p.created.done():
                    p.created.set_exception(exc)
            if results:
                # Unapplied results: the reconciler completes them from res:<id> later.
                logger.exception("applying %d worker results failed", len(results))
                for r in results:
                    self._result_traces.pop(r.job_id, None)
            return
        for pending, admission, (outcome, admitted) in zip(
            creates, admissions, created, strict=True
        ):
            if admitted is not None:
                await self._settle_safely(pending, admission, admitted, now)
            assert pending.created is not None
            if not pending.created.done():
                pending.created.set_result(outcome)
        await self._announce_results(completions, completed)

    async def _settle_safely(
        self, pending: _Pending, admission: Admission, outcome: AdmitOutcome, now: int
    ) -> None:
        # One job's failure (a publish on a closing connection) must not strand the rest of
        # the batch, whose states are already written.
        try:
            await self._settle(pending, admission, outcome, now)
        except Exception:
            logger.exception("settling the admission of %s failed", pending.request.job_id)

    async def _settle(
        self, pending: _Pending, admission: Admission, outcome: AdmitOutcome, now: int
    ) -> None:
        """Act on what the admission script decided: dispatch, announce, dead-letter."""
        request = pending.request
        kind = outcome.kind
        if kind == "dispatched":
            await self._dispatch(pending, outcome.attempts, outcome.deadline_ms, now)
        elif kind == "duplicate":
            logger.debug("ignored submit for %s in state %s", request.job_id, outcome.detail)
            return
        elif kind == "throttled":
            await self.events.publish(request.job_id, "PENDING", outcome.detail)
            return
        state = _ADMITTED_STATES[kind]
        self.metrics.jobs_transitions.labels(state, request.topic).inc()
        if kind == "dispatched":
            return
        reason = outcome.detail or (pending.decision.reason if pending.decision else "")
        await self.events.publish(request.job_id, state, reason)
        if kind == "denied":
            await self.publish_dlq(request.job_id, state, "safety_denied", reason)
        elif kind == "failed":
            code = admission.fail_code or "max_retries_exceeded"
            await self.publish_dlq(request.job_id, state, code, reason)

    async def _intake(self, batch: list[_Pending], now: int) -> None:
        """Jobs published on sys.job.submit by a CAP client (no record yet): store, admit."""
        news = [
            NewJob(
                job=v1_job_pb2.Job(
                    id=p.request.job_id,
                    trace_id=p.trace_id,
                    topic=p.request.topic,
                    tenant_id=p.request.tenant_id or p.request.meta.tenant_id or "default",
                    principal_id=p.request.principal_id,
                    priority=p.request.priority,
                    labels=dict(p.request.labels),
                    context_ptr=p.request.context_ptr,
                    memory_id=p.request.memory_id,
                    budget=p.request.budget,
                    parent_job_id=p.request.parent_job_id,
                ),
                request=p.request,
                ctx_key="",
                ctx_json=b"",
            )
            for p in batch
        ]
        await self.store.submit_many(news, now)
        for p in batch:
            self._admits.add(_Pending(p.request, p.trace_id))

    async def _dispatch(self, p: _Pending, attempt: int, deadline_ms: int, now: int) -> None:
        placement = p.placement
        if not isinstance(placement, Placement):
            # Recorded as dispatched without a target: never strand it, ask again.
            logger.error("job %s admitted without a placement; re-queued", p.request.job_id)
            moved = await self.store.transition(
                p.request.job_id,
                allowed_from=["DISPATCHED"],
                to="PENDING",
                message="re-queued: no placement",
                now_ms=now,
                fields={"attempts": max(attempt - 1, 0)},
            )
            if moved.ok:
                await self.store.schedule_due(p.request.job_id, now)
            return
        request = job_pb2.JobRequest()
        request.CopyFrom(p.request)
        if p.effective:
            request.env[EFFECTIVE_CONFIG_ENV] = p.effective.decode()
        response = p.decision.response if p.decision else None
        if response is not None and response.HasField("constraints"):
            _apply_constraints(request, response.constraints)
        if deadline_ms > 0:
            request.budget.deadline_ms = max(deadline_ms - now, 1)
        request.dispatch.CopyFrom(
            job_pb2.DispatchIdentity(
                dispatch_id=f"{request.job_id}@{attempt}",
                attempt=attempt,
                assigned_worker_id=placement.worker_id,
            )
        )
        packet = cap.envelope(
            sender_id=self.config.sender_id,
            trace_id=p.trace_id or request.job_id,
            job_request=request,
        )
        # The worker continues the trace from the headers; the CAP bytes are the same.
        attributes: dict[str, str | int] | None = None
        if self.tracing.enabled:  # not built per job when tracing is off
            attributes = {**_span_attributes(p), "messaging.destination.name": placement.subject}
        with self.tracing.span(
            "cordum.job.dispatch", p.trace_ctx, kind=SpanKind.PRODUCER, attributes=attributes
        ):
            # Captured, not acked, in JetStream mode: CAP workers read it with core
            # subscriptions, so only the reconciler can re-send a dispatch nobody took.
            await self.durable.publish(
                placement.subject,
                self.trust.encode(packet),
                msg_id=request.dispatch.dispatch_id,
                headers=self.tracing.headers(),
                acked=False,
            )
        if placement.worker_id:
            self.lost_dispatches.note(request.job_id, placement.worker_id, now)
        if p.submitted_s:
            self.metrics.dispatch_latency.observe(max(0.0, time.time() - p.submitted_s))
        await self.events.publish(
            request.job_id, "DISPATCHED", f"attempt {attempt} on {placement.subject}"
        )

    async def publish_dlq(self, job_id: str, state: str, code: str, reason: str) -> None:
        """Tell DLQ listeners (the entry itself is already in Redis)."""
        packet, msg_id = dlq_notice(self.config.sender_id, job_id, state, code, reason)
        await self.durable.publish(self.subjects.dlq, self.trust.encode(packet), msg_id=msg_id)

    # -- results ----------------------------------------------------------------------

    def _completion(self, r: job_pb2.JobResult) -> Completion:
        state = _RESULT_STATES.get(r.status, "FAILED")
        message = r.error_message
        if r.status not in _RESULT_STATES:
            message = f"unexpected status {_STATUS.Name(r.status)}: {message}"
        never_retry = r.status == _STATUS.JOB_STATUS_FAILED_FATAL
        return Completion(
            job_id=r.job_id,
            status=state,
            result_ptr=r.result_ptr,
            worker_id=r.worker_id,
            execution_ms=r.execution_ms,
            error_code=r.error_code,
            error_message=message,
            artifact_ptrs=list(r.artifact_ptrs),
            backoff_base_ms=-1 if never_retry else self.config.retry_backoff_base_ms,
            backoff_cap_ms=self.config.retry_backoff_cap_ms,
        )

    async def _result_batch(self, batch: list[job_pb2.JobResult]) -> None:
        completions = [self._completion(r) for r in batch]
        wanted = [self.events.wanted(c.job_id) for c in completions]
        outcomes = await self.store.complete_many(completions, now_ms(), wanted)
        await self._announce_results(completions, outcomes)

    async def _announce_results(
        self, completions: list[Completion], outcomes: list[CompleteOutcome]
    ) -> None:
        for c, outcome in zip(completions, outcomes, strict=True):
            self.lost_dispatches.forget(c.job_id)
            traced = self._result_traces.pop(c.job_id, None) if self._result_traces else None
            try:
                if traced is None:
                    await self._announce_result(c, outcome)
                else:
                    await self._announce_traced(c, outcome, *traced)
            except Exception:
                logger.exception("announcing the result of %s failed", c.job_id)

    async def _announce_traced(
        self,
        c: Completion,
        outcome: CompleteOutcome,
        parent: Context | None,
        arrived_ns: int,
        trace_id: str,
    ) -> None:
        """The span of a result's handling: from its arrival (the batch's Redis write
        included) to its announcement, child of the worker's span when it sent one."""
        attributes = {JOB_ID: c.job_id, CAP_TRACE_ID: trace_id, TOPIC: outcome.topic}
        with self.tracing.span(
            "cordum.job.result",
            parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time_ns=arrived_ns,
        ) as span:
            span.set_attribute("cordum.job.outcome", outcome.kind)
            span.set_attribute("cordum.job.state", outcome.state)
            await self._announce_result(c, outcome)

    async def _announce_result(self, c: Completion, outcome: CompleteOutcome) -> None:
        if outcome.kind == "done":
            await self.events.publish(
                c.job_id,
                outcome.state,
                c.error_message,
                record=outcome.record,
                result=outcome.result,
            )
            if outcome.state != "SUCCEEDED":
                code = c.error_code or outcome.state.lower()
                await self.publish_dlq(c.job_id, outcome.state, code, c.error_message)
        elif outcome.kind == "retry":
            await self.events.publish(
                c.job_id, "PENDING", f"attempt {outcome.attempts} failed; retry scheduled"
            )
        elif outcome.kind == "ignored":
            logger.info("ignored late result for %s (job is %s)", c.job_id, outcome.state)

    async def _on_progress(self, msg: Msg) -> None:
        packet = self._decode(msg, "progress")
        if packet is None:
            return
        progress = packet.job_progress
        moved = await self.store.transition(
            progress.job_id,
            allowed_from=["DISPATCHED"],
            to="RUNNING",
            message=f"progress {progress.percent}%: {progress.message}",
            now_ms=now_ms(),
        )
        if moved.ok or moved.previous == "RUNNING":
            await self.events.publish(
                progress.job_id, "RUNNING", f"{progress.percent}% {progress.message}".strip()
            )

    async def _on_cancel(self, msg: Msg) -> None:
        packet = self._decode(msg, "cancel")
        if packet is None:
            return
        cancel = packet.job_cancel
        outcome = await self.store.transition(
            cancel.job_id,
            allowed_from=["PENDING", "APPROVAL_REQUIRED", "SCHEDULED", "DISPATCHED", "RUNNING"],
            to="CANCELLED",
            message=f"cancelled by {cancel.requested_by}: {cancel.reason}",
            now_ms=now_ms(),
        )
        if outcome.ok:
            await self.events.publish(cancel.job_id, "CANCELLED", cancel.reason)

    # -- delayed work ------------------------------------------------------------------

    async def _due_loop(self) -> None:
        while True:
            try:
                await self._run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("due loop failed; retrying")
            await asyncio.sleep(self.config.due_poll_s)

    async def _run_due(self) -> None:
        ids = await self.store.claim_due(now_ms())
        if not ids:
            return
        for record in await self.store.get_many(ids):
            if record is not None and record.state == "PENDING":
                self.readmit(record.request, record.job.trace_id)


# The state an admission outcome (job_admit.lua) leaves a job in.
_ADMITTED_STATES = {
    "approval": "APPROVAL_REQUIRED",
    "denied": "DENIED",
    "failed": "FAILED",
    "dispatched": "DISPATCHED",
}


def _span_attributes(p: _Pending) -> dict[str, str | int]:
    return {JOB_ID: p.request.job_id, CAP_TRACE_ID: p.trace_id, TOPIC: p.request.topic}


def _apply_constraints(request: job_pb2.JobRequest, constraints: object) -> None:
    """Constraints travel with the job so the worker sees them (upstream's env names)."""
    assert isinstance(constraints, safety_pb2.PolicyConstraints)
    request.env["CORDUM_POLICY_CONSTRAINTS"] = json_format.MessageToJson(constraints, indent=None)
    if constraints.redaction_level:
        request.env["CORDUM_REDACTION_LEVEL"] = constraints.redaction_level
    budgets = constraints.budgets
    for name, value in (
        ("CORDUM_MAX_ARTIFACT_BYTES", budgets.max_artifact_bytes),
        ("CORDUM_MAX_CONCURRENT_JOBS", budgets.max_concurrent_jobs),
        ("CORDUM_MAX_RETRIES", budgets.max_retries),
        ("CORDUM_MAX_RUNTIME_MS", budgets.max_runtime_ms),
    ):
        if value > 0:
            request.env[name] = str(value)
