"""The workflow API's domain: definitions (WorkflowService) and runs (RunService).

The gateway does what must be answered synchronously (validation, idempotency, approvals,
cancels, reruns) with the same compare-and-set writes the engine uses, then asks the engine
for a pass over the run at once: a direct call when the engine runs in this process, else a
small "advance <run id>" message the engines share through their queue group. Either way
the write also sets the run's timer to now, so a lost message only costs a timer poll.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from cordum.server.errors import (
    CordumError,
    FieldViolation,
    Violations,
    failed_precondition,
    invalid,
    invalid_field,
    not_found,
)
from cordum.server.services.caller import Caller
from cordum.server.services.job_validation import (
    LABEL_KEY_RE,
    TENANT_RE,
    check_id,
    check_tenant_filter,
)
from cordum.server.stores.jobs import ms_timestamp
from cordum.server.workflows import dag
from cordum.server.workflows.definition import (
    STEP_ID_RE,
    WORKFLOW_ID_RE,
    CompiledWorkflow,
    SchemaLookup,
    compile_workflow,
    definition_key,
    schema_violations,
    validate_workflow,
)
from cordum.server.workflows.engine import DefinitionCache, RunEffects, number_events
from cordum.server.workflows.events import RunEventHub
from cordum.server.workflows.store import (
    TERMINAL_RUN,
    StoredRun,
    WorkflowStore,
    request_hash,
)
from cordum.server.workflows.subworkflows import reference_problems
from cordum.v1 import error_reason_pb2, run_pb2, run_service_pb2, workflow_pb2

logger = logging.getLogger(__name__)
E = error_reason_pb2
R = run_pb2

MAX_PAGE = 500
MAX_TIMELINE_PAGE = 1000
MAX_LABELS = 50
CAS_ATTEMPTS = 50

Advance = Callable[[str], Awaitable[None]]


def now_ms() -> int:
    return int(time.time() * 1000)


def page_size(value: int, default: int = 50, limit: int = MAX_PAGE) -> int:
    if value < 0:
        raise invalid_field("page_size", "must not be negative")
    return min(value or default, limit)


def workflow_invalid(problems: list[FieldViolation]) -> CordumError:
    return CordumError(
        grpc.StatusCode.INVALID_ARGUMENT,
        E.ERROR_REASON_WORKFLOW_INVALID,
        f"the workflow is invalid ({len(problems)} problem"
        f"{'s' if len(problems) != 1 else ''}): "
        + "; ".join(f"{p.field}: {p.description}" for p in problems),
        problems,
    )


def _workflow_not_found(workflow_id: str) -> CordumError:
    return not_found(E.ERROR_REASON_WORKFLOW_NOT_FOUND, f"workflow {workflow_id} not found")


def _run_not_found(run_id: str) -> CordumError:
    return not_found(E.ERROR_REASON_RUN_NOT_FOUND, f"run {run_id} not found")


class WorkflowService:
    def __init__(self, *, store: WorkflowStore, schemas: SchemaLookup | None) -> None:
        self.store = store
        self.schemas = schemas

    async def validate(
        self, wf: workflow_pb2.Workflow, caller: Caller
    ) -> tuple[CompiledWorkflow, list[FieldViolation]]:
        candidate = workflow_pb2.Workflow()
        candidate.CopyFrom(wf)
        candidate.id = candidate.id.strip() or "candidate"
        _set_step_ids(candidate)
        caller.check_tenant(candidate.org_id, "org_id")
        problems = _tenant_problems(candidate.org_id)
        compiled, more = await validate_workflow(candidate, self.schemas)
        owned = workflow_pb2.Workflow()
        owned.CopyFrom(candidate)
        owned.org_id = caller.tenant_for(candidate.org_id)
        refs = await reference_problems(owned, self.store)
        return compiled, problems + more + refs

    async def upsert(self, wf: workflow_pb2.Workflow, caller: Caller) -> workflow_pb2.Workflow:
        """Create or replace (upstream's POST upserts: empty top-level fields keep the stored
        value; steps are always replaced). Invalid → every problem listed, nothing stored."""
        workflow_id = wf.id.strip() or str(uuid.uuid4())
        caller.check_tenant(wf.org_id, "org_id")
        for _ in range(CAS_ATTEMPTS):
            found = await self.store.get_workflow(workflow_id)
            if found is not None and not caller.can_see(found[1]):
                raise _workflow_not_found(workflow_id)
            new = workflow_pb2.Workflow()
            new.CopyFrom(wf)
            new.id = workflow_id
            problems = _tenant_problems(new.org_id)
            stored = found[0] if found is not None else None
            if stored is not None:
                _merge(new, stored)
            new.org_id = caller.tenant_for(new.org_id)
            _set_step_ids(new)
            now = now_ms()
            new.updated_at.CopyFrom(ms_timestamp(now))
            if stored is None or not stored.HasField("created_at"):
                new.created_at.CopyFrom(ms_timestamp(now))
            if not new.created_by:
                new.created_by = caller.principal
            expected = stored.revision if stored is not None else 0
            new.revision = expected + 1
            _, more = await validate_workflow(new, self.schemas)
            problems += more
            problems += await reference_problems(new, self.store)
            if problems:
                raise workflow_invalid(problems)
            if await self.store.save_workflow(new, new.org_id, expected, now):
                return new
        raise CordumError(
            grpc.StatusCode.ABORTED,
            E.ERROR_REASON_REVISION_MISMATCH,
            f"workflow {workflow_id} is being changed concurrently; retry",
        )

    async def get(self, workflow_id: str, caller: Caller) -> workflow_pb2.Workflow:
        check_id(workflow_id, "workflow_id", WORKFLOW_ID_RE)
        found = await self.store.get_workflow(workflow_id)
        if found is None or not caller.can_see(found[1]):
            raise _workflow_not_found(workflow_id)
        return found[0]

    async def list(
        self, org_id: str, size: int, token: str, caller: Caller
    ) -> tuple[list[workflow_pb2.Workflow], str]:
        caller.check_tenant(org_id, "org_id")
        check_tenant_filter(org_id, "org_id")
        tenant = caller.tenant_for(org_id)
        page = await self.store.list_workflows(tenant, page_size(size), token)
        found = await self.store.get_workflows(page.ids)
        return [f[0] for f in found if f is not None], page.next_token

    async def delete(self, workflow_id: str, caller: Caller) -> None:
        await self.get(workflow_id, caller)
        # Runs keep the definition they started with; they finish unaffected.
        await self.store.delete_workflow(workflow_id)


def _tenant_problems(org_id: str) -> list[FieldViolation]:
    problems = []
    if org_id and not TENANT_RE.match(org_id):
        problems.append(FieldViolation("org_id", "1-100 characters from [A-Za-z0-9._-]"))
    return problems


def _set_step_ids(wf: workflow_pb2.Workflow) -> None:
    for sid, step in wf.steps.items():
        if not step.id:
            step.id = sid


def _merge(new: workflow_pb2.Workflow, stored: workflow_pb2.Workflow) -> None:
    for name in (
        "org_id",
        "team_id",
        "name",
        "description",
        "version",
        "timeout_sec",
        "created_by",
    ):
        if not getattr(new, name):
            setattr(new, name, getattr(stored, name))
    for name in ("input_schema", "config"):
        if not new.HasField(name) and stored.HasField(name):
            getattr(new, name).CopyFrom(getattr(stored, name))
    if not new.parameters and stored.parameters:
        new.parameters.extend(stored.parameters)
    if stored.HasField("created_at"):
        new.created_at.CopyFrom(stored.created_at)


@dataclass
class Started:
    run: run_pb2.Run
    replay: bool


class RunService:
    def __init__(
        self,
        *,
        store: WorkflowStore,
        workflows: WorkflowService,
        effects: RunEffects,
        hub: RunEventHub,
        advance: Advance,
    ) -> None:
        self.store = store
        self.workflows = workflows
        self.effects = effects
        self.hub = hub
        self.advance = advance
        self.definitions = DefinitionCache(store)

    # -- helpers ------------------------------------------------------------------------

    async def _load(self, run_id: str, caller: Caller) -> StoredRun:
        check_id(run_id, "run_id")
        stored = await self.store.load_run(run_id)
        if stored is None or not caller.can_see(stored.run.tenant_id):
            raise _run_not_found(run_id)
        return stored

    async def _kick(self, run_id: str) -> None:
        try:
            await self.advance(run_id)
        except Exception:  # the run's timer is due now: an engine gets to it regardless
            logger.warning("could not ask an engine to advance run %s", run_id, exc_info=True)

    async def _compiled(self, stored: StoredRun) -> CompiledWorkflow:
        compiled = await self.definitions.for_run(stored.run.id, stored)
        if compiled is None:
            raise CordumError(
                grpc.StatusCode.INTERNAL,
                E.ERROR_REASON_INTERNAL,
                f"run {stored.run.id} has no usable workflow snapshot",
            )
        return compiled

    async def _reloaded(self, run_id: str, caller: Caller) -> run_pb2.Run:
        return dag.run_view((await self._load(run_id, caller)).run)

    # -- start ------------------------------------------------------------------------

    async def start(
        self, req: run_service_pb2.StartRunRequest, caller: Caller, idem_header: str = ""
    ) -> Started:
        caller.check_tenant(req.org_id, "org_id")
        check_tenant_filter(req.org_id, "org_id")
        wf = await self.workflows.get(req.workflow_id, caller)
        compiled = self.definitions.get(definition_key(wf))
        if compiled is None:
            compiled, problems = compile_workflow(wf)
            if problems:  # saved under older rules; refuse rather than run half of it
                raise workflow_invalid(problems)
        v = Violations()
        tenant = wf.org_id or "default"
        if req.org_id and req.org_id != tenant:
            v.add("org_id", f"the workflow belongs to {tenant!r}")
        run_input = dag.struct_dict(req.input) if req.HasField("input") else {}
        if compiled.input_schema is not None:
            v.items.extend(schema_violations(compiled.input_schema, run_input, "input"))
        _check_labels(v, dict(req.labels))
        key = req.idempotency_key.strip() or idem_header.strip()
        if len(key) > 200:
            v.add("idempotency_key", "at most 200 characters")
        if v.items:
            reason = (
                E.ERROR_REASON_SCHEMA_VALIDATION_FAILED
                if any(i.field.startswith("input") for i in v.items)
                else E.ERROR_REASON_INVALID_ARGUMENT
            )
            error = invalid(v.items)
            error.reason = reason
            raise error
        now = now_ms()
        run = R.Run(
            id=str(uuid.uuid4()),
            workflow_id=wf.id,
            org_id=tenant,
            tenant_id=tenant,
            team_id=req.team_id or wf.team_id,
            status=R.RUN_STATUS_PENDING,
            labels=dict(req.labels),
            idempotency_key=key,
            dry_run=req.dry_run,
            triggered_by=caller.principal,
        )
        run.input.CopyFrom(dag.to_struct(run_input))
        run.created_at.CopyFrom(ms_timestamp(now))
        run.updated_at.CopyFrom(ms_timestamp(now))
        dag.initial_steps(run, compiled)
        created = dag.new_event(
            run,
            now,
            "run_created",
            status=R.RunStatus.Name(run.status),
            message="dry run" if run.dry_run else "",
            data={"revision": wf.revision, "dry_run": run.dry_run},
        )
        created.seq = 1
        idempotency = None
        if key:
            fingerprint = request_hash(
                {
                    "input": run_input,
                    "dry_run": req.dry_run,
                    "labels": dict(req.labels),
                    "team_id": req.team_id,
                }
            )
            idempotency = (self.store.idempotency_key(tenant, wf.id, key), fingerprint)
        outcome = await self.store.create_run(
            run, wf, [created], now_ms=now, wake_ms=now, idempotency=idempotency
        )
        if outcome.status == "replay":
            assert idempotency is not None
            if outcome.request_hash != idempotency[1]:
                raise CordumError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    E.ERROR_REASON_IDEMPOTENCY_KEY_REUSED,
                    f"idempotency key {key!r} was used for a different request",
                )
            existing = await self.store.load_run(outcome.run_id)
            if existing is None:
                raise CordumError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    E.ERROR_REASON_IDEMPOTENCY_KEY_REUSED,
                    f"idempotency key {key!r} was used for run {outcome.run_id}, which expired",
                )
            return Started(dag.run_view(existing.run), replay=True)
        if outcome.status != "ok":
            raise CordumError(
                grpc.StatusCode.INTERNAL, E.ERROR_REASON_INTERNAL, f"run id collision ({run.id})"
            )
        self.definitions.put(compiled)
        await self.effects.publish_events([created])
        await self._kick(run.id)
        return Started(await self._reloaded(run.id, caller), replay=False)

    # -- reads ------------------------------------------------------------------------

    async def get(self, run_id: str, caller: Caller) -> run_pb2.Run:
        return dag.run_view((await self._load(run_id, caller)).run)

    async def list(
        self, req: run_service_pb2.ListRunsRequest, caller: Caller
    ) -> tuple[list[run_pb2.Run], str]:
        status = ""
        if req.status.strip():
            name = req.status.strip().upper()
            if not name.startswith("RUN_STATUS_"):
                name = "RUN_STATUS_" + name
            if name not in R.RunStatus.keys() or name == "RUN_STATUS_UNSPECIFIED":  # noqa: SIM118
                raise invalid_field("status", f"unknown run status {req.status!r}")
            status = name
        caller.check_tenant(req.org_id, "org_id")
        check_tenant_filter(req.org_id, "org_id")
        if req.workflow_id:
            check_id(req.workflow_id, "workflow_id", WORKFLOW_ID_RE)
        tenant = caller.tenant_for(req.org_id)
        size = page_size(req.page_size)
        after = req.updated_after.ToMilliseconds() if req.HasField("updated_after") else 0
        before = req.updated_before.ToMilliseconds() if req.HasField("updated_before") else 0
        token = req.page_token
        found: list[run_pb2.Run] = []
        # Filters the index cannot apply (workflow with a status, team) may thin a page
        # out; keep reading until it is full or the index ends.
        for _ in range(20):
            page = await self.store.list_runs(
                tenant=tenant,
                status=status,
                workflow_id=req.workflow_id,
                after_ms=after,
                before_ms=before,
                page_size=size,
                page_token=token,
            )
            for stored in await self.store.load_runs(page.ids):
                if stored is None:
                    continue  # expired; the reconciler trims the index
                run = stored.run
                if req.workflow_id and run.workflow_id != req.workflow_id:
                    continue
                if req.team_id and run.team_id != req.team_id:
                    continue
                found.append(dag.run_view(run))
            token = page.next_token
            if not token or len(found) >= size:
                break
        return found, token

    async def timeline(
        self, run_id: str, size: int, token: str, caller: Caller
    ) -> tuple[list[run_pb2.RunEvent], str]:
        count = page_size(size, default=200, limit=MAX_TIMELINE_PAGE)
        await self._load(run_id, caller)
        try:
            start = int(token) if token else 1
        except ValueError as exc:
            raise invalid_field("page_token", "malformed page token") from exc
        page = await self.store.timeline(run_id, start, count)
        if page is None:
            raise _run_not_found(run_id)
        events, last = page
        next_seq = events[-1].seq + 1 if events else start
        return events, str(next_seq) if events and next_seq <= last else ""

    # -- changes ----------------------------------------------------------------------

    async def _write(
        self,
        run_id: str,
        caller: Caller,
        change: Callable[[StoredRun, CompiledWorkflow], dag.Plan | None],
    ) -> tuple[StoredRun, dag.Plan | None]:
        """Load, apply `change` (None = nothing to do), CAS-write, carry out its effects."""
        for _ in range(CAS_ATTEMPTS):
            stored = await self._load(run_id, caller)
            compiled = await self._compiled(stored)
            plan = change(stored, compiled)
            if plan is None or not plan.changed:
                return stored, None
            number_events(stored, plan.events)
            now = now_ms()
            ver = await self.store.save_run(
                stored, plan.run, plan.events, now_ms=now, wake_ms=plan.wake_ms
            )
            if ver is not None:
                await self.effects.carry_out(plan.run, compiled, plan)
                return stored, plan
        raise CordumError(
            grpc.StatusCode.ABORTED,
            E.ERROR_REASON_RUN_BUSY,
            f"run {run_id} is busy; retry",
        )

    @staticmethod
    def _check_workflow(stored: StoredRun, workflow_id: str) -> None:
        if workflow_id and workflow_id != stored.run.workflow_id:
            raise failed_precondition(
                E.ERROR_REASON_WORKFLOW_MISMATCH,
                f"run {stored.run.id} belongs to workflow {stored.run.workflow_id}, "
                f"not {workflow_id}",
            )

    async def cancel(
        self, run_id: str, workflow_id: str, reason: str, caller: Caller
    ) -> run_pb2.Run:
        if workflow_id:
            check_id(workflow_id, "workflow_id", WORKFLOW_ID_RE)
        why = reason or f"cancelled by {caller.principal or 'request'}"

        def change(stored: StoredRun, compiled: CompiledWorkflow) -> dag.Plan | None:
            self._check_workflow(stored, workflow_id)
            if stored.run.status in TERMINAL_RUN:
                return None  # a finished run stays as it finished
            return dag.cancel(stored.run, compiled, now_ms(), why)

        stored, plan = await self._write(run_id, caller, change)
        return dag.run_view(plan.run if plan is not None else stored.run)

    async def decide(
        self,
        run_id: str,
        workflow_id: str,
        step_id: str,
        approved: bool,
        reason: str,
        caller: Caller,
    ) -> run_pb2.Run:
        check_id(step_id, "step_id", STEP_ID_RE)
        if workflow_id:
            check_id(workflow_id, "workflow_id", WORKFLOW_ID_RE)

        def change(stored: StoredRun, compiled: CompiledWorkflow) -> dag.Plan | None:
            self._check_workflow(stored, workflow_id)
            run = stored.run
            if run.status in TERMINAL_RUN:
                raise failed_precondition(
                    E.ERROR_REASON_RUN_TERMINAL,
                    f"run {run_id} already ended {dag.run_status_short(run.status)}",
                )
            cs = compiled.steps.get(step_id)
            if cs is None:
                raise not_found(
                    E.ERROR_REASON_STEP_NOT_FOUND, f"run {run_id} has no step {step_id}"
                )
            sr = run.steps.get(step_id)
            if cs.kind != "approval" or sr is None or sr.status != R.STEP_STATUS_WAITING:
                status = dag.short_status(sr.status) if sr is not None else "PENDING"
                raise failed_precondition(
                    E.ERROR_REASON_STEP_NOT_WAITING,
                    f"step {step_id} is {status}, not waiting for an approval",
                )
            return dag.decide_approval(
                run, compiled, now_ms(), step_id, approved, reason, caller.principal
            )

        await self._write(run_id, caller, change)
        await self._kick(run_id)
        return await self._reloaded(run_id, caller)

    async def rerun(self, req: run_service_pb2.RerunRunRequest, caller: Caller) -> Started:
        old = (await self._load(req.run_id, caller)).run
        found = await self.store.get_workflow(old.workflow_id)
        if found is not None and caller.can_see(found[1]):
            wf = found[0]
        else:  # the workflow was deleted: rerun the definition the run had
            snapshot = await self.store.load_definition(old.id)
            if snapshot is None:
                raise _workflow_not_found(old.workflow_id)
            wf = snapshot
        compiled, problems = compile_workflow(wf)
        if problems:
            raise workflow_invalid(problems)
        from_step = req.from_step.strip()
        if from_step and from_step not in compiled.steps:
            raise invalid_field("from_step", f"workflow {wf.id} has no step {from_step!r}")
        rerun = _downstream(compiled, from_step) if from_step else set(compiled.steps)
        ancestors = _upstream(compiled, from_step) if from_step else set()
        done = (R.STEP_STATUS_SUCCEEDED, R.STEP_STATUS_SKIPPED)
        for sid in sorted(ancestors):
            sr = old.steps.get(sid)
            if sr is None or sr.status not in done:
                status = dag.short_status(sr.status) if sr is not None else "PENDING"
                raise failed_precondition(
                    E.ERROR_REASON_DEPENDENCY_NOT_SUCCEEDED,
                    f"step {from_step} depends on {sid}, which is {status} in run {old.id}",
                )
        run_input = dag.struct_dict(old.input) if old.HasField("input") else {}
        if compiled.input_schema is not None:
            problems = schema_violations(compiled.input_schema, run_input, "input")
            if problems:
                error = invalid(problems)
                error.reason = E.ERROR_REASON_SCHEMA_VALIDATION_FAILED
                raise error
        now = now_ms()
        run = R.Run(
            id=str(uuid.uuid4()),
            workflow_id=wf.id,
            org_id=old.org_id,
            tenant_id=old.tenant_id,
            team_id=old.team_id,
            status=R.RUN_STATUS_PENDING,
            labels=dict(old.labels),
            rerun_of=old.id,
            rerun_step=from_step,
            dry_run=req.dry_run,
            triggered_by=caller.principal or old.triggered_by,
        )
        run.input.CopyFrom(old.input)
        run.created_at.CopyFrom(ms_timestamp(now))
        run.updated_at.CopyFrom(ms_timestamp(now))
        copied = []
        context: dict[str, object] = {}
        for sid in compiled.order:
            sr = old.steps.get(sid)
            if sid in rerun or sr is None or sr.status not in done:
                continue
            copied.append(sid)
            run.steps[sid].CopyFrom(sr)
            for child in sr.children:
                if child in old.steps:
                    run.steps[child].CopyFrom(old.steps[child])
            cs = compiled.steps[sid]
            if cs.output_path and sr.status == R.STEP_STATUS_SUCCEEDED:
                value = dag.from_value(sr.output) if sr.HasField("output") else None
                node = context
                for segment in cs.output_path[:-1]:
                    node = node.setdefault(segment, {})  # type: ignore[assignment]
                node[cs.output_path[-1]] = value
        if context:
            run.context.CopyFrom(dag.to_struct(context))
        dag.initial_steps(run, compiled)
        created = dag.new_event(
            run,
            now,
            "run_created",
            status=R.RunStatus.Name(run.status),
            message=f"rerun of {old.id}" + (f" from {from_step}" if from_step else ""),
            data={
                "rerun_of": old.id,
                "from_step": from_step,
                "copied": copied,
                "revision": wf.revision,
                "dry_run": req.dry_run,
            },
        )
        created.seq = 1
        outcome = await self.store.create_run(run, wf, [created], now_ms=now, wake_ms=now)
        if outcome.status != "ok":
            raise CordumError(
                grpc.StatusCode.INTERNAL, E.ERROR_REASON_INTERNAL, f"run id collision ({run.id})"
            )
        self.definitions.put(compiled)
        await self.effects.publish_events([created])
        await self._kick(run.id)
        return Started(await self._reloaded(run.id, caller), replay=False)

    async def delete(self, run_id: str, caller: Caller) -> None:
        stored = await self._load(run_id, caller)
        if stored.run.status not in TERMINAL_RUN:
            # Deleting a live run stops its jobs first (upstream left them running).
            await self.cancel(run_id, "", "run deleted", caller)
        if not await self.store.delete_run(run_id):
            raise _run_not_found(run_id)

    # -- watch ------------------------------------------------------------------------

    async def watch(
        self, run_id: str, caller: Caller
    ) -> AsyncIterator[tuple[run_pb2.RunEvent, run_pb2.Run]]:
        """The timeline so far, then live events, until the run is terminal."""
        queue = self.hub.listen(run_id)
        try:
            stored = await self._load(run_id, caller)
            last = 0
            while True:  # history, page by page
                page = await self.store.timeline(run_id, last + 1, MAX_TIMELINE_PAGE)
                if page is None:
                    raise _run_not_found(run_id)
                events, _ = page
                if not events:
                    break
                # Read after the page, so the run sent with an event is never older than it
                # (a run that ends during the replay ends the stream with its final state).
                stored = await self._load(run_id, caller)
                view = dag.run_view(stored.run)
                for event in events:
                    yield event, view
                    last = event.seq
            if stored.run.status in TERMINAL_RUN:
                return
            while True:
                batch = await queue.get()
                if batch[-1].seq <= last:
                    continue
                if batch[0].seq > last + 1:  # missed a message: read the gap back
                    page = await self.store.timeline(run_id, last + 1, MAX_TIMELINE_PAGE)
                    batch = page[0] if page else batch
                stored = await self._load(run_id, caller)
                view = dag.run_view(stored.run)
                for event in batch:
                    if event.seq <= last:
                        continue
                    yield event, view
                    last = event.seq
                if stored.run.status in TERMINAL_RUN and last >= stored.seq:
                    return
        finally:
            self.hub.forget(run_id, queue)


def _check_labels(v: Violations, labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        v.add("labels", f"at most {MAX_LABELS} entries")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            v.add(f"labels[{key}]", "key: 1-100 characters from [A-Za-z0-9._/-]")
        if len(value) > 1000:
            v.add(f"labels[{key}]", "value: at most 1000 characters")


def _downstream(compiled: CompiledWorkflow, step_id: str) -> set[str]:
    """The step and everything that runs after it (dependents and error handlers)."""
    out = {step_id}
    for sid in compiled.order:
        cs = compiled.steps[sid]
        if any(d in out for d in cs.depends_on) or any(t in out for t in cs.triggers):
            out.add(sid)
    return out


def _upstream(compiled: CompiledWorkflow, step_id: str) -> set[str]:
    out: set[str] = set()
    todo = list(compiled.steps[step_id].depends_on)
    while todo:
        sid = todo.pop()
        if sid in out or sid not in compiled.steps:
            continue
        out.add(sid)
        todo.extend(compiled.steps[sid].depends_on)
    return out
