"""Subworkflow steps: a step that runs another workflow as a child run.

- Saving: the named workflow must exist in the same tenant, and following subworkflow steps
  from it must never lead back to the workflow being saved (a direct or indirect
  self-reference), reported on `steps.<id>.workflow_id`.
- Starting (an effect of the parent's committed pass): the child run's id is derived from
  parent run id + step key + attempt (dag.child_run_id) and the store creates a run only if
  that id is new, so an attempt started twice (a crash between recording it and creating
  the child, or the repair below racing the first start) is one child. The child takes the
  current definition of its workflow, the step's templated input, and the parent's tenant,
  team, labels and caller; it records `parent_run_id`, `parent_step_id` and `depth`.
- Finishing: when a child run ends, the effects that committed its end ask the engines to
  advance the parent (one message on the advance subject), and the parent's pass reads the
  child run as the outcome of the step attempt. The reconciler pokes parents with a running
  child every tick, and that pass repairs what a crash lost: a child that ended unseen
  becomes the outcome, a child never created is created.
- Cancelling: ending a parent cancels the child runs of its running attempts (and those
  cancel theirs, recursively, through the same path).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from cordum.server.errors import FieldViolation
from cordum.server.stores.jobs import ms_timestamp
from cordum.server.workflows import dag
from cordum.server.workflows.definition import (
    CompiledWorkflow,
    compile_workflow,
    schema_violations,
    step_kind,
)
from cordum.server.workflows.store import WorkflowStore
from cordum.v1 import run_pb2, workflow_pb2

if TYPE_CHECKING:
    from cordum.server.workflows.engine import RunEffects

logger = logging.getLogger(__name__)
R = run_pb2
Lookup = Callable[[str], Awaitable[workflow_pb2.Workflow | None]]
CAS_ATTEMPTS = 50
# Definitions read while following references from one workflow being saved.
MAX_LOOKUPS = 1000


def _targets(wf: workflow_pb2.Workflow) -> list[tuple[str, str]]:
    """(step id, workflow id) of every subworkflow step, by step id."""
    return sorted(
        (sid, step.workflow_id)
        for sid, step in wf.steps.items()
        if step_kind(step.type) == "subworkflow" and step.workflow_id
    )


async def reference_problems(
    wf: workflow_pb2.Workflow, store: WorkflowStore
) -> list[FieldViolation]:
    """Unknown workflows and cycles through subworkflow steps, as field violations."""
    tenant = wf.org_id or "default"
    problems: list[FieldViolation] = []
    cache: dict[str, workflow_pb2.Workflow | None] = {}

    async def lookup(workflow_id: str) -> workflow_pb2.Workflow | None:
        if workflow_id not in cache:
            found = await store.get_workflow(workflow_id)
            # Another tenant's workflow is as good as absent (and not named as present).
            ok = found is not None and (found[0].org_id or "default") == tenant
            cache[workflow_id] = found[0] if ok and found is not None else None
        return cache[workflow_id]

    for sid, target in _targets(wf):
        where = f"steps.{sid}.workflow_id"
        if target == wf.id:
            problems.append(FieldViolation(where, "a workflow cannot run itself"))
            continue
        if await lookup(target) is None:
            problems.append(FieldViolation(where, f"no workflow {target!r}"))
            continue
        # Depth-first over what the target runs; the definition being saved replaces the
        # stored one, so a path back to wf.id is a cycle.
        path = [wf.id, target]
        seen: set[str] = set()
        cycle = await _path_back(wf.id, target, path, seen, lookup)
        if cycle:
            problems.append(FieldViolation(where, "runs this workflow again: " + " → ".join(cycle)))
    return problems


async def _path_back(
    origin: str, current: str, path: list[str], seen: set[str], lookup: Lookup
) -> list[str]:
    if current in seen or len(seen) >= MAX_LOOKUPS:
        return []
    seen.add(current)
    found = await lookup(current)
    if found is None:
        return []
    for _, nxt in _targets(found):
        if nxt == origin:
            return [*path, nxt]
        cycle = await _path_back(origin, nxt, [*path, nxt], seen, lookup)
        if cycle:
            return cycle
    return []


def child_outcome(child: run_pb2.Run) -> dag.JobOutcome | None:
    """A terminal child run as the outcome of its parent's step attempt (None: running)."""
    state = {
        R.RUN_STATUS_SUCCEEDED: "SUCCEEDED",
        R.RUN_STATUS_FAILED: "FAILED",
        # A cancelled child fails the attempt (retries apply; a retry is a new child).
        R.RUN_STATUS_CANCELLED: "FAILED",
        R.RUN_STATUS_TIMED_OUT: "TIMEOUT",
    }.get(child.status)
    if state is None:
        return None
    name = dag.run_status_short(child.status).lower()
    if state == "SUCCEEDED":
        output = dag.from_value(child.output) if child.HasField("output") else None
        size = len(json.dumps(output, separators=(",", ":")).encode())
        return dag.JobOutcome(job_id="", state=state, output=output, output_size=size)
    why = child.error.message if child.HasField("error") else ""
    return dag.JobOutcome(
        job_id="",
        state=state,
        error_message=f"child run {child.id} {name}" + (f": {why}" if why else ""),
        error_code=child.error.code or f"CHILD_{name.upper()}",
    )


class ChildRuns:
    """Creates and cancels child runs (shared by the engine and the gateway's effects)."""

    def __init__(self, store: WorkflowStore) -> None:
        self.store = store

    def _child(
        self, parent: run_pb2.Run, start: dag.ChildStart, wf: workflow_pb2.Workflow
    ) -> run_pb2.Run:
        run = R.Run(
            id=start.run_id,
            workflow_id=wf.id,
            org_id=parent.tenant_id,
            tenant_id=parent.tenant_id,
            team_id=parent.team_id,
            status=R.RUN_STATUS_PENDING,
            labels=dict(parent.labels),
            triggered_by=parent.triggered_by,
            parent_run_id=parent.id,
            parent_step_id=start.key,
            depth=parent.depth + 1,
        )
        payload = start.payload if isinstance(start.payload, dict) else {"value": start.payload}
        run.input.CopyFrom(dag.to_struct(payload))
        return run

    async def start(self, parent: run_pb2.Run, starts: Sequence[dag.ChildStart]) -> dict[str, str]:
        """Create the child runs (an existing one is kept). Returns, by step key, why a
        child could not be created (its workflow is gone, no longer compiles, or refuses
        the input)."""
        problems: dict[str, str] = {}
        # One lookup per workflow: a for_each step starts many children of one workflow.
        definitions: dict[str, tuple[workflow_pb2.Workflow, CompiledWorkflow] | None] = {}
        for start in starts:
            workflow_id = start.step.step.workflow_id
            if workflow_id not in definitions:
                definitions[workflow_id] = await self._definition(workflow_id, parent)
            found = definitions[workflow_id]
            if found is None:
                problems[start.key] = f"workflow {workflow_id!r} does not exist (any more)"
                continue
            wf, compiled = found
            run = self._child(parent, start, wf)
            run_input = dag.struct_dict(run.input)
            if compiled.input_schema is not None:
                bad = schema_violations(compiled.input_schema, run_input, "input")
                if bad:
                    problems[start.key] = f"the input does not match {workflow_id!r}: " + "; ".join(
                        f"{p.field}: {p.description}" for p in bad
                    )
                    continue
            now = int(time.time() * 1000)
            run.created_at.CopyFrom(ms_timestamp(now))
            run.updated_at.CopyFrom(ms_timestamp(now))
            dag.initial_steps(run, compiled)
            created = dag.new_event(
                run,
                now,
                "run_created",
                status=R.RunStatus.Name(run.status),
                message=f"child of run {parent.id} step {start.key}",
                data={
                    "revision": wf.revision,
                    "parent_run_id": parent.id,
                    "parent_step_id": start.key,
                },
            )
            created.seq = 1
            # wake now: an engine's timer poll gives the child its first pass.
            await self.store.create_run(run, wf, [created], now_ms=now, wake_ms=now)
        return problems

    async def _definition(
        self, workflow_id: str, parent: run_pb2.Run
    ) -> tuple[workflow_pb2.Workflow, CompiledWorkflow] | None:
        """The child's current definition, if it exists in the parent's tenant and compiles."""
        found = await self.store.get_workflow(workflow_id)
        if found is None or (found[0].org_id or "default") != (parent.tenant_id or "default"):
            return None
        compiled, invalid = compile_workflow(found[0])
        return None if invalid else (found[0], compiled)

    async def cancel(self, run_id: str, reason: str, effects: RunEffects) -> None:
        for _ in range(CAS_ATTEMPTS):
            stored = await self.store.load_run(run_id)
            if stored is None or stored.run.status in dag.TERMINAL_RUN:
                return
            compiled = await effects.definitions.for_run(run_id, stored)
            if compiled is None:
                return
            now = int(time.time() * 1000)
            plan = dag.cancel(stored.run, compiled, now, f"parent: {reason}")
            for i, event in enumerate(plan.events, start=1):
                event.seq = stored.seq + i
            ver = await self.store.save_run(
                stored, plan.run, plan.events, now_ms=now, wake_ms=plan.wake_ms
            )
            if ver is not None:
                await effects.carry_out(plan.run, compiled, plan)
                return
        logger.warning("child run %s: could not cancel it (write conflicts)", run_id)


def running_children(run: run_pb2.Run, wf: CompiledWorkflow) -> list[tuple[str, str]]:
    """(step key, child run id) of the run's RUNNING subworkflow attempts."""
    if not wf.has_subworkflows or run.status in dag.TERMINAL_RUN:
        return []
    return [
        (key, sr.child_run_id)
        for key, sr in run.steps.items()
        if sr.status == R.STEP_STATUS_RUNNING and sr.child_run_id
    ]
