"""Human approvals for jobs the policy held (REQUIRE_HUMAN).

An approval is bound to the job's hash and to the policy in force when it is given: approve
re-checks the stored request against the current policy (a policy that now denies the job
refuses the approval; one that still requires approval binds it to the current snapshot),
and the scheduler only honours it while both hash and snapshot still match.
"""

from __future__ import annotations

import grpc

from cordum.agent.v1 import safety_pb2
from cordum.server.errors import CordumError, failed_precondition
from cordum.server.safety.client import KernelUnavailable, SafetyClient
from cordum.server.services.caller import Caller
from cordum.server.services.jobs import JobService, now_ms, page_size
from cordum.server.services.scheduler import dlq_notice, job_hash, policy_request
from cordum.server.stores.jobs import JobPage, JobRecord, ms_timestamp
from cordum.v1 import error_reason_pb2, job_pb2

R = error_reason_pb2
_D = safety_pb2.DecisionType


class ApprovalService:
    def __init__(self, *, jobs: JobService, safety: SafetyClient) -> None:
        self.jobs = jobs
        self.safety = safety

    async def list(self, size: int, token: str, caller: Caller) -> JobPage:
        return await self.jobs.store.list_jobs(
            tenant=caller.tenant_for(""),
            state="APPROVAL_REQUIRED",
            page_size=page_size(size),
            page_token=token,
        )

    async def _awaiting(self, job_id: str, caller: Caller) -> JobRecord:
        record = await self.jobs.get(job_id, caller)
        if record.state != "APPROVAL_REQUIRED":
            raise failed_precondition(
                R.ERROR_REASON_JOB_NOT_AWAITING_APPROVAL,
                f"job {job_id} is {record.state}, not awaiting approval",
            )
        stored = record.fields.get("job_hash", b"").decode()
        if not stored or stored != job_hash(record.request):
            raise failed_precondition(
                R.ERROR_REASON_JOB_REQUEST_CHANGED,
                "the job request changed since the decision; approval refused",
            )
        return record

    def _record(
        self, approved: bool, reason: str, note: str, caller: Caller, snapshot: str, hash_: str
    ) -> bytes:
        return job_pb2.ApprovalRecord(
            approved=approved,
            approved_by=caller.principal,
            role=caller.role,
            reason=reason,
            note=note,
            policy_snapshot=snapshot,
            job_hash=hash_,
            decided_at=ms_timestamp(now_ms()),
        ).SerializeToString()

    async def approve(self, job_id: str, reason: str, note: str, caller: Caller) -> JobRecord:
        record = await self._awaiting(job_id, caller)
        try:
            current = await self.safety.check(policy_request(record.request))
        except KernelUnavailable as exc:
            raise CordumError(
                grpc.StatusCode.UNAVAILABLE,
                R.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
                f"safety kernel unavailable: {exc}",
            ) from exc
        if current.decision == _D.DECISION_TYPE_DENY:
            raise failed_precondition(
                R.ERROR_REASON_POLICY_SNAPSHOT_CHANGED,
                f"the current policy ({current.policy_snapshot}) now decides "
                f"{_D.Name(current.decision)}: {current.reason}",
            )
        hash_ = job_hash(record.request)
        snapshot = current.policy_snapshot
        outcome = await self.jobs.store.transition(
            job_id,
            allowed_from=["APPROVAL_REQUIRED"],
            to="PENDING",
            message=f"approved by {caller.principal or 'api'}: {reason}".rstrip(": "),
            now_ms=now_ms(),
            fields={
                "approved_hash": hash_,
                "approved_snapshot": snapshot,
                "approval": self._record(True, reason, note, caller, snapshot, hash_),
            },
        )
        if not outcome.ok:
            raise failed_precondition(
                R.ERROR_REASON_JOB_NOT_AWAITING_APPROVAL,
                f"job {job_id} is {outcome.previous}, not awaiting approval",
            )
        # Watchers see the job leave APPROVAL_REQUIRED, as they see a rejection. Through the
        # same publisher as the scheduler's events, so a watcher in this process gets them in
        # the order they happened (PENDING before the DISPATCHED that follows).
        await self.jobs.events.publish(job_id, "PENDING", f"approved: {reason}".rstrip(": "))
        # Back to the scheduler at once (not on a reconciler tick).
        await self.jobs.publish_submit(record.request, record.job.trace_id, why="approved")
        return await self.jobs.get(job_id, caller)

    async def reject(self, job_id: str, reason: str, note: str, caller: Caller) -> JobRecord:
        record = await self._awaiting(job_id, caller)
        why = reason or "approval rejected"
        outcome = await self.jobs.store.transition(
            job_id,
            allowed_from=["APPROVAL_REQUIRED"],
            to="DENIED",
            message=f"rejected by {caller.principal or 'api'}: {why}",
            now_ms=now_ms(),
            dlq_status="JOB_STATUS_DENIED",
            dlq_code="approval_rejected",
            fields={
                "approval": self._record(
                    False,
                    why,
                    note,
                    caller,
                    record.job.safety.policy_snapshot,
                    job_hash(record.request),
                ),
            },
        )
        if not outcome.ok:
            raise failed_precondition(
                R.ERROR_REASON_JOB_NOT_AWAITING_APPROVAL,
                f"job {job_id} is {outcome.previous}, not awaiting approval",
            )
        packet, msg_id = dlq_notice(self.jobs.sender_id, job_id, "DENIED", "approval_rejected", why)
        await self.jobs.durable.publish(
            self.jobs.subjects.dlq, self.jobs.trust.encode(packet), msg_id=msg_id
        )
        await self.jobs.events.publish(job_id, "DENIED", why)
        return await self.jobs.get(job_id, caller)
