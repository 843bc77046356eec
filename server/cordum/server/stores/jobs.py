"""The job store: every job's record, state machine, indexes and event log in Redis.

Each state transition is ONE Lua script call (compare-and-set on the current state plus
indexes, event log and DLQ entry), and callers on the hot path pipeline many calls into one
round trip. A job submitted through a gateway that runs with a scheduler costs two script
calls in all (`submit_admit_many`: create + decide; `complete_many`: the result, which also
returns the record to a caller waiting in this process), ~25 Redis commands (measured by
`make bench`). Keys (all under the store's prefix):

  job:<id>                HASH  record (static part as a cordum.v1.Job, request as a
                                 JobRequest, dynamic fields flat); TTL = job TTL
  job:<id>:events         LIST  "ms|STATE|message", bounded, same TTL
  job:<id>:decisions      LIST  SafetyDecision bytes, newest first, bounded, same TTL
  jobs:t:<tenant>         ZSET  id -> updated ms            (listing)
  jobs:t:<tenant>:s:<S>   ZSET  id -> updated ms, per state  (listing by state)
  jobs:active:<S>         ZSET  id -> updated ms, non-terminal states (reconciler)
  jobs:due                ZSET  id -> due ms (throttle, retry backoff, kernel outage)
  jobs:deadline           ZSET  id -> absolute deadline ms
  jobs:inflight:t:<t>     SET   dispatched, unfinished jobs of a tenant (concurrency caps)
  trace:<trace>           SET   job ids of a trace; TTL
  idem:<tenant>:<key>     STRING job id; TTL (idempotency, scoped per tenant)
  dlq:<id>, dlq:idx[...]  HASH / ZSET  dead-letter entries, bounded
Indexes are trimmed by the reconciler (entries older than the job TTL), so nothing grows
without bound. `ctx:<id>` / `res:<id>` are CAP's keys and carry no prefix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import BusyLoadingError, ResponseError

from cordum.agent.v1 import job_pb2 as agent_job_pb2
from cordum.sdk._fastredis import FastRedis, ReplyError
from cordum.server.stores import scripts
from cordum.server.stores.page_tokens import decode_token, encode_token
from cordum.v1 import job_pb2

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "DENIED"})
ACTIVE = ("PENDING", "APPROVAL_REQUIRED", "SCHEDULED", "DISPATCHED", "RUNNING")
STATES = (*ACTIVE, *sorted(TERMINAL))


def state_enum(name: str) -> job_pb2.JobState.ValueType:
    return job_pb2.JobState.Value(f"JOB_STATE_{name}") if name else job_pb2.JOB_STATE_UNSPECIFIED


def state_name(value: int) -> str:
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def ms_timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


@dataclass(frozen=True)
class StoreLimits:
    job_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    result_ttl_s: int = 7 * 24 * 3600
    event_limit: int = 100
    decision_limit: int = 50
    dlq_max: int = 10_000


@dataclass(frozen=True)
class NewJob:
    job: job_pb2.Job
    request: agent_job_pb2.JobRequest
    ctx_key: str
    ctx_json: bytes
    idempotency_key: str = ""


@dataclass(frozen=True)
class SubmitOutcome:
    status: str  # ok | replay | exists
    job_id: str


@dataclass(frozen=True)
class Admission:
    job_id: str
    decision: str  # allow | deny | require | throttle
    decision_bytes: bytes
    job_hash: str
    snapshot: str
    worker_id: str = ""
    subject: str = ""
    max_retries_cap: int = -1
    deadline_ms: int = 0
    max_concurrent: int = 0
    retry_after_ms: int = 5000
    reason: str = ""
    # DLQ reason code when decision == "fail".
    fail_code: str = ""
    # For decision == "require": what the job becomes when its stored approval matches
    # (allow | throttle | fail; "" = nothing to apply), with that outcome's reason.
    approved: str = ""
    approved_reason: str = ""
    # The scheduler instance that will publish the dispatch (see Scheduler.lease_key).
    dispatcher: str = ""


@dataclass(frozen=True)
class AdmitOutcome:
    kind: str  # dispatched | approval | denied | throttled | failed | duplicate | missing
    attempts: int = 0
    deadline_ms: int = 0
    max_retries: int = 0
    detail: str = ""


@dataclass(frozen=True)
class Completion:
    job_id: str
    status: str  # SUCCEEDED | FAILED | CANCELLED | TIMEOUT | DENIED
    result_ptr: str = ""
    worker_id: str = ""
    execution_ms: int = 0
    error_code: str = ""
    error_message: str = ""
    artifact_ptrs: Sequence[str] = ()
    # Retry backoff: base * 2^(attempt-1), capped; -1 = this failure is never retried.
    backoff_base_ms: int = 1000
    backoff_cap_ms: int = 60_000


@dataclass(frozen=True)
class CompleteOutcome:
    kind: str  # done | retry | ignored | unknown
    state: str = ""
    attempts: int = 0
    # For kind == "done" when the record was asked for: the record after the change and the
    # worker's output (res:<id>), read in the same script call.
    record: JobRecord | None = None
    result: bytes | None = None
    topic: str = ""


@dataclass(frozen=True)
class TransitionOutcome:
    ok: bool
    previous: str = ""
    worker_id: str = ""
    subject: str = ""
    trace_id: str = ""
    missing: bool = False
    topic: str = ""


@dataclass
class JobRecord:
    job: job_pb2.Job
    request: agent_job_pb2.JobRequest
    fields: dict[str, bytes] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return state_name(self.job.state)

    @property
    def tenant(self) -> str:
        return self.job.tenant_id


@dataclass(frozen=True)
class JobPage:
    records: list[JobRecord]
    next_token: str


def _s(value: bytes | None) -> str:
    return value.decode() if value else ""


def _i(value: bytes | None) -> int:
    return int(value) if value else 0


def record_from_hash(raw: dict[bytes, bytes]) -> JobRecord | None:
    if not raw or b"job" not in raw:
        return None
    fields = {k.decode(): v for k, v in raw.items()}
    job = job_pb2.Job.FromString(fields["job"])
    request = agent_job_pb2.JobRequest.FromString(fields.get("req", b""))
    job.state = state_enum(_s(fields.get("state")))
    job.attempts = _i(fields.get("attempts"))
    job.max_retries = _i(fields.get("max_retries"))
    if _i(fields.get("created_ms")):
        job.created_at.CopyFrom(ms_timestamp(_i(fields.get("created_ms"))))
    if _i(fields.get("updated_ms")):
        job.updated_at.CopyFrom(ms_timestamp(_i(fields.get("updated_ms"))))
    if _i(fields.get("deadline_ms")):
        job.deadline.CopyFrom(ms_timestamp(_i(fields.get("deadline_ms"))))
    job.worker_id = _s(fields.get("worker_id"))
    job.result_ptr = _s(fields.get("result_ptr"))
    job.execution_ms = _i(fields.get("exec_ms"))
    job.error_code = _s(fields.get("error_code"))
    job.error_message = _s(fields.get("error_message"))
    job.pending_reason = _s(fields.get("pending_reason"))
    if fields.get("artifacts"):
        job.artifact_ptrs[:] = json.loads(fields["artifacts"])
    if fields.get("safety"):
        job.safety.ParseFromString(fields["safety"])
    if fields.get("approval"):
        job.approval.ParseFromString(fields["approval"])
    return JobRecord(job=job, request=request, fields=fields)


class JobStore:
    def __init__(self, redis: Redis, *, prefix: str = "", limits: StoreLimits | None = None):
        self.redis = redis
        self.prefix = prefix
        self.limits = limits or StoreLimits()
        # Told (new state, topic) after each committed transition of `transition()` and of a
        # worker's result (the transition metrics; admissions are counted by the scheduler,
        # which knows their topics); must not do I/O.
        self.on_transition: Callable[[str, str], None] | None = None
        # The hot-path script calls (submit, admit, complete) go through a lean connection
        # of their own: ~15 µs of CPU per round trip instead of redis-py's ~100 (measured).
        pool = redis.connection_pool
        self._fast = FastRedis.like(
            pool.connection_kwargs, tls=issubclass(pool.connection_class, SSLConnection)
        )
        common = "jobs_common.lua"
        self._submit = scripts.load(redis, "job_submit.lua", common)
        self._submit_admit = scripts.load(redis, "job_submit_admit.lua", common)
        self._admit = scripts.load(redis, "job_admit.lua", common)
        self._complete = scripts.load(redis, "job_complete.lua", common)
        self._transition = scripts.load(redis, "job_transition.lua", common)
        self._claim_due = scripts.load(redis, "jobs_claim_due.lua", common)
        self._scripts = [
            self._submit,
            self._submit_admit,
            self._admit,
            self._complete,
            self._transition,
            self._claim_due,
        ]

    async def aclose(self) -> None:
        await self._fast.aclose()

    async def _run_scripts(self, calls: list[tuple[scripts.LuaScript, list[object]]]) -> list[Any]:
        """EVALSHA each call in one round trip on the lean connection. Calls that hit
        NOSCRIPT (a restarted or flushed server) did not run: the scripts are loaded and
        those calls repeated. Any other error is raised (the first one)."""
        commands = [("EVALSHA", script.sha, 0, *args) for script, args in calls]
        replies = await self._fast.execute(commands)
        missing = [
            i
            for i, reply in enumerate(replies)
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")
        ]
        if missing:
            for script in self._scripts:
                await script.load()
            again = await self._fast.execute([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, ReplyError):
                if str(reply).startswith("LOADING"):
                    # As redis-py does: a server replaying its AOF is unavailable for now.
                    raise BusyLoadingError(str(reply))
                raise ResponseError(str(reply))
        return replies

    # -- keys -------------------------------------------------------------------------

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def idempotency_key(self, tenant: str, key: str) -> str:
        return f"{self.prefix}idem:{tenant}:{key}"

    def _common(self, job_id: str, now_ms: int) -> list[object]:
        lim = self.limits
        return [self.prefix, job_id, now_ms, lim.job_ttl_s, lim.event_limit]

    # -- transitions (each one script call; batched calls share one round trip) ------------

    def _submit_args(self, new: NewJob, now_ms: int) -> list[object]:
        job = new.job
        idem = (
            self.idempotency_key(job.tenant_id, new.idempotency_key) if new.idempotency_key else ""
        )
        deadline_ms = job.deadline.ToMilliseconds() if job.HasField("deadline") else 0
        return [
            *self._common(job.id, now_ms),
            new.ctx_key,
            new.ctx_json,
            job.SerializeToString(),
            new.request.SerializeToString(),
            job.tenant_id,
            job.topic,
            job.trace_id,
            job.max_retries,
            deadline_ms,
            idem,
            self.limits.idempotency_ttl_s,
            job.parent_job_id,
        ]

    def _admit_args(self, a: Admission) -> list[object]:
        """job_admit.lua's ARGV[6..22]."""
        return [
            a.decision,
            a.decision_bytes,
            a.job_hash,
            a.snapshot,
            a.worker_id,
            a.subject,
            a.max_retries_cap,
            a.deadline_ms,
            a.max_concurrent,
            a.retry_after_ms,
            a.reason,
            self.limits.dlq_max,
            self.limits.decision_limit,
            a.fail_code,
            a.approved,
            a.approved_reason,
            a.dispatcher,
        ]

    async def submit_many(self, jobs: Sequence[NewJob], now_ms: int) -> list[SubmitOutcome]:
        replies = await self._run_scripts(
            [(self._submit, self._submit_args(new, now_ms)) for new in jobs]
        )
        return [
            SubmitOutcome(_s(r[0]), _s(r[1]) if len(r) > 1 else new.job.id)
            for r, new in zip(replies, jobs, strict=True)
        ]

    async def submit_admit_many(
        self, items: Sequence[tuple[NewJob, Admission]], now_ms: int
    ) -> list[tuple[SubmitOutcome, AdmitOutcome | None]]:
        """Create each job and apply its admission in one script call (gateway and scheduler
        in one process). The admission is None when the job was not created (an idempotency
        replay, or an id that exists): then nothing was written or admitted."""
        created, _ = await self.submit_admit_and_complete(items, [], now_ms)
        return created

    async def admit_many(self, admissions: Sequence[Admission], now_ms: int) -> list[AdmitOutcome]:
        replies = await self._run_scripts(
            [
                (self._admit, self._common(a.job_id, now_ms) + self._admit_args(a))
                for a in admissions
            ]
        )
        return [_admit_outcome(reply) for reply in replies]

    async def complete_many(
        self,
        completions: Sequence[Completion],
        now_ms: int,
        want_records: Sequence[bool] = (),
    ) -> list[CompleteOutcome]:
        """Apply worker results. `want_records[i]`: a job that ends gets its record and
        result back in the outcome (read by the same script call)."""
        _, completed = await self.submit_admit_and_complete([], completions, now_ms, want_records)
        return completed

    async def submit_admit_and_complete(
        self,
        items: Sequence[tuple[NewJob, Admission]],
        completions: Sequence[Completion],
        now_ms: int,
        want_records: Sequence[bool] = (),
    ) -> tuple[list[tuple[SubmitOutcome, AdmitOutcome | None]], list[CompleteOutcome]]:
        """`submit_admit_many` and `complete_many` in ONE round trip: a busy scheduler has
        both kinds of work at once, and every round trip costs a write and a read syscall."""
        calls = [
            (self._submit_admit, self._submit_args(new, now_ms) + self._admit_args(admission))
            for new, admission in items
        ]
        for i, c in enumerate(completions):
            want = i < len(want_records) and want_records[i]
            calls.append((self._complete, self._complete_args(c, now_ms, want)))
        replies = await self._run_scripts(calls)
        created: list[tuple[SubmitOutcome, AdmitOutcome | None]] = []
        for reply, (new, _) in zip(replies, items, strict=False):
            status = _s(reply[0])
            if status != "ok":
                job_id = _s(reply[1]) if len(reply) > 1 else new.job.id
                created.append((SubmitOutcome(status, job_id), None))
            else:
                created.append((SubmitOutcome("ok", new.job.id), _admit_outcome(reply[1:])))
        completed = [_complete_outcome(r) for r in replies[len(items) :]]
        if self.on_transition is not None:
            for outcome in completed:
                if outcome.kind in ("done", "retry"):
                    self.on_transition(outcome.state, outcome.topic)
        return created, completed

    def _complete_args(self, c: Completion, now_ms: int, want_record: bool) -> list[object]:
        return [
            *self._common(c.job_id, now_ms),
            c.status,
            c.result_ptr,
            c.worker_id,
            c.execution_ms,
            c.error_code,
            c.error_message[:4000],
            json.dumps(list(c.artifact_ptrs)) if c.artifact_ptrs else "",
            f"res:{c.job_id}",
            self.limits.result_ttl_s,
            c.backoff_base_ms,
            self.limits.dlq_max,
            c.backoff_cap_ms,
            "1" if want_record else "",
        ]

    async def transition(
        self,
        job_id: str,
        *,
        allowed_from: Sequence[str],
        to: str,
        message: str,
        now_ms: int,
        dlq_status: str = "",
        dlq_code: str = "",
        fields: dict[str, str | bytes | int] | None = None,
        expect: dict[str, str | bytes | int] | None = None,
    ) -> TransitionOutcome:
        """Compare-and-set: the job must be in one of `allowed_from` and hold every field of
        `expect` (compared as strings; absent = ""), else nothing changes."""
        pairs: list[object] = [len(expect or {})]
        for key, value in [*(expect or {}).items(), *(fields or {}).items()]:
            pairs += [key, value]
        reply = await self._transition(
            args=[
                *self._common(job_id, now_ms),
                ",".join(allowed_from),
                to,
                message,
                dlq_status,
                dlq_code,
                self.limits.dlq_max,
                *pairs,
            ]
        )
        kind = _s(reply[0])
        if kind == "ok":
            if self.on_transition is not None:
                self.on_transition(to, _s(reply[5]))
            return TransitionOutcome(
                True, _s(reply[1]), _s(reply[2]), _s(reply[3]), _s(reply[4]), topic=_s(reply[5])
            )
        if kind == "missing":
            return TransitionOutcome(False, missing=True)
        return TransitionOutcome(False, previous=_s(reply[1]))

    async def claim_due(self, now_ms: int, limit: int = 200) -> list[str]:
        ids = await self._claim_due(args=[self.prefix, now_ms, limit])
        return [_s(i) for i in ids]

    async def schedule_due(self, job_id: str, due_ms: int) -> None:
        await self.redis.zadd(f"{self.prefix}jobs:due", {job_id: due_ms})

    # -- reads ------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        return record_from_hash(await self.redis.hgetall(self.job_key(job_id)))

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.job_key(job_id))
        replies = await pipe.execute(raise_on_error=False)
        # An id such as "<job>:events" names a job's sub-key (WRONGTYPE): not a job.
        return [None if isinstance(raw, Exception) else record_from_hash(raw) for raw in replies]

    async def get_with_result(self, job_id: str) -> tuple[JobRecord | None, bytes | None]:
        """The record and the worker's output, in one round trip."""
        return (await self.get_with_result_many([job_id]))[0]

    async def get_with_result_many(
        self, job_ids: Sequence[str]
    ) -> list[tuple[JobRecord | None, bytes | None]]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.job_key(job_id))
            pipe.get(f"res:{job_id}")
        replies = await pipe.execute()
        return [(record_from_hash(replies[i]), replies[i + 1]) for i in range(0, len(replies), 2)]

    async def decisions(self, job_id: str, offset: int, count: int) -> list[bytes]:
        key = f"{self.prefix}job:{job_id}:decisions"
        return list(await self.redis.lrange(key, offset, offset + count - 1))

    async def events(self, job_id: str) -> list[tuple[int, str, str]]:
        raw = await self.redis.lrange(f"{self.prefix}job:{job_id}:events", 0, -1)
        out = []
        for item in raw:
            ms, state, message = item.decode().split("|", 2)
            out.append((int(ms), state, message))
        return out

    async def trace(self, trace_id: str) -> list[str]:
        members = await self.redis.smembers(f"{self.prefix}trace:{trace_id}")
        return sorted(_s(m) for m in members)

    async def stale(self, state: str, older_than_ms: int, limit: int, offset: int = 0) -> list[str]:
        key = f"{self.prefix}jobs:active:{state}"
        ids = await self.redis.zrangebyscore(key, "-inf", older_than_ms, start=offset, num=limit)
        return [_s(i) for i in ids]

    async def past_deadline(self, now_ms: int, limit: int) -> list[str]:
        key = f"{self.prefix}jobs:deadline"
        ids = await self.redis.zrangebyscore(key, "-inf", now_ms, start=0, num=limit)
        return [_s(i) for i in ids]

    async def list_jobs(
        self,
        *,
        tenant: str,
        state: str = "",
        topic: str = "",
        trace_id: str = "",
        updated_after_ms: int = 0,
        updated_before_ms: int = 0,
        page_size: int = 50,
        page_token: str = "",
        scan_limit: int = 5000,
    ) -> JobPage:
        """Newest first (by creation: it never changes, so a job that moves on between two
        pages is neither skipped nor repeated); ties ordered by id, descending. The
        `updated_*` bounds filter on the last change."""
        query = f"{tenant}|{state}|{topic}|{trace_id}|{updated_after_ms}|{updated_before_ms}"
        cursor = decode_token(page_token, query)
        if trace_id:
            return await self._list_trace(tenant, trace_id, state, topic, page_size, cursor, query)
        key = f"{self.prefix}jobs:t:{tenant}" + (f":s:{state}" if state else "")
        # created <= updated, so "updated before T" also bounds the creation-time scan.
        bounds = [b for b in (cursor[0] if cursor else None, updated_before_ms or None) if b]
        high: float | str = min(bounds) if bounds else "+inf"
        low: float | str = "-inf"
        found: list[JobRecord] = []
        # The index score (creation time) each found job was listed under.
        scores: dict[str, float] = {}
        scanned, offset, batch = 0, 0, max(page_size * 2, 50)
        while len(found) < page_size and scanned < scan_limit:
            rows = await self.redis.zrevrangebyscore(
                key, high, low, start=offset, num=batch, withscores=True
            )
            if not rows:
                break
            offset += len(rows)
            scanned += len(rows)
            listed = [
                (_s(member), score)
                for member, score in rows
                if cursor is None or (score, _s(member)) < cursor
            ]
            scores.update(listed)
            ids = [job_id for job_id, _ in listed]
            records = await self.get_many(ids)
            for record in records:
                if record is None:
                    continue  # expired; the reconciler trims the index
                if topic and record.job.topic != topic:
                    continue
                if state and record.state != state:
                    continue  # moved on since the index was read
                updated = int(record.fields.get("updated_ms", b"0") or 0)
                if updated_after_ms and updated < updated_after_ms:
                    continue
                if updated_before_ms and updated > updated_before_ms:
                    continue
                found.append(record)
                if len(found) == page_size:
                    break
            if len(rows) < batch:
                break
        next_token = ""
        if len(found) == page_size:
            last = found[-1].job.id
            next_token = encode_token((scores[last], last), query)
        return JobPage(found, next_token)

    async def _list_trace(
        self,
        tenant: str,
        trace_id: str,
        state: str,
        topic: str,
        page_size: int,
        cursor: tuple[float, str] | None,
        query: str,
    ) -> JobPage:
        records = [r for r in await self.get_many(await self.trace(trace_id)) if r is not None]
        rows = sorted(
            (
                (int(r.fields.get("updated_ms", b"0")), r.job.id, r)
                for r in records
                if r.tenant == tenant
                and (not state or r.state == state)
                and (not topic or r.job.topic == topic)
            ),
            key=lambda row: (row[0], row[1]),
            reverse=True,
        )
        if cursor is not None:
            rows = [row for row in rows if (row[0], row[1]) < cursor]
        page = rows[:page_size]
        token = encode_token(page[-1][:2], query) if len(rows) > page_size else ""
        return JobPage([row[2] for row in page], token)


def _admit_outcome(reply: Sequence[Any]) -> AdmitOutcome:
    kind = _s(reply[0])
    if kind == "dispatched":
        return AdmitOutcome(kind, int(reply[1]), int(reply[2]), max_retries=int(reply[3]))
    return AdmitOutcome(kind, detail=_s(reply[1]) if len(reply) > 1 else "")


def _complete_outcome(reply: Sequence[Any]) -> CompleteOutcome:
    kind = _s(reply[0])
    if kind == "retry":
        return CompleteOutcome(kind, "PENDING", int(reply[1]), topic=_s(reply[2]))
    if kind == "done" and len(reply) > 3:
        flat = reply[2]
        raw = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
        return CompleteOutcome(
            kind,
            _s(reply[1]),
            record=record_from_hash(raw),
            result=reply[3],
            topic=_s(reply[4]),
        )
    if kind == "done":
        return CompleteOutcome(kind, _s(reply[1]), topic=_s(reply[2]))
    return CompleteOutcome(kind, _s(reply[1]) if len(reply) > 1 else "")
