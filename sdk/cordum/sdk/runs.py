"""``client.runs``: start workflow runs, follow them, decide their approval steps.

Methods return the API's own messages (``cordum.v1.run_pb2.Run`` and friends); the run
input crosses the boundary as a plain ``dict``::

    started = await client.runs.start("hello", input={"name": "Ada"})
    run = await client.runs.wait(started.run_id, timeout=60)
    print(run_status_name(run.status), from_value(run.output))
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from typing import Any, cast

from google.protobuf import timestamp_pb2

from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.sdk.convert import is_run_terminal, to_struct, to_timestamp
from cordum.sdk.errors import WaitTimeout
from cordum.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc

__all__ = ["AsyncRunsClient", "RunsClient"]

R = run_service_pb2
Stub = run_service_pb2_grpc.RunServiceStub
When = datetime.datetime | timestamp_pb2.Timestamp


def _start_request(
    workflow_id: str,
    *,
    input: Mapping[str, Any] | None,
    dry_run: bool,
    idempotency_key: str | None,
    labels: Mapping[str, str] | None,
    org_id: str | None,
    team_id: str | None,
) -> R.StartRunRequest:
    request = R.StartRunRequest(
        workflow_id=workflow_id,
        dry_run=dry_run,
        idempotency_key=idempotency_key or "",
        labels=dict(labels or {}),
        org_id=org_id or "",
        team_id=team_id or "",
    )
    if input is not None:
        request.input.CopyFrom(to_struct(input))
    return request


def _list_request(
    *,
    status: str | None,
    workflow_id: str | None,
    org_id: str | None,
    team_id: str | None,
    updated_after: When | None,
    updated_before: When | None,
    page_size: int | None,
    page_token: str,
) -> R.ListRunsRequest:
    request = R.ListRunsRequest(
        status=status or "",
        workflow_id=workflow_id or "",
        org_id=org_id or "",
        team_id=team_id or "",
        page_size=page_size or 0,
        page_token=page_token,
    )
    if updated_after is not None:
        request.updated_after.CopyFrom(to_timestamp(updated_after))
    if updated_before is not None:
        request.updated_before.CopyFrom(to_timestamp(updated_before))
    return request


def _approve_request(
    run_id: str, step_id: str, reason: str, workflow_id: str
) -> R.ApproveStepRequest:
    return R.ApproveStepRequest(
        run_id=run_id, step_id=step_id, reason=reason, workflow_id=workflow_id, approved=True
    )


def _reject_request(
    run_id: str, step_id: str, reason: str, workflow_id: str
) -> R.RejectStepRequest:
    return R.RejectStepRequest(
        run_id=run_id, step_id=step_id, reason=reason, workflow_id=workflow_id
    )


class AsyncRunsClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> run_service_pb2_grpc.RunServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("run_service_pb2_grpc.RunServiceAsyncStub", self._t.stub(Stub))

    async def start(
        self,
        workflow_id: str,
        *,
        input: Mapping[str, Any] | None = None,
        dry_run: bool = False,
        idempotency_key: str | None = None,
        labels: Mapping[str, str] | None = None,
        org_id: str | None = None,
        team_id: str | None = None,
    ) -> R.StartRunResponse:
        """Start a run of ``workflow_id``. ``input`` (a JSON object) is checked against the
        workflow's input schema; ``dry_run`` resolves and records every step without
        dispatching anything; a repeated ``idempotency_key`` returns the first run
        (``idempotent_replay``)."""
        request = _start_request(
            workflow_id,
            input=input,
            dry_run=dry_run,
            idempotency_key=idempotency_key,
            labels=labels,
            org_id=org_id,
            team_id=team_id,
        )
        return await self._t.unary(self._stub.StartRun, request)

    async def get(self, run_id: str) -> run_pb2.Run:
        return await self._t.unary(self._stub.GetRun, R.GetRunRequest(run_id=run_id))

    async def list_page(
        self,
        *,
        status: str | None = None,
        workflow_id: str | None = None,
        org_id: str | None = None,
        team_id: str | None = None,
        updated_after: When | None = None,
        updated_before: When | None = None,
        page_size: int | None = None,
        page_token: str = "",
    ) -> R.ListRunsResponse:
        """One page of runs, most recently updated first; ``status`` as ``running`` or
        ``RUN_STATUS_RUNNING``."""
        request = _list_request(
            status=status,
            workflow_id=workflow_id,
            org_id=org_id,
            team_id=team_id,
            updated_after=updated_after,
            updated_before=updated_before,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._t.unary(self._stub.ListRuns, request)

    def list(
        self,
        *,
        status: str | None = None,
        workflow_id: str | None = None,
        org_id: str | None = None,
        team_id: str | None = None,
        updated_after: When | None = None,
        updated_before: When | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[run_pb2.Run]:
        """Every matching run, most recently updated first, fetching pages as the iteration
        needs them; stops after ``limit`` runs when given."""

        async def fetch(token: str, size: int | None) -> R.ListRunsResponse:
            return await self.list_page(
                status=status,
                workflow_id=workflow_id,
                org_id=org_id,
                team_id=team_id,
                updated_after=updated_after,
                updated_before=updated_before,
                page_size=size,
                page_token=token,
            )

        return apaginate(fetch, lambda p: p.runs, page_size=page_size, limit=limit)

    async def cancel(self, run_id: str, *, reason: str = "", workflow_id: str = "") -> run_pb2.Run:
        """Cancel a run: its jobs in flight are cancelled, unfinished steps marked
        CANCELLED. A run that already ended is returned unchanged."""
        request = R.CancelRunRequest(run_id=run_id, reason=reason, workflow_id=workflow_id)
        return await self._t.unary(self._stub.CancelRun, request)

    async def rerun(
        self, run_id: str, *, from_step: str | None = None, dry_run: bool = False
    ) -> R.StartRunResponse:
        """Start a new run from ``from_step`` (default: the whole workflow): steps that are
        not downstream of it keep the outputs they had, the rest run again."""
        request = R.RerunRunRequest(run_id=run_id, from_step=from_step or "", dry_run=dry_run)
        return await self._t.unary(self._stub.RerunRun, request)

    async def delete(self, run_id: str) -> None:
        """Delete a run and its timeline (a live run is cancelled first)."""
        await self._t.unary(self._stub.DeleteRun, R.DeleteRunRequest(run_id=run_id))

    async def timeline_page(
        self, run_id: str, *, page_size: int | None = None, page_token: str = ""
    ) -> R.GetRunTimelineResponse:
        request = R.GetRunTimelineRequest(
            run_id=run_id, page_size=page_size or 0, page_token=page_token
        )
        return await self._t.unary(self._stub.GetRunTimeline, request)

    def timeline(
        self, run_id: str, *, page_size: int | None = None, limit: int | None = None
    ) -> AsyncIterator[run_pb2.RunEvent]:
        """The run's timeline so far, oldest first (``seq`` from 1)."""

        async def fetch(token: str, size: int | None) -> R.GetRunTimelineResponse:
            return await self.timeline_page(run_id, page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.events, page_size=page_size, limit=limit)

    async def approve_step(
        self, run_id: str, step_id: str, *, reason: str = "", workflow_id: str = ""
    ) -> run_pb2.Run:
        """Approve a waiting approval step; the run resumes at once."""
        request = _approve_request(run_id, step_id, reason, workflow_id)
        return await self._t.unary(self._stub.ApproveStep, request)

    async def reject_step(
        self, run_id: str, step_id: str, *, reason: str = "", workflow_id: str = ""
    ) -> run_pb2.Run:
        """Reject a waiting approval step: the step fails (and with it the run, unless the
        step has an ``on_error`` handler)."""
        request = _reject_request(run_id, step_id, reason, workflow_id)
        return await self._t.unary(self._stub.RejectStep, request)

    def watch(
        self, run_id: str, *, timeout: float | None = None
    ) -> AsyncGenerator[R.WatchRunResponse, None]:
        """The run's timeline events, each with the run: first the events so far, then live
        ones, ending once the run is terminal. A live event comes with the run after it; a
        replayed one with the run as the server read it (use :meth:`wait` for the final
        run). Raises :class:`~cordum.sdk.errors.WaitTimeout` after ``timeout`` seconds."""
        return self._t.stream(
            self._stub.WatchRun,
            R.WatchRunRequest(run_id=run_id),
            timeout=timeout,
            wait_for=run_id,
            wait_kind="run",
        )

    async def wait(
        self,
        run_id: str,
        *,
        timeout: float | None = 60.0,  # noqa: ASYNC109 - the WatchRun deadline
    ) -> run_pb2.Run:
        """The run once it is terminal (``timeout=None`` waits for ever). Raises
        :class:`~cordum.sdk.errors.WaitTimeout` when it is still going at the deadline."""
        ended: run_pb2.Run | None = None
        try:
            # Read to the end (the server closes the stream after the terminal event).
            async for update in self.watch(run_id, timeout=timeout):
                if is_run_terminal(update.run.status):
                    ended = update.run
        except WaitTimeout:
            if ended is None:
                raise
        return ended if ended is not None else await self._ended(run_id, timeout)

    async def _ended(self, run_id: str, waited: float | None) -> run_pb2.Run:
        # The stream ended without a terminal run in it (an empty timeline page, a run
        # deleted meanwhile): trust a fresh read, and say so when it is not terminal.
        run = await self.get(run_id)
        if not is_run_terminal(run.status):
            raise WaitTimeout(run_id, waited, kind="run")
        return run


class RunsClient:
    """The blocking twin of :class:`AsyncRunsClient`; same methods, same results."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def start(
        self,
        workflow_id: str,
        *,
        input: Mapping[str, Any] | None = None,
        dry_run: bool = False,
        idempotency_key: str | None = None,
        labels: Mapping[str, str] | None = None,
        org_id: str | None = None,
        team_id: str | None = None,
    ) -> R.StartRunResponse:
        request = _start_request(
            workflow_id,
            input=input,
            dry_run=dry_run,
            idempotency_key=idempotency_key,
            labels=labels,
            org_id=org_id,
            team_id=team_id,
        )
        return self._t.unary(self._stub.StartRun, request)

    def get(self, run_id: str) -> run_pb2.Run:
        return self._t.unary(self._stub.GetRun, R.GetRunRequest(run_id=run_id))

    def list_page(
        self,
        *,
        status: str | None = None,
        workflow_id: str | None = None,
        org_id: str | None = None,
        team_id: str | None = None,
        updated_after: When | None = None,
        updated_before: When | None = None,
        page_size: int | None = None,
        page_token: str = "",
    ) -> R.ListRunsResponse:
        request = _list_request(
            status=status,
            workflow_id=workflow_id,
            org_id=org_id,
            team_id=team_id,
            updated_after=updated_after,
            updated_before=updated_before,
            page_size=page_size,
            page_token=page_token,
        )
        return self._t.unary(self._stub.ListRuns, request)

    def list(
        self,
        *,
        status: str | None = None,
        workflow_id: str | None = None,
        org_id: str | None = None,
        team_id: str | None = None,
        updated_after: When | None = None,
        updated_before: When | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[run_pb2.Run]:
        def fetch(token: str, size: int | None) -> R.ListRunsResponse:
            return self.list_page(
                status=status,
                workflow_id=workflow_id,
                org_id=org_id,
                team_id=team_id,
                updated_after=updated_after,
                updated_before=updated_before,
                page_size=size,
                page_token=token,
            )

        return paginate(fetch, lambda p: p.runs, page_size=page_size, limit=limit)

    def cancel(self, run_id: str, *, reason: str = "", workflow_id: str = "") -> run_pb2.Run:
        request = R.CancelRunRequest(run_id=run_id, reason=reason, workflow_id=workflow_id)
        return self._t.unary(self._stub.CancelRun, request)

    def rerun(
        self, run_id: str, *, from_step: str | None = None, dry_run: bool = False
    ) -> R.StartRunResponse:
        request = R.RerunRunRequest(run_id=run_id, from_step=from_step or "", dry_run=dry_run)
        return self._t.unary(self._stub.RerunRun, request)

    def delete(self, run_id: str) -> None:
        self._t.unary(self._stub.DeleteRun, R.DeleteRunRequest(run_id=run_id))

    def timeline_page(
        self, run_id: str, *, page_size: int | None = None, page_token: str = ""
    ) -> R.GetRunTimelineResponse:
        request = R.GetRunTimelineRequest(
            run_id=run_id, page_size=page_size or 0, page_token=page_token
        )
        return self._t.unary(self._stub.GetRunTimeline, request)

    def timeline(
        self, run_id: str, *, page_size: int | None = None, limit: int | None = None
    ) -> Iterator[run_pb2.RunEvent]:
        def fetch(token: str, size: int | None) -> R.GetRunTimelineResponse:
            return self.timeline_page(run_id, page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.events, page_size=page_size, limit=limit)

    def approve_step(
        self, run_id: str, step_id: str, *, reason: str = "", workflow_id: str = ""
    ) -> run_pb2.Run:
        request = _approve_request(run_id, step_id, reason, workflow_id)
        return self._t.unary(self._stub.ApproveStep, request)

    def reject_step(
        self, run_id: str, step_id: str, *, reason: str = "", workflow_id: str = ""
    ) -> run_pb2.Run:
        request = _reject_request(run_id, step_id, reason, workflow_id)
        return self._t.unary(self._stub.RejectStep, request)

    def watch(
        self, run_id: str, *, timeout: float | None = None
    ) -> Generator[R.WatchRunResponse, None, None]:
        return self._t.stream(
            self._stub.WatchRun,
            R.WatchRunRequest(run_id=run_id),
            timeout=timeout,
            wait_for=run_id,
            wait_kind="run",
        )

    def wait(self, run_id: str, *, timeout: float | None = 60.0) -> run_pb2.Run:
        ended: run_pb2.Run | None = None
        try:
            for update in self.watch(run_id, timeout=timeout):
                if is_run_terminal(update.run.status):
                    ended = update.run
        except WaitTimeout:
            if ended is None:
                raise
        if ended is not None:
            return ended
        run = self.get(run_id)
        if not is_run_terminal(run.status):
            raise WaitTimeout(run_id, timeout, kind="run")
        return run
