"""The dead-letter queue: list, get, delete and retry the jobs that ended without success.

Entries are written by the job scripts in the same call as the terminal transition (so an
entry exists exactly when a job ended FAILED/TIMEOUT/DENIED/CANCELLED-by-policy) and are
bounded (`dlq_max_entries`, oldest dropped first).

Retry rule: a retry is a NEW job, never a restart of the old one (terminal states are
final). It is a copy of the original's stored JobRequest — labels, metadata, budget,
priority, memory id, requirements, max_retries — with
  - id `<original>-retry-<n>` (n = 1, 2, ... per entry; a UUID when that would exceed the
    200-character id limit), `parent_job_id` = the original, label `retry_of` = the original;
  - the original's input copied from `ctx:<original>` to `ctx:<new>` (a CAP client's own
    context pointer is kept as it is);
  - the original's trace id, so the trace shows both;
  - a fresh deadline from the budget's `deadline_ms`, no idempotency key.
It is submitted through JobService like any job, so it passes the safety gate again (a
policy change since then applies). The entry is KEPT, with `retry_job_ids` naming the jobs
made from it (newest 50) and `retries` counting them, so the link stays visible; delete it
explicitly when done. Retrying again makes `-retry-2`, and so on. A retried job that fails
gets a DLQ entry of its own.
Upstream instead built a minimal request (dropping labels, metadata, budget, priority),
took a fresh trace id and deleted the entry.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid

import grpc

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.server.errors import CordumError, Violations, not_found
from cordum.server.services.caller import Caller
from cordum.server.services.job_validation import BuiltJob, check_id
from cordum.server.services.jobs import RUNTIME_FIELDS, JobService, Submitted, now_ms
from cordum.server.stores.dlq import DLQPage, DLQRecord, DLQStore
from cordum.server.stores.jobs import NewJob, ms_timestamp
from cordum.v1 import error_reason_pb2, job_pb2

R = error_reason_pb2

DEFAULT_PAGE = 100
MAX_PAGE = 1000
RETRY_LABEL = "retry_of"


def _missing(job_id: str) -> CordumError:
    return not_found(R.ERROR_REASON_DLQ_ENTRY_NOT_FOUND, f"dlq entry {job_id} not found")


def _check_id(job_id: str) -> str:
    return check_id(job_id.strip(), "job_id")


def retry_id(job_id: str, n: int) -> str:
    candidate = f"{job_id}-retry-{n}"
    return candidate if len(candidate) <= 200 else str(uuid.uuid4())


class DLQService:
    def __init__(self, store: DLQStore, jobs: JobService) -> None:
        self._store = store
        self._jobs = jobs

    async def get(self, job_id: str, caller: Caller) -> DLQRecord:
        job_id = _check_id(job_id)
        record = await self._store.get(job_id)
        if record is None or not caller.can_see(record.tenant):
            raise _missing(job_id)
        return record

    async def delete(self, job_id: str, caller: Caller) -> None:
        job_id = _check_id(job_id)
        if not await self._store.delete(job_id, caller.tenant):
            raise _missing(job_id)

    async def list(
        self, page_size: int, page_token: str, topic: str, reason_code: str, caller: Caller
    ) -> tuple[list[DLQRecord], str]:
        problems = Violations()
        if page_size < 0:
            problems.add("page_size", "must not be negative")
        topic, reason_code = topic.strip(), reason_code.strip()
        if len(topic) > 200:
            problems.add("topic", "at most 200 characters")
        if len(reason_code) > 200:
            problems.add("reason_code", "at most 200 characters")
        query = f"{caller.tenant or ''}|{topic}|{reason_code}"
        after: tuple[int, str] | None = None
        if page_token:
            try:
                raw = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after = (int(raw["s"]), str(raw["m"]))
                if raw["q"] != query:
                    problems.add("page_token", "the token belongs to a different query")
            except (binascii.Error, ValueError, KeyError, TypeError):
                problems.add("page_token", "not a token from a previous ListDLQEntries")
        problems.raise_if_any()
        page: DLQPage = await self._store.list(
            caller.tenant,
            topic=topic,
            reason_code=reason_code,
            page_size=min(page_size or DEFAULT_PAGE, MAX_PAGE),
            after=after,
        )
        token = ""
        if page.next_after is not None:
            raw_token = {"s": page.next_after[0], "m": page.next_after[1], "q": query}
            token = base64.urlsafe_b64encode(json.dumps(raw_token).encode()).decode()
        return page.entries, token

    async def retry(self, job_id: str, caller: Caller) -> Submitted:
        entry = await self.get(job_id, caller)
        record = await self._jobs.store.get(entry.job_id)
        if record is None or not caller.can_see(record.tenant):
            raise not_found(
                R.ERROR_REASON_JOB_NOT_FOUND,
                f"job {job_id} has expired; its dlq entry can no longer be retried",
            )
        original = record.request
        own_context = original.context_ptr == cap.redis_pointer(cap.context_key(job_id))
        context = b""
        if own_context:
            context = await self._jobs.store.redis.get(cap.context_key(job_id)) or b""
            if not context:
                raise not_found(
                    R.ERROR_REASON_MEMORY_NOT_FOUND,
                    f"the input of job {job_id} (ctx:{job_id}) has expired",
                )
        # The job as it was submitted (the record's copy carries what admission changed).
        submitted_job = job_pb2.Job.FromString(record.fields["job"])
        n = entry.retries + 1
        for _ in range(20):
            new_id = retry_id(job_id, n)
            new = self._retry_job(submitted_job, original, new_id, own_context, context)
            try:
                submitted = await self._jobs.submit_built(BuiltJob(new, ""), caller)
            except CordumError as error:
                # A concurrent retry took this number; take the next one.
                if error.reason == R.ERROR_REASON_ALREADY_EXISTS:
                    n += 1
                    continue
                raise
            await self._store.link_retry(job_id, new_id)
            return submitted
        raise CordumError(
            grpc.StatusCode.ALREADY_EXISTS,
            R.ERROR_REASON_ALREADY_EXISTS,
            f"could not find a free retry id for {job_id}",
        )

    @staticmethod
    def _retry_job(
        job: job_pb2.Job,
        original: agent.JobRequest,
        new_id: str,
        own_context: bool,
        context: bytes,
    ) -> NewJob:
        labels = dict(original.labels)
        labels[RETRY_LABEL] = job.id
        request = agent.JobRequest()
        request.CopyFrom(original)
        request.job_id = new_id
        request.parent_job_id = job.id
        request.ClearField("dispatch")
        if own_context:
            request.context_ptr = cap.redis_pointer(cap.context_key(new_id))
        request.labels.clear()
        request.labels.update(labels)
        request.meta.labels.clear()
        request.meta.labels.update(labels)
        request.meta.idempotency_key = ""
        # The memory id stays the original's (also the default `mem:<original>`): the retry
        # continues that memory rather than starting an empty one.
        new_job = job_pb2.Job()
        new_job.CopyFrom(job)
        for name in RUNTIME_FIELDS:
            new_job.ClearField(name)
        new_job.id = new_id
        new_job.parent_job_id = job.id
        new_job.context_ptr = request.context_ptr
        new_job.idempotency_key = ""
        new_job.labels.clear()
        new_job.labels.update(labels)
        if request.budget.deadline_ms:
            new_job.deadline.CopyFrom(ms_timestamp(now_ms() + request.budget.deadline_ms))
        return NewJob(
            job=new_job,
            request=request,
            ctx_key=cap.context_key(new_id) if own_context else "",
            ctx_json=context,
        )
