"""``client.jobs``: submit jobs, follow them, read their results.

Methods return the API's own messages (``cordum.v1.job_pb2.Job`` and friends); JSON
documents (inputs, results) cross the boundary as plain Python values.
"""

from __future__ import annotations

import builtins
import datetime
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Required, TypedDict, Unpack, cast

from google.protobuf import timestamp_pb2

from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.sdk.convert import (
    as_submit_request,
    is_terminal,
    optional_value,
    submit_request,
    to_timestamp,
)
from cordum.sdk.errors import CordumError, WaitTimeout, from_status
from cordum.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

__all__ = ["AsyncJobsClient", "JobOutcome", "JobsClient", "SubmitJobFields"]

J = job_service_pb2
Stub = job_service_pb2_grpc.JobServiceStub
When = datetime.datetime | timestamp_pb2.Timestamp
BatchItem = J.SubmitJobRequest | Mapping[str, Any]

# Slack added to a submit-and-wait call's gRPC deadline over the server-side wait, so the
# server answers "not done yet" before the client gives up on the call.
_WAIT_SLACK_S = 5.0


class SubmitJobFields(TypedDict, total=False):
    """The fields of ``SubmitJobRequest``, as keyword arguments. ``None`` means "not set";
    ``input`` and ``context`` take any JSON-able value."""

    topic: Required[str]
    prompt: str | None
    input: Any
    context: Any
    labels: Mapping[str, str] | None
    priority: str | None
    idempotency_key: str | None
    max_retries: int | None
    deadline_ms: int | None
    tenant_id: str | None
    job_id: str | None
    trace_id: str | None
    adapter_id: str | None
    memory_id: str | None
    context_mode: str | None
    org_id: str | None
    team_id: str | None
    project_id: str | None
    principal_id: str | None
    actor_id: str | None
    actor_type: str | None
    pack_id: str | None
    capability: str | None
    risk_tags: Iterable[str] | None
    requires: Iterable[str] | None
    tags: Iterable[str] | None
    max_input_tokens: int | None
    max_output_tokens: int | None
    max_total_tokens: int | None
    allow_summarization: bool | None
    allow_retrieval: bool | None


@dataclass(frozen=True)
class JobOutcome:
    """What :meth:`AsyncJobsClient.run` saw: the job as it ended (or stood when the wait ran
    out), its decoded result when it succeeded, and whether it reached a terminal state."""

    job: job_pb2.Job
    result: Any
    done: bool
    idempotent_replay: bool = False

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def succeeded(self) -> bool:
        return self.job.state == job_pb2.JOB_STATE_SUCCEEDED


def _list_request(
    *,
    state: str | None,
    topic: str | None,
    tenant_id: str | None,
    trace_id: str | None,
    updated_after: When | None,
    updated_before: When | None,
    page_size: int | None,
    page_token: str,
) -> J.ListJobsRequest:
    request = J.ListJobsRequest(
        state=state or "",
        topic=topic or "",
        tenant_id=tenant_id or "",
        trace_id=trace_id or "",
        page_size=page_size or 0,
        page_token=page_token,
    )
    if updated_after is not None:
        request.updated_after.CopyFrom(to_timestamp(updated_after))
    if updated_before is not None:
        request.updated_before.CopyFrom(to_timestamp(updated_before))
    return request


def _batch_results(
    reply: J.BatchSubmitJobsResponse,
) -> builtins.list[J.BatchSubmitJobResult | CordumError]:
    return [from_status(r.error) if r.HasField("error") else r for r in reply.results]


def _outcome(reply: J.SubmitJobAndWaitResponse) -> JobOutcome:
    return JobOutcome(
        job=reply.job,
        result=optional_value(reply, "result"),
        done=reply.done,
        idempotent_replay=reply.idempotent_replay,
    )


def _wait_request(timeout: float, fields: SubmitJobFields) -> J.SubmitJobAndWaitRequest:
    return J.SubmitJobAndWaitRequest(
        job=submit_request(fields), timeout_ms=max(1, round(timeout * 1000))
    )


class AsyncJobsClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> job_service_pb2_grpc.JobServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("job_service_pb2_grpc.JobServiceAsyncStub", self._t.stub(Stub))

    async def submit(self, **fields: Unpack[SubmitJobFields]) -> J.SubmitJobResponse:
        """Submit a job; it runs once the safety kernel allows it."""
        return await self._t.unary(self._stub.SubmitJob, submit_request(fields))

    async def submit_many(
        self, jobs: Iterable[BatchItem]
    ) -> builtins.list[J.BatchSubmitJobResult | CordumError]:
        """Submit many jobs in one call. Each job is answered on its own, in order: its
        result, or the typed error that refused it (returned, not raised)."""
        request = J.BatchSubmitJobsRequest(jobs=[as_submit_request(j) for j in jobs])
        return _batch_results(await self._t.unary(self._stub.BatchSubmitJobs, request))

    async def run(
        self,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - a server-side wait, see _transport
        **fields: Unpack[SubmitJobFields],
    ) -> JobOutcome:
        """Submit a job and wait up to ``timeout`` seconds for it to end, in one call."""
        reply = await self._t.unary(
            self._stub.SubmitJobAndWait,
            _wait_request(timeout, fields),
            timeout=timeout + _WAIT_SLACK_S,
        )
        return _outcome(reply)

    async def get(self, job_id: str) -> job_pb2.Job:
        return await self._t.unary(self._stub.GetJob, J.GetJobRequest(job_id=job_id))

    async def list_page(
        self,
        *,
        state: str | None = None,
        topic: str | None = None,
        tenant_id: str | None = None,
        trace_id: str | None = None,
        updated_after: When | None = None,
        updated_before: When | None = None,
        page_size: int | None = None,
        page_token: str = "",
    ) -> J.ListJobsResponse:
        """One page of jobs, newest first; pass ``next_page_token`` back for the next."""
        request = _list_request(
            state=state,
            topic=topic,
            tenant_id=tenant_id,
            trace_id=trace_id,
            updated_after=updated_after,
            updated_before=updated_before,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._t.unary(self._stub.ListJobs, request)

    def list(
        self,
        *,
        state: str | None = None,
        topic: str | None = None,
        tenant_id: str | None = None,
        trace_id: str | None = None,
        updated_after: When | None = None,
        updated_before: When | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[job_pb2.Job]:
        """Every matching job, newest first, fetching pages as the iteration needs them;
        stops after ``limit`` jobs when given."""

        async def fetch(token: str, size: int | None) -> J.ListJobsResponse:
            return await self.list_page(
                state=state,
                topic=topic,
                tenant_id=tenant_id,
                trace_id=trace_id,
                updated_after=updated_after,
                updated_before=updated_before,
                page_size=size,
                page_token=token,
            )

        return apaginate(fetch, lambda p: p.jobs, page_size=page_size, limit=limit)

    async def cancel(self, job_id: str, reason: str = "") -> job_pb2.Job:
        return await self._t.unary(
            self._stub.CancelJob, J.CancelJobRequest(job_id=job_id, reason=reason)
        )

    async def get_result(self, job_id: str) -> job_pb2.JobResult:
        """The result record: state, worker, error, and the output once it succeeded."""
        return await self._t.unary(self._stub.GetJobResult, J.GetJobResultRequest(job_id=job_id))

    async def result(self, job_id: str) -> Any:
        """The worker's output as Python; ``None`` until the job has succeeded."""
        return optional_value(await self.get_result(job_id), "result")

    def watch(
        self, job_id: str, *, timeout: float | None = None
    ) -> AsyncGenerator[job_pb2.JobEvent, None]:
        """The job's state changes, starting with its current state and ending with a
        terminal one. Raises :class:`~cordum.sdk.errors.WaitTimeout` after ``timeout``."""
        return self._t.stream(
            self._stub.WatchJob, J.WatchJobRequest(job_id=job_id), timeout=timeout, wait_for=job_id
        )

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109 - the WatchJob deadline
    ) -> job_pb2.Job:
        """The job once it is terminal (``timeout=None`` waits for ever). Raises
        :class:`~cordum.sdk.errors.WaitTimeout` when it is still running at the deadline."""
        ended: job_pb2.Job | None = None
        try:
            # Read on to the end of the stream (the server closes it right after the terminal
            # event) instead of cancelling it: a clean close is cheaper for the server.
            async for event in self.watch(job_id, timeout=timeout):
                if is_terminal(event.state):
                    ended = event.job
        except WaitTimeout:
            if ended is None:
                raise
        return ended if ended is not None else await self.get(job_id)

    async def decisions(self, job_id: str) -> builtins.list[job_pb2.SafetyDecision]:
        """Every safety decision recorded for the job, newest first."""

        async def fetch(token: str, _size: int | None) -> J.ListJobDecisionsResponse:
            request = J.ListJobDecisionsRequest(job_id=job_id, page_token=token)
            return await self._t.unary(self._stub.ListJobDecisions, request)

        return [d async for d in apaginate(fetch, lambda p: p.decisions)]

    async def remediate(self, job_id: str, remediation_id: str = "") -> J.SubmitJobResponse:
        """Submit the job built from one of the remediations its policy decision offered."""
        return await self._t.unary(
            self._stub.RemediateJob,
            J.RemediateJobRequest(job_id=job_id, remediation_id=remediation_id),
        )

    async def trace(self, trace_id: str) -> builtins.list[job_pb2.Job]:
        reply = await self._t.unary(self._stub.GetTrace, J.GetTraceRequest(trace_id=trace_id))
        return builtins.list(reply.jobs)


class JobsClient:
    """The blocking twin of :class:`AsyncJobsClient`; same methods, same results."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def submit(self, **fields: Unpack[SubmitJobFields]) -> J.SubmitJobResponse:
        return self._t.unary(self._stub.SubmitJob, submit_request(fields))

    def submit_many(
        self, jobs: Iterable[BatchItem]
    ) -> builtins.list[J.BatchSubmitJobResult | CordumError]:
        request = J.BatchSubmitJobsRequest(jobs=[as_submit_request(j) for j in jobs])
        return _batch_results(self._t.unary(self._stub.BatchSubmitJobs, request))

    def run(self, *, timeout: float = 30.0, **fields: Unpack[SubmitJobFields]) -> JobOutcome:
        reply = self._t.unary(
            self._stub.SubmitJobAndWait,
            _wait_request(timeout, fields),
            timeout=timeout + _WAIT_SLACK_S,
        )
        return _outcome(reply)

    def get(self, job_id: str) -> job_pb2.Job:
        return self._t.unary(self._stub.GetJob, J.GetJobRequest(job_id=job_id))

    def list_page(
        self,
        *,
        state: str | None = None,
        topic: str | None = None,
        tenant_id: str | None = None,
        trace_id: str | None = None,
        updated_after: When | None = None,
        updated_before: When | None = None,
        page_size: int | None = None,
        page_token: str = "",
    ) -> J.ListJobsResponse:
        request = _list_request(
            state=state,
            topic=topic,
            tenant_id=tenant_id,
            trace_id=trace_id,
            updated_after=updated_after,
            updated_before=updated_before,
            page_size=page_size,
            page_token=page_token,
        )
        return self._t.unary(self._stub.ListJobs, request)

    def list(
        self,
        *,
        state: str | None = None,
        topic: str | None = None,
        tenant_id: str | None = None,
        trace_id: str | None = None,
        updated_after: When | None = None,
        updated_before: When | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[job_pb2.Job]:
        def fetch(token: str, size: int | None) -> J.ListJobsResponse:
            return self.list_page(
                state=state,
                topic=topic,
                tenant_id=tenant_id,
                trace_id=trace_id,
                updated_after=updated_after,
                updated_before=updated_before,
                page_size=size,
                page_token=token,
            )

        return paginate(fetch, lambda p: p.jobs, page_size=page_size, limit=limit)

    def cancel(self, job_id: str, reason: str = "") -> job_pb2.Job:
        return self._t.unary(self._stub.CancelJob, J.CancelJobRequest(job_id=job_id, reason=reason))

    def get_result(self, job_id: str) -> job_pb2.JobResult:
        return self._t.unary(self._stub.GetJobResult, J.GetJobResultRequest(job_id=job_id))

    def result(self, job_id: str) -> Any:
        return optional_value(self.get_result(job_id), "result")

    def watch(
        self, job_id: str, *, timeout: float | None = None
    ) -> Generator[job_pb2.JobEvent, None, None]:
        return self._t.stream(
            self._stub.WatchJob, J.WatchJobRequest(job_id=job_id), timeout=timeout, wait_for=job_id
        )

    def wait(self, job_id: str, *, timeout: float | None = 30.0) -> job_pb2.Job:
        ended: job_pb2.Job | None = None
        try:
            for event in self.watch(job_id, timeout=timeout):
                if is_terminal(event.state):
                    ended = event.job
        except WaitTimeout:
            if ended is None:
                raise
        return ended if ended is not None else self.get(job_id)

    def decisions(self, job_id: str) -> builtins.list[job_pb2.SafetyDecision]:
        def fetch(token: str, _size: int | None) -> J.ListJobDecisionsResponse:
            request = J.ListJobDecisionsRequest(job_id=job_id, page_token=token)
            return self._t.unary(self._stub.ListJobDecisions, request)

        return builtins.list(paginate(fetch, lambda p: p.decisions))

    def remediate(self, job_id: str, remediation_id: str = "") -> J.SubmitJobResponse:
        return self._t.unary(
            self._stub.RemediateJob,
            J.RemediateJobRequest(job_id=job_id, remediation_id=remediation_id),
        )

    def trace(self, trace_id: str) -> builtins.list[job_pb2.Job]:
        reply = self._t.unary(self._stub.GetTrace, J.GetTraceRequest(trace_id=trace_id))
        return builtins.list(reply.jobs)
