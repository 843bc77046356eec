"""The scheduling pass: a pure function from (run, definition, now, job outcomes) to the new
run, its timeline events and the effects to carry out (jobs to dispatch, jobs to cancel,
alerts to publish, when to wake up next). No I/O here: the engine loads, calls `advance`,
writes the result with one compare-and-set and then carries out the effects.

Rules (where upstream was silent or wrong, the choice is documented here and tested):
- Steps run in topological order within a pass, so instant steps (condition, notify, a
  zero delay, skips) unlock their dependents in the same pass and the same write.
- Joins: a step runs when every dependency has finished and at least one SUCCEEDED. When
  none did (all SKIPPED, or failed with the failure handled by `on_error`), the step is
  SKIPPED too: a false condition skips exactly the branch that only it feeds, and a step
  fed by a skipped and a succeeded branch still runs (it sees `steps.<skipped>.status ==
  "SKIPPED"` and a null output). Upstream marked skipped steps SUCCEEDED and ran dependents.
- A `condition` step that evaluates false is SKIPPED (output false); one that is true
  SUCCEEDED (output true). A non-bool result or an evaluation error FAILS the step.
- A gate `condition` on another step is evaluated once, before its first attempt.
- Fail-fast: the first step that ends FAILED, TIMED_OUT or CANCELLED without an `on_error`
  handler ends the run (FAILED, TIMED_OUT or CANCELLED respectively, with `error` naming
  the step); jobs in flight are cancelled and unfinished steps marked CANCELLED. A for_each
  child that fails likewise ends its parent (same status) and cancels its siblings.
- `on_error: h` on step s: when s ends FAILED or TIMED_OUT (after its retries), the run
  does not fail; h (which waits for s) runs, and the run continues from h. Steps that
  depend on s see a failed dependency, i.e. that branch is skipped. A handler none of whose
  triggers failed is SKIPPED.
- Retries (job steps): FAILED and TIMEOUT outcomes are retried per the step's policy; a
  policy DENIED and a CANCELLED job never are (upstream retried denials).
- Step timeout: an attempt longer than `timeout_sec` is timed out (the engine moves the job
  to TIMEOUT in the job store, so a result racing it cannot win twice) and counts as a
  TIMEOUT outcome. An approval step's `timeout_sec` bounds the wait (then TIMED_OUT).
- Run timeout (`timeout_sec` on the workflow): the run ends TIMED_OUT, in-flight jobs are
  cancelled and unfinished steps CANCELLED.
- Dry run: nothing is dispatched, published or waited for. Every step is resolved and
  recorded (job inputs, for_each children, alerts) and marked SUCCEEDED, except a false
  condition (SKIPPED) and its branch; an expression or schema problem is recorded on the
  step's `error` instead of failing the run, so one dry run shows every problem.
- Subworkflow steps (see subworkflows.py) go through the same attempt logic as job steps:
  an attempt starts a child run (id derived from run id, step key and attempt, so a
  repeated start is the same run) instead of a job; the child's terminal state is its
  outcome (CANCELLED counts as FAILED, so retries apply); `timeout_sec` bounds each child
  run (then the child is cancelled and the attempt TIMES OUT). A dry run resolves the
  input and starts no child. Ending the run cancels its running children.
- Outputs: a job step's output is the worker's JSON result (inlined when at most 256 KiB,
  else null with `result_ptr` set); a for_each parent's output is the list of its
  children's outputs, in item order; `output_path` writes the output into the run context.
  The run's output is the outputs of the leaf steps that succeeded, by step id.
"""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from cordum.agent.v1 import alert_pb2
from cordum.server.errors import FieldViolation
from cordum.server.jsonvalue import from_struct as struct_dict
from cordum.server.jsonvalue import from_value, to_value
from cordum.server.workflows.definition import (
    CompiledStep,
    CompiledWorkflow,
    schema_violations,
)
from cordum.server.workflows.expressions import (
    JSON,
    ExpressionError,
    Scope,
)
from cordum.v1 import run_pb2

R = run_pb2
TERMINAL_RUN = frozenset(
    {R.RUN_STATUS_SUCCEEDED, R.RUN_STATUS_FAILED, R.RUN_STATUS_CANCELLED, R.RUN_STATUS_TIMED_OUT}
)
TERMINAL_STEP = frozenset(
    {
        R.STEP_STATUS_SUCCEEDED,
        R.STEP_STATUS_FAILED,
        R.STEP_STATUS_CANCELLED,
        R.STEP_STATUS_TIMED_OUT,
        R.STEP_STATUS_SKIPPED,
    }
)
FAILED_STEP = frozenset({R.STEP_STATUS_FAILED, R.STEP_STATUS_CANCELLED, R.STEP_STATUS_TIMED_OUT})
# How a step failure ends the run it is not handled in.
_RUN_END = {
    R.STEP_STATUS_FAILED: R.RUN_STATUS_FAILED,
    R.STEP_STATUS_TIMED_OUT: R.RUN_STATUS_TIMED_OUT,
    R.STEP_STATUS_CANCELLED: R.RUN_STATUS_CANCELLED,
}

MAX_INLINE_OUTPUT = 256 * 1024
MAX_ITEMS = 1000
# A CAP 2.17 worker refuses a context over 2 MiB.
MAX_INPUT_BYTES = 2 * 1024 * 1024

JOB_ID_RE = re.compile(
    r"^(?P<run>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}):"
    r"(?P<step>[A-Za-z0-9_-]{1,64})(?:\[(?P<index>\d{1,6})\])?@(?P<attempt>\d{1,6})$"
)


def step_job_id(run_id: str, key: str, attempt: int) -> str:
    return f"{run_id}:{key}@{attempt}"


# Child run ids are UUIDs (run ids are), derived so that starting one attempt twice (a
# crash between recording the attempt and creating the child) names the same run.
CHILD_RUN_NAMESPACE = uuid.UUID("5b0f8f6e-3c1a-4f7e-9a57-8d1c2e6b9f10")
# Nesting levels below a run started through the API: a bound on recursion through data
# (cycles between definitions are refused when they are saved).
MAX_DEPTH = 8


def child_run_id(run_id: str, key: str, attempt: int) -> str:
    return str(uuid.uuid5(CHILD_RUN_NAMESPACE, step_job_id(run_id, key, attempt)))


@dataclass(frozen=True)
class JobRef:
    run_id: str
    key: str  # `step` or `step[i]`
    step_id: str
    index: int | None
    attempt: int


def parse_job_id(job_id: str) -> JobRef | None:
    m = JOB_ID_RE.match(job_id)
    if m is None:
        return None
    index = m.group("index")
    step = m.group("step")
    key = f"{step}[{index}]" if index is not None else step
    return JobRef(m.group("run"), key, step, int(index) if index else None, int(m.group("attempt")))


def short_status(status: int) -> str:
    return R.StepStatus.Name(status).removeprefix("STEP_STATUS_")  # type: ignore[arg-type]


def run_status_short(status: int) -> str:
    return R.RunStatus.Name(status).removeprefix("RUN_STATUS_")  # type: ignore[arg-type]


def to_struct(value: Mapping[str, JSON]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    json_format.ParseDict(dict(value), out)
    return out


@dataclass
class JobOutcome:
    """A step job's terminal state, read from the job store (the authority)."""

    job_id: str
    state: str  # SUCCEEDED | FAILED | TIMEOUT | CANCELLED | DENIED | APPROVAL_REQUIRED
    result_ptr: str = ""
    output: JSON = None
    output_size: int = 0
    error_message: str = ""
    error_code: str = ""


@dataclass
class Dispatch:
    key: str
    step: CompiledStep
    job_id: str
    attempt: int
    payload: JSON
    index: int | None = None
    item: JSON = None


@dataclass
class ChildStart:
    """A subworkflow step attempt: the child run to create."""

    key: str
    step: CompiledStep
    run_id: str
    attempt: int
    payload: JSON


@dataclass
class ChildOutcome:
    """A child run's terminal state, as an outcome of the parent step's attempt."""

    key: str
    child_run_id: str
    outcome: JobOutcome


@dataclass
class Plan:
    run: run_pb2.Run
    events: list[run_pb2.RunEvent] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    children: list[ChildStart] = field(default_factory=list)
    # (child run id, reason)
    child_cancels: list[tuple[str, str]] = field(default_factory=list)
    # (job_id, reason)
    cancels: list[tuple[str, str]] = field(default_factory=list)
    alerts: list[alert_pb2.SystemAlert] = field(default_factory=list)
    wake_ms: int = -1

    @property
    def changed(self) -> bool:
        return bool(self.events)


def new_event(run: run_pb2.Run, now_ms: int, kind: str, **fields: Any) -> run_pb2.RunEvent:
    data = fields.pop("data", None)
    event = R.RunEvent(type=kind, run_id=run.id, workflow_id=run.workflow_id, **fields)
    event.time.FromMilliseconds(now_ms)
    if data:
        event.data.CopyFrom(to_struct(data))
    return event


def steps_view(run: run_pb2.Run) -> dict[str, JSON]:
    """`steps` as expressions see it: every step of the run (for_each children are summed up
    in their parent), with status, output and error."""
    view: dict[str, JSON] = {}
    for sid in sorted(run.steps):
        if "[" in sid:
            continue
        sr = run.steps[sid]
        view[sid] = {
            "status": short_status(sr.status),
            "output": from_value(sr.output) if sr.HasField("output") else None,
            "error": sr.error.message if sr.HasField("error") else None,
        }
    return view


def context_view(run: run_pb2.Run) -> dict[str, JSON]:
    """The run context as clients and `ctx` see it: output_path targets plus `steps`."""
    ctx = struct_dict(run.context) if run.HasField("context") else {}
    ctx["steps"] = steps_view(run)
    return ctx


def run_view(run: run_pb2.Run) -> run_pb2.Run:
    """The run as the API returns it: the stored one, with `context.steps` filled in (step
    outputs are stored once, in the step runs). Built with message copies, no JSON."""
    out = run_pb2.Run()
    out.CopyFrom(run)
    steps = out.context.fields["steps"].struct_value
    for sid in sorted(run.steps):
        if "[" in sid:
            continue
        sr = run.steps[sid]
        entry = steps.fields[sid].struct_value.fields
        entry["status"].string_value = short_status(sr.status)
        if sr.HasField("output"):
            entry["output"].CopyFrom(sr.output)
        else:
            entry["output"].null_value = struct_pb2.NULL_VALUE
        if sr.HasField("error"):
            entry["error"].string_value = sr.error.message
        else:
            entry["error"].null_value = struct_pb2.NULL_VALUE
    return out


def initial_steps(run: run_pb2.Run, wf: CompiledWorkflow) -> None:
    for sid in wf.order:
        if sid not in run.steps:
            run.steps[sid].CopyFrom(R.StepRun(step_id=sid, status=R.STEP_STATUS_PENDING))


def due_job_timeouts(run: run_pb2.Run, wf: CompiledWorkflow, now_ms: int) -> list[str]:
    """Job ids of running job-step attempts past their step's timeout."""
    if run.status in TERMINAL_RUN:
        return []
    out = []
    for key, sr in run.steps.items():
        if sr.status != R.STEP_STATUS_RUNNING or not sr.job_id:
            continue
        cs = wf.steps.get(key.partition("[")[0])
        if cs is None or cs.kind != "job" or not cs.timeout_ms or (cs.for_each and "[" not in key):
            continue
        if sr.started_at.ToMilliseconds() + cs.timeout_ms <= now_ms:
            out.append(sr.job_id)
    return out


class _Pass:
    def __init__(
        self,
        run: run_pb2.Run,
        wf: CompiledWorkflow,
        now_ms: int,
        schemas: Mapping[str, dict[str, Any] | None],
        rand: Callable[[], float],
    ) -> None:
        self.run = run
        self.wf = wf
        self.now = now_ms
        self.schemas = schemas
        self.rand = rand
        self.plan = Plan(run)
        self.dry = run.dry_run
        self._context: dict[str, JSON] | None = None
        self._input: JSON = None
        self._input_loaded = False

    # -- helpers ------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.run.status in TERMINAL_RUN

    def event(self, kind: str, **fields: Any) -> None:
        self.plan.events.append(new_event(self.run, self.now, kind, **fields))

    def step_event(self, kind: str, key: str, sr: run_pb2.StepRun, **fields: Any) -> None:
        fields.setdefault("status", R.StepStatus.Name(sr.status))
        self.event(kind, step_id=key, **fields)

    def sr(self, key: str) -> run_pb2.StepRun:
        if key not in self.run.steps:
            self.run.steps[key].CopyFrom(R.StepRun(step_id=key, status=R.STEP_STATUS_PENDING))
        return self.run.steps[key]

    def status(self, key: str) -> int:
        sr = self.run.steps.get(key)
        return sr.status if sr is not None else R.STEP_STATUS_PENDING

    def run_input(self) -> JSON:
        if not self._input_loaded:
            self._input = struct_dict(self.run.input) if self.run.HasField("input") else {}
            self._input_loaded = True
        return self._input

    def context(self) -> dict[str, JSON]:
        if self._context is None:
            self._context = struct_dict(self.run.context) if self.run.HasField("context") else {}
        return self._context

    def scope(self) -> Scope:
        return Scope(
            {
                "input": self.run_input,
                "steps": lambda: steps_view(self.run),
                "ctx": lambda: {**self.context(), "steps": steps_view(self.run)},
            }
        )

    def finish_step(
        self,
        key: str,
        status: int,
        *,
        kind: str = "step_completed",
        message: str = "",
        code: str = "",
        output: JSON = None,
        has_output: bool = False,
        data: dict[str, JSON] | None = None,
        job_id: str = "",
        result_ptr: str = "",
    ) -> None:
        sr = self.sr(key)
        sr.status = status  # type: ignore[assignment]
        sr.completed_at.FromMilliseconds(self.now)
        if not sr.HasField("started_at"):
            sr.started_at.FromMilliseconds(self.now)
        sr.ClearField("next_attempt_at")
        if has_output:
            sr.output.CopyFrom(to_value(output))
        if status in FAILED_STEP:
            sr.error.CopyFrom(R.RunError(message=message, step_id=key, code=code))
        elif status == R.STEP_STATUS_SUCCEEDED and not self.dry:
            sr.ClearField("error")
        self.step_event(
            kind,
            key,
            sr,
            message=message,
            data=data,
            job_id=job_id or sr.job_id,
            result_ptr=result_ptr,
        )

    def set_output_path(self, cs: CompiledStep, value: JSON) -> None:
        if not cs.output_path:
            return
        node = self.context()
        for segment in cs.output_path[:-1]:
            nxt = node.get(segment)
            if not isinstance(nxt, dict):
                nxt = node[segment] = {}
            node = nxt
        node[cs.output_path[-1]] = value

    def schema(self, inline: dict[str, Any] | None, schema_id: str) -> dict[str, Any] | None:
        if inline is not None:
            return inline
        if schema_id:
            found = self.schemas.get(schema_id)
            if found is None:
                raise ExpressionError(f"schema {schema_id!r} is not registered")
            return found
        return None

    def cancel_job(self, job_id: str, reason: str) -> None:
        if job_id and not self.dry:
            self.plan.cancels.append((job_id, reason))

    def stop_attempt(self, sr: run_pb2.StepRun, reason: str) -> None:
        """Cancel what a RUNNING step attempt has in flight: its job or its child run."""
        if sr.status != R.STEP_STATUS_RUNNING or self.dry:
            return
        if sr.job_id:
            self.plan.cancels.append((sr.job_id, reason))
        if sr.child_run_id:
            self.plan.child_cancels.append((sr.child_run_id, reason))

    # -- failures -------------------------------------------------------------------------

    def step_failed(self, key: str) -> None:
        """A step reached FAILED/TIMED_OUT/CANCELLED for good: handle or end the run."""
        sid, _, rest = key.partition("[")
        sr = self.run.steps[key]
        if rest:  # a for_each child: its parent fails the same way, siblings stop
            parent = self.sr(sid)
            if parent.status in TERMINAL_STEP:
                return
            for child in parent.children:
                csr = self.run.steps.get(child)
                if csr is None or csr.status in TERMINAL_STEP:
                    continue
                self.stop_attempt(csr, f"sibling {key} failed")
                csr.status = R.STEP_STATUS_CANCELLED
                csr.completed_at.FromMilliseconds(self.now)
                csr.ClearField("next_attempt_at")
            self.finish_step(
                sid,
                sr.status,
                message=f"item {key}: {sr.error.message}",
                code=sr.error.code or "ITEM_FAILED",
            )
            key = sid
            sr = parent
        cs = self.wf.steps[key]
        if cs.on_error and sr.status in (R.STEP_STATUS_FAILED, R.STEP_STATUS_TIMED_OUT):
            self.step_event(
                "step_failure_handled",
                key,
                sr,
                message=f"handled by step {cs.on_error}",
                data={"handler": cs.on_error},
            )
            return
        self.end_run(
            _RUN_END[sr.status],
            f"step {key} {short_status(sr.status).lower()}: {sr.error.message}",
            key,
            sr.error.code or short_status(sr.status),
        )

    def end_run(self, status: int, message: str, step_id: str = "", code: str = "") -> None:
        run = self.run
        if run.status in TERMINAL_RUN:
            return
        for key, sr in run.steps.items():
            if sr.status in TERMINAL_STEP:
                continue
            self.stop_attempt(sr, message)
            sr.status = R.STEP_STATUS_CANCELLED
            sr.ClearField("next_attempt_at")
            if sr.HasField("started_at"):
                sr.completed_at.FromMilliseconds(self.now)
            if "[" not in key:  # children are summed up by their parent's event
                self.event(
                    "step_cancelled",
                    step_id=key,
                    status=R.StepStatus.Name(sr.status),
                    message=message,
                )
        self.set_run_status(status, message)
        if status != R.RUN_STATUS_SUCCEEDED:
            run.error.CopyFrom(R.RunError(message=message, step_id=step_id, code=code))

    def set_run_status(self, status: int, message: str = "") -> None:
        run = self.run
        if run.status == status:
            return
        run.status = status  # type: ignore[assignment]
        if status in TERMINAL_RUN:
            run.completed_at.FromMilliseconds(self.now)
        self.event("run_status", status=R.RunStatus.Name(status), message=message)

    # -- job outcomes ---------------------------------------------------------------------

    def apply(self, outcome: JobOutcome) -> None:
        ref = parse_job_id(outcome.job_id)
        if ref is None or ref.run_id != self.run.id or self.ended:
            return
        sr = self.run.steps.get(ref.key)
        if sr is None or sr.job_id != outcome.job_id or sr.status != R.STEP_STATUS_RUNNING:
            return  # stale (an older attempt), duplicate, or the step moved on
        cs = self.wf.steps.get(ref.step_id)
        if cs is None:
            return
        self.resolve(ref.key, cs, sr, outcome)

    def apply_child(self, child: ChildOutcome) -> None:
        if self.ended:
            return
        sr = self.run.steps.get(child.key)
        if sr is None or sr.child_run_id != child.child_run_id:
            return  # an older attempt's child
        if sr.status != R.STEP_STATUS_RUNNING:
            return
        cs = self.wf.steps.get(child.key.partition("[")[0])
        if cs is None:
            return
        self.resolve(child.key, cs, sr, child.outcome)

    def time_out_children(self) -> None:
        """Subworkflow attempts past their step's timeout_sec: cancel the child, TIMEOUT."""
        for key in sorted(self.run.steps):
            sr = self.run.steps[key]
            if sr.status != R.STEP_STATUS_RUNNING or not sr.child_run_id:
                continue
            cs = self.wf.steps.get(key.partition("[")[0])
            if cs is None or not cs.timeout_ms:
                continue
            if sr.started_at.ToMilliseconds() + cs.timeout_ms > self.now:
                continue
            why = f"step timeout ({cs.timeout_ms // 1000}s) exceeded"
            self.stop_attempt(sr, why)
            self.resolve(key, cs, sr, JobOutcome(job_id="", state="TIMEOUT", error_message=why))

    def resolve(self, key: str, cs: CompiledStep, sr: run_pb2.StepRun, outcome: JobOutcome) -> None:
        """A RUNNING attempt's outcome: success, a retry, or the step's end."""
        state = outcome.state
        if state == "APPROVAL_REQUIRED":
            self.step_event(
                "step_job_approval_required",
                key,
                sr,
                job_id=outcome.job_id,
                message=outcome.error_message or "the job waits for a human approval",
            )
            return
        if state == "SUCCEEDED":
            self._succeeded(key, cs, sr, outcome)
            return
        message = outcome.error_message or f"job {state.lower()}"
        if state in ("FAILED", "TIMEOUT") and sr.attempts <= cs.backoff.max_retries:
            delay = cs.backoff.delay_ms(sr.attempts, self.rand())
            sr.status = R.STEP_STATUS_PENDING
            sr.next_attempt_at.FromMilliseconds(self.now + delay)
            sr.error.CopyFrom(R.RunError(message=message, step_id=key, code=state))
            self.step_event(
                "step_retry_scheduled",
                key,
                sr,
                job_id=outcome.job_id,
                message=f"attempt {sr.attempts} {state.lower()}: {message}",
                data={"attempt": sr.attempts, "next_attempt": sr.attempts + 1, "delay_ms": delay},
            )
            return
        status = {
            "TIMEOUT": R.STEP_STATUS_TIMED_OUT,
            "CANCELLED": R.STEP_STATUS_CANCELLED,
        }.get(state, R.STEP_STATUS_FAILED)
        self.finish_step(
            key,
            status,
            message=message,
            code=outcome.error_code or state,
            job_id=outcome.job_id,
        )
        self.step_failed(key)

    def _succeeded(
        self, key: str, cs: CompiledStep, sr: run_pb2.StepRun, outcome: JobOutcome
    ) -> None:
        try:
            schema = self.schema(cs.output_schema, cs.output_schema_id)
        except ExpressionError as error:
            schema, problems = None, [FieldViolation("output", str(error))]
        else:
            problems = schema_violations(schema, outcome.output, "output") if schema else []
        if problems:
            sr.result_ptr = outcome.result_ptr
            self.finish_step(
                key,
                R.STEP_STATUS_FAILED,
                kind="step_output_invalid",
                message="; ".join(f"{p.field}: {p.description}" for p in problems),
                code="OUTPUT_INVALID",
                result_ptr=outcome.result_ptr,
            )
            self.step_failed(key)
            return
        inline = outcome.output_size <= MAX_INLINE_OUTPUT
        sr.result_ptr = outcome.result_ptr
        self.finish_step(
            key,
            R.STEP_STATUS_SUCCEEDED,
            output=outcome.output if inline else None,
            has_output=True,
            result_ptr=outcome.result_ptr,
            message="" if inline else f"output of {outcome.output_size} bytes not inlined",
        )
        if "[" not in key:
            self.set_output_path(cs, outcome.output if inline else outcome.result_ptr)

    # -- the scheduling walk --------------------------------------------------------------

    def walk(self) -> None:
        for sid in self.wf.order:
            if self.ended:
                return
            self.visit(self.wf.steps[sid])

    def visit(self, cs: CompiledStep) -> None:
        sr = self.sr(cs.id)
        if sr.status in TERMINAL_STEP:
            return
        if sr.status == R.STEP_STATUS_PENDING and not sr.HasField("next_attempt_at"):
            if not self.ready(cs, sr):
                return
            gated = sr.attempts == 0 and cs.kind != "condition" and cs.condition is not None
            if gated and not self.gate(cs, sr):
                return
        kind = cs.kind
        if kind in ("job", "subworkflow"):
            if cs.for_each is not None:
                self.fan_out(cs, sr)
            else:
                self.job_step(cs, cs.id, sr)
        elif kind == "condition":
            self.condition_step(cs, sr)
        elif kind == "delay":
            self.delay_step(cs, sr)
        elif kind == "notify":
            self.notify_step(cs, sr)
        elif kind == "approval":
            self.approval_step(cs, sr)

    def ready(self, cs: CompiledStep, sr: run_pb2.StepRun) -> bool:
        statuses = [self.status(d) for d in cs.depends_on]
        if any(s not in TERMINAL_STEP for s in statuses):
            return False
        if cs.depends_on and R.STEP_STATUS_SUCCEEDED not in statuses:
            self.skip(cs.id, "no dependency succeeded (skipped or failed branches)")
            return False
        if cs.is_handler:
            triggers = [self.status(t) for t in cs.triggers]
            if any(t in (R.STEP_STATUS_FAILED, R.STEP_STATUS_TIMED_OUT) for t in triggers):
                return True
            if all(t in TERMINAL_STEP for t in triggers):
                self.skip(cs.id, "no step it handles failed")
            return False
        return True

    def skip(
        self,
        key: str,
        message: str,
        *,
        output: JSON = None,
        has_output: bool = False,
        data: dict[str, JSON] | None = None,
    ) -> None:
        self.finish_step(
            key,
            R.STEP_STATUS_SKIPPED,
            kind="step_skipped",
            message=message,
            output=output,
            has_output=has_output,
            data=data,
        )

    def fail(self, key: str, kind: str, message: str, code: str) -> None:
        self.finish_step(key, R.STEP_STATUS_FAILED, kind=kind, message=message, code=code)
        self.step_failed(key)

    def dry_problem(self, sr: run_pb2.StepRun, key: str, message: str, code: str) -> None:
        sr.error.CopyFrom(R.RunError(message=message, step_id=key, code=code))

    def gate(self, cs: CompiledStep, sr: run_pb2.StepRun) -> bool:
        assert cs.condition is not None
        try:
            value = cs.condition.evaluate(self.scope())
            if not isinstance(value, bool):
                raise ExpressionError(f"the condition must be a bool, got {_type_name(value)}")
        except ExpressionError as error:
            if self.dry:
                self.dry_problem(sr, cs.id, f"condition: {error}", "CONDITION_ERROR")
                return True
            self.fail(cs.id, "step_condition_failed", f"condition: {error}", "CONDITION_ERROR")
            return False
        if not value:
            self.skip(cs.id, "condition is false", data={"condition": cs.condition.source})
        return value

    # -- job steps ------------------------------------------------------------------------

    def payload(self, cs: CompiledStep, key: str, scope: Scope) -> JSON:
        """The job input: the templated `input`, or the run input when there is none."""
        if cs.input is not None:
            value = cs.input.render(scope)
        elif cs.for_each is not None:
            value = {"item": scope.get("item"), "index": scope.get("index")}
        else:
            value = self.run_input()
        schema = self.schema(cs.input_schema, cs.input_schema_id)
        if schema is not None:
            problems = schema_violations(schema, value, "input")
            if problems:
                raise ExpressionError(
                    "input does not match its schema: "
                    + "; ".join(f"{p.field}: {p.description}" for p in problems)
                )
        size = len(json.dumps(value, separators=(",", ":")).encode())
        if size > MAX_INPUT_BYTES:
            raise ExpressionError(f"the input is {size} bytes; a worker accepts {MAX_INPUT_BYTES}")
        return value

    def job_step(
        self,
        cs: CompiledStep,
        key: str,
        sr: run_pb2.StepRun,
        *,
        index: int | None = None,
        item: JSON = None,
    ) -> bool:
        """Dispatch the next attempt if it is due; True when a job went out (or would have)."""
        if sr.status != R.STEP_STATUS_PENDING:
            return False
        if sr.HasField("next_attempt_at") and sr.next_attempt_at.ToMilliseconds() > self.now:
            return False
        scope = self.scope()
        if index is not None:
            scope = scope.with_values(item=item, index=index)
        try:
            value = self.payload(cs, key, scope)
        except ExpressionError as error:
            if self.dry:
                self.dry_problem(sr, key, str(error), "INPUT_INVALID")
                self.finish_step(
                    key,
                    R.STEP_STATUS_SUCCEEDED,
                    kind="step_dry_run",
                    message=f"not dispatched (dry run); {error}",
                )
                return True
            self.fail(key, "step_input_invalid", str(error), "INPUT_INVALID")
            return False
        sr.input.CopyFrom(to_value(value))
        if self.dry:
            self.finish_step(
                key,
                R.STEP_STATUS_SUCCEEDED,
                kind="step_dry_run",
                message="not dispatched (dry run)",
            )
            return True
        attempt = sr.attempts + 1
        if cs.kind == "subworkflow":
            return self.start_child(cs, key, sr, attempt, value, index)
        job_id = step_job_id(self.run.id, key, attempt)
        sr.attempts = attempt
        sr.job_id = job_id
        sr.status = R.STEP_STATUS_RUNNING
        sr.started_at.FromMilliseconds(self.now)
        sr.ClearField("next_attempt_at")
        sr.ClearField("completed_at")
        self.plan.dispatches.append(
            Dispatch(
                key=key,
                step=cs,
                job_id=job_id,
                attempt=attempt,
                payload=value,
                index=index,
                item=item,
            )
        )
        data: dict[str, JSON] = {"attempt": attempt}
        if index is not None:
            data["foreach_index"] = index
        self.step_event("step_dispatched", key, sr, job_id=job_id, data=data)
        return True

    def start_child(
        self,
        cs: CompiledStep,
        key: str,
        sr: run_pb2.StepRun,
        attempt: int,
        payload: JSON,
        index: int | None,
    ) -> bool:
        if self.run.depth + 1 > MAX_DEPTH:
            self.fail(
                key,
                "step_depth_exceeded",
                f"a child run would be nested {self.run.depth + 1} levels deep; "
                f"at most {MAX_DEPTH}",
                "DEPTH_EXCEEDED",
            )
            return False
        run_id = child_run_id(self.run.id, key, attempt)
        sr.attempts = attempt
        sr.child_run_id = run_id
        sr.status = R.STEP_STATUS_RUNNING
        sr.started_at.FromMilliseconds(self.now)
        sr.ClearField("next_attempt_at")
        sr.ClearField("completed_at")
        self.plan.children.append(
            ChildStart(key=key, step=cs, run_id=run_id, attempt=attempt, payload=payload)
        )
        data: dict[str, JSON] = {
            "attempt": attempt,
            "child_run_id": run_id,
            "workflow_id": cs.step.workflow_id,
        }
        if index is not None:
            data["foreach_index"] = index
        self.step_event("step_child_started", key, sr, data=data)
        return True

    def fan_out(self, cs: CompiledStep, parent: run_pb2.StepRun) -> None:
        assert cs.for_each is not None
        if parent.status == R.STEP_STATUS_PENDING:
            try:
                items = cs.for_each.evaluate(self.scope())
                if items is None:
                    items = []
                if not isinstance(items, list):
                    raise ExpressionError(f"for_each must return a list, got {_type_name(items)}")
                if len(items) > MAX_ITEMS:
                    raise ExpressionError(
                        f"for_each returned {len(items)} items; at most {MAX_ITEMS}"
                    )
            except ExpressionError as error:
                if self.dry:
                    self.dry_problem(parent, cs.id, f"for_each: {error}", "FOR_EACH_ERROR")
                    items = []
                else:
                    self.fail(cs.id, "step_for_each_failed", f"for_each: {error}", "FOR_EACH_ERROR")
                    return
            parent.status = R.STEP_STATUS_RUNNING
            parent.started_at.FromMilliseconds(self.now)
            del parent.children[:]
            for i, item in enumerate(items):
                key = f"{cs.id}[{i}]"
                parent.children.append(key)
                self.run.steps[key].CopyFrom(
                    R.StepRun(step_id=key, status=R.STEP_STATUS_PENDING, item=to_value(item))
                )
            self.step_event(
                "step_expanded",
                cs.id,
                parent,
                message=f"{len(items)} items",
                data={"items": len(items), "max_parallel": cs.step.max_parallel},
            )
        limit = cs.step.max_parallel or math.inf
        in_flight = sum(
            1 for c in parent.children if self.run.steps[c].status == R.STEP_STATUS_RUNNING
        )
        for i, key in enumerate(parent.children):
            if in_flight >= limit or self.ended or parent.status in TERMINAL_STEP:
                break
            csr = self.run.steps[key]
            if csr.status != R.STEP_STATUS_PENDING:
                continue
            item = from_value(csr.item) if csr.HasField("item") else None
            if self.job_step(cs, key, csr, index=i, item=item) and not self.dry:
                in_flight += 1
        if parent.status in TERMINAL_STEP or self.ended:
            return
        children = [self.run.steps[c] for c in parent.children]
        if all(c.status == R.STEP_STATUS_SUCCEEDED for c in children):
            outputs = [from_value(c.output) if c.HasField("output") else None for c in children]
            self.finish_step(
                cs.id,
                R.STEP_STATUS_SUCCEEDED,
                output=outputs,
                has_output=True,
                message=f"{len(children)} items",
            )
            self.set_output_path(cs, outputs)

    # -- built-in steps -------------------------------------------------------------------

    def condition_step(self, cs: CompiledStep, sr: run_pb2.StepRun) -> None:
        assert cs.condition is not None
        try:
            value = cs.condition.evaluate(self.scope())
            if not isinstance(value, bool):
                raise ExpressionError(f"the condition must be a bool, got {_type_name(value)}")
            schema = self.schema(cs.output_schema, cs.output_schema_id)
            if schema is not None:
                problems = schema_violations(schema, value, "output")
                if problems:
                    raise ExpressionError(
                        "; ".join(f"{p.field}: {p.description}" for p in problems)
                    )
        except ExpressionError as error:
            if self.dry:
                self.dry_problem(sr, cs.id, str(error), "CONDITION_ERROR")
                value = True
            else:
                self.fail(cs.id, "step_condition_failed", str(error), "CONDITION_ERROR")
                return
        data = {"value": value, "condition": cs.condition.source}
        if value:
            self.finish_step(
                cs.id,
                R.STEP_STATUS_SUCCEEDED,
                kind="step_condition_evaluated",
                output=True,
                has_output=True,
                data=data,
                message="true",
            )
            self.set_output_path(cs, True)
        else:
            self.skip(
                cs.id,
                "condition is false: its branch is skipped",
                output=False,
                has_output=True,
                data=data,
            )
            self.set_output_path(cs, False)

    def delay_step(self, cs: CompiledStep, sr: run_pb2.StepRun) -> None:
        if sr.status == R.STEP_STATUS_PENDING:
            delay = cs.delay_ms if cs.delay_ms else cs.delay_until_ms - self.now
            if self.dry or delay <= 0:
                self.finish_step(
                    cs.id,
                    R.STEP_STATUS_SUCCEEDED,
                    kind="step_delay_completed",
                    message="not waited (dry run)" if self.dry else "delay completed",
                    data={"delay_ms": max(delay, 0)},
                )
                return
            sr.status = R.STEP_STATUS_RUNNING
            sr.started_at.FromMilliseconds(self.now)
            sr.next_attempt_at.FromMilliseconds(self.now + delay)
            self.step_event(
                "step_delay_started", cs.id, sr, message="delay started", data={"delay_ms": delay}
            )
            return
        if sr.status == R.STEP_STATUS_RUNNING and sr.next_attempt_at.ToMilliseconds() <= self.now:
            self.finish_step(
                cs.id,
                R.STEP_STATUS_SUCCEEDED,
                kind="step_delay_completed",
                message="delay completed",
            )

    def notify_step(self, cs: CompiledStep, sr: run_pb2.StepRun) -> None:
        try:
            payload = cs.input.render(self.scope()) if cs.input is not None else {}
            if not isinstance(payload, dict):
                raise ExpressionError(f"notify input must be an object, got {_type_name(payload)}")
        except ExpressionError as error:
            if self.dry:
                self.dry_problem(sr, cs.id, str(error), "INPUT_INVALID")
                self.finish_step(
                    cs.id,
                    R.STEP_STATUS_SUCCEEDED,
                    kind="step_event_emitted",
                    message=f"not published (dry run); {error}",
                )
                return
            self.fail(cs.id, "step_event_failed", str(error), "INPUT_INVALID")
            return

        def field_text(name: str, default: str) -> str:
            value = payload.get(name)
            return value if isinstance(value, str) and value else default

        alert = alert_pb2.SystemAlert(
            level=field_text("level", "INFO").upper(),
            message=field_text("message", cs.step.name or cs.id),
            component=field_text("component", "workflow-engine"),
            # CAP refuses a legacy alert with an empty code.
            code=field_text("code", "workflow_notify"),
            trace_id=self.run.id,
            details={"run_id": self.run.id, "workflow_id": self.run.workflow_id, "step_id": cs.id},
        )
        sr.input.CopyFrom(to_value(payload))
        if not self.dry:
            self.plan.alerts.append(alert)
        self.finish_step(
            cs.id,
            R.STEP_STATUS_SUCCEEDED,
            kind="step_event_emitted",
            output=payload,
            has_output=True,
            data={"payload": payload},
            message=alert.message if not self.dry else f"not published (dry run): {alert.message}",
        )

    def approval_step(self, cs: CompiledStep, sr: run_pb2.StepRun) -> None:
        if sr.status == R.STEP_STATUS_PENDING:
            if self.dry:
                self.finish_step(
                    cs.id,
                    R.STEP_STATUS_SUCCEEDED,
                    kind="step_approved",
                    message="not requested (dry run)",
                )
                return
            sr.status = R.STEP_STATUS_WAITING
            sr.started_at.FromMilliseconds(self.now)
            self.step_event("step_waiting", cs.id, sr, message="approval requested")
            return
        if (
            sr.status == R.STEP_STATUS_WAITING
            and cs.timeout_ms
            and sr.started_at.ToMilliseconds() + cs.timeout_ms <= self.now
        ):
            self.finish_step(
                cs.id,
                R.STEP_STATUS_TIMED_OUT,
                kind="step_timed_out",
                message=f"no decision within {cs.timeout_ms // 1000}s",
                code="APPROVAL_TIMEOUT",
            )
            self.step_failed(cs.id)

    # -- the run --------------------------------------------------------------------------

    def settle(self) -> None:
        """The run status from its steps (fail-fast endings are already applied)."""
        if self.ended:
            return
        statuses = [self.status(s) for s in self.wf.order]
        if all(s in TERMINAL_STEP for s in statuses):
            output = {}
            for sid in self.wf.leaves():
                sr = self.run.steps[sid]
                if sr.status == R.STEP_STATUS_SUCCEEDED and sr.HasField("output"):
                    output[sid] = from_value(sr.output)
            self.run.output.CopyFrom(to_value(output))
            self.set_run_status(R.RUN_STATUS_SUCCEEDED)
        elif R.STEP_STATUS_WAITING in statuses:
            self.set_run_status(R.RUN_STATUS_WAITING)
        else:
            self.set_run_status(R.RUN_STATUS_RUNNING)

    def wake(self) -> int:
        if self.ended:
            return -1
        times: list[int] = []
        if self.wf.timeout_ms and self.run.HasField("started_at"):
            times.append(self.run.started_at.ToMilliseconds() + self.wf.timeout_ms)
        for key, sr in self.run.steps.items():
            if sr.HasField("next_attempt_at") and sr.status in (
                R.STEP_STATUS_PENDING,
                R.STEP_STATUS_RUNNING,
            ):
                times.append(sr.next_attempt_at.ToMilliseconds())
                continue
            if sr.status not in (R.STEP_STATUS_RUNNING, R.STEP_STATUS_WAITING):
                continue
            cs = self.wf.steps.get(key.partition("[")[0])
            if cs is None or not cs.timeout_ms or (cs.for_each and "[" not in key):
                continue
            times.append(sr.started_at.ToMilliseconds() + cs.timeout_ms)
        return min(times) if times else -1

    def finish(self) -> Plan:
        if self._context is not None:
            self.run.context.CopyFrom(to_struct(self._context))
        self.plan.wake_ms = self.wake()
        return self.plan


def advance(
    run: run_pb2.Run,
    wf: CompiledWorkflow,
    now_ms: int,
    outcomes: Iterable[JobOutcome] = (),
    *,
    schemas: Mapping[str, dict[str, Any] | None] | None = None,
    rand: Callable[[], float] = random.random,
    children: Iterable[ChildOutcome] = (),
) -> Plan:
    """One scheduling pass over `run` (modified in place and returned in the plan)."""
    p = _Pass(run, wf, now_ms, schemas or {}, rand)
    if p.ended:
        return p.finish()
    if run.status == R.RUN_STATUS_PENDING:
        run.started_at.FromMilliseconds(now_ms)
        p.set_run_status(R.RUN_STATUS_RUNNING)
    initial_steps(run, wf)
    for outcome in outcomes:
        p.apply(outcome)
    for child in children:
        p.apply_child(child)
    if not p.ended:
        p.time_out_children()
    if not p.ended and wf.timeout_ms and run.started_at.ToMilliseconds() + wf.timeout_ms <= now_ms:
        p.end_run(
            R.RUN_STATUS_TIMED_OUT,
            f"run timed out after {wf.timeout_ms // 1000}s",
            code="RUN_TIMEOUT",
        )
    p.walk()
    p.settle()
    return p.finish()


def cancel(run: run_pb2.Run, wf: CompiledWorkflow, now_ms: int, reason: str) -> Plan:
    """Cancel a run: in-flight jobs cancelled, unfinished steps CANCELLED, run CANCELLED."""
    p = _Pass(run, wf, now_ms, {}, random.random)
    p.end_run(R.RUN_STATUS_CANCELLED, reason, code="CANCELLED")
    return p.finish()


def decide_approval(
    run: run_pb2.Run,
    wf: CompiledWorkflow,
    now_ms: int,
    step_id: str,
    approved: bool,
    reason: str,
    by: str,
) -> Plan:
    """Resolve a WAITING approval step (the caller checked that it is waiting), then run a
    scheduling pass in the same update, so dependents go out at once."""
    p = _Pass(run, wf, now_ms, {}, random.random)
    data = {"by": by} if by else None
    if approved:
        p.finish_step(
            step_id,
            R.STEP_STATUS_SUCCEEDED,
            kind="step_approved",
            message=reason or "approved",
            output=True,
            has_output=True,
            data=data,
        )
    else:
        p.finish_step(
            step_id,
            R.STEP_STATUS_FAILED,
            kind="step_rejected",
            message=reason or "rejected",
            code="REJECTED",
            data=data,
        )
        p.step_failed(step_id)
    plan = p.finish()
    if not p.ended:
        plan.wake_ms = now_ms  # the engine's pass follows at once; this is its durable backup
    return plan


def _type_name(value: JSON) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__
