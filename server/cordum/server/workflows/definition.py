"""Workflow definitions: validation when saved, and the compiled form the engine runs.

A definition is checked as a whole and every problem is reported as a field violation
(`steps.fetch.depends_on[0]`), so a caller fixes everything in one round:
- ids: workflow `[A-Za-z0-9._-]{1,128}`; step ids (the map keys) `[A-Za-z0-9_-]{1,64}`,
  because `:`, `@` and `[` are the separators of step job ids `<run>:<step>[i]@<attempt>`;
- the graph: `depends_on` targets exist, no self or duplicate edges, no cycles (`on_error`
  edges included), `on_error` targets exist;
- step types: `job` (default when empty) and upstream's job-dispatching aliases `worker`,
  `llm`, `http`, `container`, `script`, `transform`, `storage`; `condition`, `delay`,
  `notify`, `approval`; `subworkflow` (alias `workflow`: runs the workflow `workflow_id`
  as a child run, see subworkflows.py). Anything else is refused (upstream dispatched
  unknown types as jobs);
- fields a step type would silently ignore are refused (a `topic` on an approval step...);
- every CEL expression (`condition`, `for_each`) and every `${...}` in `input` compiles, uses
  only the variables in scope (`item`/`index` only in a for_each step's input), and reads
  only `steps.<id>` that run before it (its ancestors), since any other step's output is not
  there yet when it is evaluated;
- schemas: inline ones are valid draft 2020-12; `*_schema_id`s exist in the registry.

Upstream fields it never used: workflow `timeout_sec` is the run timeout; step `on_error`
names a step to run when this one fails (after its retries): the failure is then handled,
the run does not fail for it and continues from the handler. `config` and `parameters` are
stored and returned, documented as not interpreted (as the proto says).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from redis.asyncio import Redis

from cordum.server.errors import FieldViolation
from cordum.server.jsonvalue import from_struct
from cordum.server.services.job_validation import (
    LABEL_KEY_RE,
    MAX_LABELS,
    TENANT_RE,
    TOPIC_RE,
    parse_actor_type,
)
from cordum.server.workflows.expressions import (
    BASE_VARIABLES,
    ITEM_VARIABLES,
    Expression,
    Template,
    compile_expression,
    compile_template,
)
from cordum.v1 import workflow_pb2

logger = logging.getLogger(__name__)

WORKFLOW_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
STEP_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
SCHEMA_ID_RE = re.compile(r"^[A-Za-z0-9._:/@-]{1,200}$")
OUTPUT_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

JOB_TYPES = frozenset(
    {"job", "worker", "llm", "http", "container", "script", "transform", "storage"}
)
SPECIAL_TYPES = frozenset({"condition", "delay", "notify", "approval"})
# Upstream's declared (never implemented) `subworkflow`, and the shorter `workflow`.
SUBWORKFLOW_TYPES = frozenset({"subworkflow", "workflow"})
KNOWN_TYPES = JOB_TYPES | SPECIAL_TYPES | SUBWORKFLOW_TYPES
RESERVED_LABELS = frozenset({"workflow_id", "run_id", "step_id"})

MAX_STEPS = 500
MAX_DEPENDS = 100
MAX_RETRIES = 100
MAX_TIMEOUT_S = 30 * 24 * 3600
MAX_DELAY_S = 365 * 24 * 3600
MAX_PARALLEL = 10_000
DEFAULT_JITTER = 0.1


# -- schemas ----------------------------------------------------------------------------


class SchemaLookup(Protocol):
    """Where `input_schema_id` / `output_schema_id` are resolved. The schema registry plugs
    in here; until then `RedisSchemaLookup` reads `<prefix>schema:<id>`."""

    async def get_schema(self, schema_id: str) -> dict[str, Any] | None:
        """The JSON Schema registered under `schema_id`, or None if there is none."""
        ...


class RedisSchemaLookup:
    """Schemas stored as JSON at `<prefix>schema:<id>`: the schema itself, or a registry
    document holding it under `schema`. Cached briefly: steps look schemas up per job."""

    def __init__(self, redis: Redis, prefix: str = "", *, cache_s: float = 5.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def get_schema(self, schema_id: str) -> dict[str, Any] | None:
        hit = self._cache.get(schema_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._cache_s:
            return hit[1]
        raw = await self._redis.get(f"{self._prefix}schema:{schema_id}")
        schema: dict[str, Any] | None = None
        if raw is not None:
            try:
                doc = json.loads(raw)
            except ValueError:
                logger.warning("schema %s is not JSON", schema_id)
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("schema"), dict):
                doc = doc["schema"]
            schema = doc if isinstance(doc, dict) else None
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[schema_id] = (now, schema)
        return schema


def schema_problem(schema: Mapping[str, Any]) -> str:
    """Why `schema` is not a valid draft 2020-12 schema ('' when it is)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        where = error.json_path if error.json_path != "$" else ""
        return f"not a valid JSON Schema (draft 2020-12): {error.message}" + (
            f" at {where}" if where else ""
        )
    return ""


_VALIDATORS: dict[str, Draft202012Validator] = {}


def validator_for(schema: Mapping[str, Any]) -> Draft202012Validator:
    key = json.dumps(schema, sort_keys=True)
    found = _VALIDATORS.get(key)
    if found is None:
        if len(_VALIDATORS) > 512:
            _VALIDATORS.clear()
        found = _VALIDATORS[key] = Draft202012Validator(schema)
    return found


def schema_violations(schema: Mapping[str, Any], value: Any, where: str) -> list[FieldViolation]:
    """Every place `value` breaks `schema`, as violations named `where.<path>`."""
    out = []
    for error in sorted(validator_for(schema).iter_errors(value), key=lambda e: e.json_path):
        path = error.json_path.removeprefix("$")
        out.append(FieldViolation(f"{where}{path}", error.message))
    return out


# -- the compiled form ---------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Retries with exponential backoff and jitter; multiplier 1 is a constant backoff."""

    max_retries: int = 0
    initial_s: float = 1.0
    max_s: float = 0.0
    multiplier: float = 2.0
    jitter: float = DEFAULT_JITTER

    def base_ms(self, attempt: int) -> float:
        """The delay before retry number `attempt` (1 = after the first failure), unjittered."""
        delay = self.initial_s * self.multiplier ** max(attempt - 1, 0)
        if self.max_s > 0:
            delay = min(delay, self.max_s)
        return delay * 1000

    def delay_ms(self, attempt: int, unit_random: float) -> int:
        base = self.base_ms(attempt)
        return max(0, round(base * (1 + self.jitter * (2 * unit_random - 1))))


@dataclass
class CompiledStep:
    id: str
    step: workflow_pb2.Step
    kind: str  # job | condition | delay | notify | approval | subworkflow
    depends_on: tuple[str, ...]
    condition: Expression | None = None
    for_each: Expression | None = None
    input: Template | None = None
    input_schema: dict[str, Any] | None = None
    input_schema_id: str = ""
    output_schema: dict[str, Any] | None = None
    output_schema_id: str = ""
    output_path: tuple[str, ...] = ()
    backoff: Backoff = field(default_factory=Backoff)
    timeout_ms: int = 0
    delay_ms: int = 0
    delay_until_ms: int = 0
    on_error: str = ""
    # Steps whose on_error names this one: it runs only when one of them fails.
    triggers: tuple[str, ...] = ()
    dependents: tuple[str, ...] = ()

    @property
    def is_handler(self) -> bool:
        return bool(self.triggers)


@dataclass
class CompiledWorkflow:
    workflow: workflow_pb2.Workflow
    steps: dict[str, CompiledStep]
    # Topological order (depends_on and on_error edges), ties by id: the scheduling order.
    order: list[str]
    input_schema: dict[str, Any] | None
    timeout_ms: int

    @property
    def key(self) -> str:
        return definition_key(self.workflow)

    @functools.cached_property
    def has_subworkflows(self) -> bool:
        return any(cs.kind == "subworkflow" for cs in self.steps.values())

    def leaves(self) -> list[str]:
        return [s for s in self.order if not self.steps[s].dependents]


def definition_key(wf: workflow_pb2.Workflow) -> str:
    """`<id>@<revision>#<content hash>`: names one definition for good (a workflow deleted
    and created again starts at revision 1 again, with other steps)."""
    digest = hashlib.sha256(wf.SerializeToString(deterministic=True)).hexdigest()[:16]
    return f"{wf.id}@{wf.revision}#{digest}"


def step_kind(step_type: str) -> str:
    t = step_type.strip().lower()
    if t in ("", *JOB_TYPES):
        return "job"
    if t in SUBWORKFLOW_TYPES:
        return "subworkflow"
    return t


class _Checker:
    def __init__(self) -> None:
        self.problems: list[FieldViolation] = []

    def add(self, name: str, description: str) -> None:
        self.problems.append(FieldViolation(name, description))


def compile_workflow(wf: workflow_pb2.Workflow) -> tuple[CompiledWorkflow, list[FieldViolation]]:
    """Compile and check a definition (everything but registry lookups). The compiled form is
    only meaningful when the violation list is empty."""
    v = _Checker()
    if not WORKFLOW_ID_RE.match(wf.id):
        v.add("id", "1-128 characters from [A-Za-z0-9._-]")
    if wf.org_id and not TENANT_RE.match(wf.org_id):
        v.add("org_id", "1-100 characters from [A-Za-z0-9._-]")
    for name in ("team_id", "name", "version", "created_by"):
        if len(getattr(wf, name)) > 200:
            v.add(name, "at most 200 characters")
    if len(wf.description) > 10_000:
        v.add("description", "at most 10000 characters")
    if wf.timeout_sec < 0 or wf.timeout_sec > MAX_TIMEOUT_S:
        v.add("timeout_sec", f"must be between 0 and {MAX_TIMEOUT_S}")
    input_schema = None
    if wf.HasField("input_schema"):
        input_schema = from_struct(wf.input_schema)
        problem = schema_problem(input_schema)
        if problem:
            v.add("input_schema", problem)
    if not wf.steps:
        v.add("steps", "a workflow needs at least one step")
    if len(wf.steps) > MAX_STEPS:
        v.add("steps", f"at most {MAX_STEPS} steps")

    steps: dict[str, CompiledStep] = {}
    for sid in sorted(wf.steps):
        step = wf.steps[sid]
        where = f"steps.{sid}"
        if not STEP_ID_RE.match(sid):
            v.add(
                where,
                "step ids are 1-64 characters from [A-Za-z0-9_-] (`:`, `@`, `[` would "
                "break job-id routing)",
            )
        if step.id and step.id != sid:
            v.add(f"{where}.id", f"must be empty or equal the map key {sid!r}")
        steps[sid] = _compile_step(sid, step, where, v)

    default_topic = f"job.workflow.{wf.id}"
    if not TOPIC_RE.match(default_topic) or len(default_topic) > 200:
        for sid, cs in steps.items():
            if cs.kind == "job" and not cs.step.topic:
                v.add(
                    f"steps.{sid}.topic",
                    f"required: the default {default_topic!r} is not a valid topic",
                )
    known = set(steps)
    for sid, cs in steps.items():
        where = f"steps.{sid}"
        seen: set[str] = set()
        for i, dep in enumerate(cs.depends_on):
            if dep == sid:
                v.add(f"{where}.depends_on[{i}]", "a step cannot depend on itself")
            elif dep not in known:
                v.add(f"{where}.depends_on[{i}]", f"no step {dep!r} in this workflow")
            elif dep in seen:
                v.add(f"{where}.depends_on[{i}]", f"{dep!r} is listed twice")
            seen.add(dep)
        if cs.on_error:
            if cs.on_error == sid:
                v.add(f"{where}.on_error", "a step cannot be its own error handler")
            elif cs.on_error not in known:
                v.add(f"{where}.on_error", f"no step {cs.on_error!r} in this workflow")

    edges = _edges(steps, known)
    order, cycles = _toposort(known, edges)
    for cycle in cycles:
        v.add(f"steps.{cycle[0]}.depends_on", "cycle: " + " → ".join([*cycle, cycle[0]]))

    dependents: dict[str, list[str]] = {s: [] for s in known}
    triggers: dict[str, list[str]] = {s: [] for s in known}
    for sid, cs in steps.items():
        for dep in cs.depends_on:
            if dep in dependents and dep != sid:
                dependents[dep].append(sid)
        if cs.on_error in triggers and cs.on_error != sid:
            triggers[cs.on_error].append(sid)
    for sid, cs in steps.items():
        cs.dependents = tuple(sorted(set(dependents[sid])))
        cs.triggers = tuple(sorted(triggers[sid]))

    if not cycles:
        ancestors = _ancestors(order, edges)
        for sid, cs in steps.items():
            _check_refs(sid, cs, ancestors[sid], known, v)
    _check_output_paths(steps, v)

    compiled = CompiledWorkflow(
        workflow=wf,
        steps=steps,
        order=order if not cycles else sorted(known),
        input_schema=input_schema,
        timeout_ms=int(wf.timeout_sec) * 1000,
    )
    return compiled, v.problems


def _compile_step(sid: str, step: workflow_pb2.Step, where: str, v: _Checker) -> CompiledStep:
    kind = step_kind(step.type)
    if kind not in KNOWN_TYPES and kind not in ("job", "subworkflow"):
        v.add(
            f"{where}.type",
            f"unknown step type {step.type!r}; one of job, {', '.join(sorted(JOB_TYPES - {'job'}))}"
            f", {', '.join(sorted(SPECIAL_TYPES))}, subworkflow",
        )
    if len(step.name) > 200:
        v.add(f"{where}.name", "at most 200 characters")
    if len(step.depends_on) > MAX_DEPENDS:
        v.add(f"{where}.depends_on", f"at most {MAX_DEPENDS} entries")
    cs = CompiledStep(id=sid, step=step, kind=kind, depends_on=tuple(step.depends_on))

    def refuse(field_name: str, why: str) -> None:
        v.add(f"{where}.{field_name}", why)

    is_job = kind == "job"
    # What a subworkflow step shares with job steps: its input, fan-out, retries, schemas.
    shared = {"for_each", "max_parallel", "retry", "input_schema", "input_schema_id"}
    # Fields that only some types use: refuse them elsewhere instead of ignoring them.
    job_only = {
        "topic": bool(step.topic),
        "worker_id": bool(step.worker_id),
        "for_each": bool(step.for_each),
        "max_parallel": step.max_parallel != 0,
        "retry": step.HasField("retry"),
        "input_schema": step.HasField("input_schema"),
        "input_schema_id": bool(step.input_schema_id),
        "route_labels": bool(step.route_labels),
        "meta": step.HasField("meta"),
    }
    if not is_job:
        for name, present in job_only.items():
            if present and not (kind == "subworkflow" and name in shared):
                refuse(name, f"not used by {kind} steps (only job steps)")
    if kind not in ("job", "notify", "subworkflow") and step.HasField("input"):
        refuse("input", f"not used by {kind} steps (only job, notify and subworkflow steps)")
    if kind not in ("job", "condition", "subworkflow") and (
        step.HasField("output_schema") or step.output_schema_id
    ):
        refuse("output_schema", f"not used by {kind} steps")
    if kind != "delay":
        if step.delay_sec:
            refuse("delay_sec", "only delay steps wait")
        if step.delay_until:
            refuse("delay_until", "only delay steps wait")
    if kind not in ("job", "approval", "subworkflow") and step.timeout_sec:
        refuse("timeout_sec", f"not used by {kind} steps (job, approval, subworkflow only)")
    if kind == "subworkflow":
        if not step.workflow_id:
            refuse("workflow_id", "a subworkflow step names the workflow it runs")
        elif not WORKFLOW_ID_RE.match(step.workflow_id):
            refuse("workflow_id", "1-128 characters from [A-Za-z0-9._-]")
    elif step.workflow_id:
        refuse("workflow_id", "only subworkflow steps name a workflow")

    base_vars = BASE_VARIABLES
    if step.condition.strip():
        try:
            cs.condition = compile_expression(step.condition, base_vars)
        except ValueError as error:
            refuse("condition", str(error))
    elif kind == "condition":
        refuse("condition", "a condition step needs a CEL expression")
    if step.for_each.strip():
        try:
            cs.for_each = compile_expression(step.for_each, base_vars)
        except ValueError as error:
            refuse("for_each", str(error))
    if step.max_parallel < 0 or step.max_parallel > MAX_PARALLEL:
        refuse("max_parallel", f"must be between 0 and {MAX_PARALLEL}")
    elif step.max_parallel and not step.for_each:
        refuse("max_parallel", "only meaningful with for_each")
    if step.HasField("input"):
        allowed = base_vars | (ITEM_VARIABLES if step.for_each else frozenset())
        template, problems = compile_template(from_struct(step.input), allowed)
        for path, why in problems:
            v.add(f"{where}.input.{path}" if path else f"{where}.input", why)
        cs.input = template
    if step.topic and (not TOPIC_RE.match(step.topic) or len(step.topic) > 200):
        refuse("topic", "must look like `job.<name>[.<name>...]` (letters, digits, `_`, `-`)")
    if step.worker_id and not WORKER_ID_RE.match(step.worker_id):
        refuse("worker_id", "1-200 characters from [A-Za-z0-9._:-]")
    # Route labels and meta labels become job labels: the job's limit applies here already,
    # or the run would only fail when the step dispatches.
    if len(step.route_labels) > MAX_LABELS:
        refuse("route_labels", f"at most {MAX_LABELS} entries")
    if step.HasField("meta") and len(step.meta.labels) > MAX_LABELS:
        refuse("meta.labels", f"at most {MAX_LABELS} entries")
    for key, value in step.route_labels.items():
        if not LABEL_KEY_RE.match(key):
            refuse(f"route_labels[{key}]", "key: 1-100 characters from [A-Za-z0-9._/-]")
        elif key in RESERVED_LABELS or key.startswith("cordum."):
            refuse(f"route_labels[{key}]", "reserved: the engine sets it")
        if len(value) > 1000:
            refuse(f"route_labels[{key}]", "value: at most 1000 characters")
    if step.HasField("meta"):
        if parse_actor_type(step.meta.actor_type) is None:
            refuse("meta.actor_type", "must be human or service")
        for key in step.meta.labels:
            if not LABEL_KEY_RE.match(key):
                refuse(f"meta.labels[{key}]", "key: 1-100 characters from [A-Za-z0-9._/-]")

    for name in ("input_schema", "output_schema"):
        if step.HasField(name):
            schema = from_struct(getattr(step, name))
            problem = schema_problem(schema)
            if problem:
                refuse(name, problem)
            else:
                setattr(cs, name, schema)
            if getattr(step, f"{name}_id"):
                refuse(f"{name}_id", f"set {name} or {name}_id, not both")
        schema_id = getattr(step, f"{name}_id")
        if schema_id:
            if not SCHEMA_ID_RE.match(schema_id):
                refuse(f"{name}_id", "1-200 characters from [A-Za-z0-9._:/@-]")
            setattr(cs, f"{name}_id", schema_id)

    if step.output_path:
        segments = tuple(step.output_path.split("."))
        if len(segments) > 10 or not all(OUTPUT_SEGMENT_RE.match(s) for s in segments):
            refuse("output_path", "a dotted path of at most 10 names from [A-Za-z0-9_-]")
        elif segments[0] == "steps":
            refuse("output_path", "`steps` is reserved for step outputs")
        else:
            cs.output_path = segments
    if step.HasField("retry"):
        cs.backoff = _backoff(step.retry, f"{where}.retry", v)
    if step.timeout_sec < 0 or step.timeout_sec > MAX_TIMEOUT_S:
        refuse("timeout_sec", f"must be between 0 and {MAX_TIMEOUT_S}")
    else:
        cs.timeout_ms = int(step.timeout_sec) * 1000
    if kind == "delay":
        if step.delay_sec < 0 or step.delay_sec > MAX_DELAY_S:
            refuse("delay_sec", f"must be between 0 and {MAX_DELAY_S}")
        if step.delay_sec and step.delay_until:
            refuse("delay_until", "set delay_sec or delay_until, not both")
        if step.delay_until:
            try:
                when = dt.datetime.fromisoformat(step.delay_until.strip().replace("Z", "+00:00"))
                if when.tzinfo is None:
                    raise ValueError("no time zone")
                cs.delay_until_ms = int(when.timestamp() * 1000)
            except ValueError:
                refuse("delay_until", "an RFC 3339 time with a zone, e.g. 2030-01-01T00:00:00Z")
        elif step.delay_sec == 0:
            refuse("delay_sec", "a delay step needs delay_sec (> 0) or delay_until")
        cs.delay_ms = int(step.delay_sec) * 1000
    cs.on_error = step.on_error
    return cs


def _backoff(retry: workflow_pb2.RetryPolicy, where: str, v: _Checker) -> Backoff:
    ok = True
    if retry.max_retries < 0 or retry.max_retries > MAX_RETRIES:
        v.add(f"{where}.max_retries", f"must be between 0 and {MAX_RETRIES}")
        ok = False
    if retry.initial_backoff_sec < 0 or retry.initial_backoff_sec > MAX_TIMEOUT_S:
        v.add(f"{where}.initial_backoff_sec", "must be between 0 and 30 days")
        ok = False
    if retry.max_backoff_sec < 0 or retry.max_backoff_sec > MAX_TIMEOUT_S:
        v.add(f"{where}.max_backoff_sec", "must be between 0 and 30 days (0 = no cap)")
        ok = False
    if retry.multiplier != 0 and not 1 <= retry.multiplier <= 100:
        v.add(f"{where}.multiplier", "must be between 1 (constant backoff) and 100 (0 = 2)")
        ok = False
    if not 0 <= retry.jitter <= 1:
        v.add(f"{where}.jitter", "a fraction between 0 and 1 (0 = the default 0.1)")
        ok = False
    if not ok:
        return Backoff()
    return Backoff(
        max_retries=retry.max_retries,
        initial_s=retry.initial_backoff_sec or 1.0,
        max_s=retry.max_backoff_sec,
        multiplier=retry.multiplier or 2.0,
        jitter=retry.jitter or DEFAULT_JITTER,
    )


def _edges(steps: Mapping[str, CompiledStep], known: set[str]) -> dict[str, set[str]]:
    """step → the steps that must finish first (its depends_on, and the steps it handles)."""
    edges: dict[str, set[str]] = {s: set() for s in known}
    for sid, cs in steps.items():
        edges[sid] |= {d for d in cs.depends_on if d in known and d != sid}
        if cs.on_error in known and cs.on_error != sid:
            edges[cs.on_error].add(sid)
    return edges


def _toposort(known: set[str], edges: Mapping[str, set[str]]) -> tuple[list[str], list[list[str]]]:
    """Kahn's algorithm (ties by id); the cycles found, each once, when there are any."""
    remaining = {s: set(edges[s]) for s in known}
    order: list[str] = []
    ready = sorted(s for s, deps in remaining.items() if not deps)
    while ready:
        sid = ready.pop(0)
        order.append(sid)
        del remaining[sid]
        released = []
        for other, deps in remaining.items():
            if sid in deps:
                deps.discard(sid)
                if not deps:
                    released.append(other)
        ready = sorted([*ready, *released])
    if not remaining:
        return order, []
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(remaining):
        cycle = _find_cycle(start, remaining)
        if cycle and frozenset(cycle) not in seen:
            seen.add(frozenset(cycle))
            rotation = cycle.index(min(cycle))
            cycles.append(cycle[rotation:] + cycle[:rotation])
    return order, cycles


def _find_cycle(start: str, edges: Mapping[str, set[str]]) -> list[str]:
    path: list[str] = []
    on_path: set[str] = set()
    done: set[str] = set()

    def visit(node: str) -> list[str]:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt) :]
            if nxt not in done and nxt in edges:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return []

    return visit(start)


def _ancestors(order: list[str], edges: Mapping[str, set[str]]) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for sid in order:
        acc: set[str] = set()
        for dep in edges[sid]:
            acc.add(dep)
            acc |= result.get(dep, set())
        result[sid] = acc
    return result


def _check_refs(
    sid: str, cs: CompiledStep, ancestors: set[str], known: set[str], v: _Checker
) -> None:
    where = f"steps.{sid}"
    sources: list[tuple[str, frozenset[str] | None]] = []
    if cs.condition is not None:
        sources.append(("condition", cs.condition.step_refs))
    if cs.for_each is not None:
        sources.append(("for_each", cs.for_each.step_refs))
    if cs.input is not None:
        sources.append(("input", cs.input.step_refs()))
    for name, refs in sources:
        for ref in sorted(refs or ()):
            if ref not in known:
                v.add(f"{where}.{name}", f"reads steps.{ref}, but there is no step {ref!r}")
            elif ref == sid:
                v.add(f"{where}.{name}", "a step cannot read its own output")
            elif ref not in ancestors:
                v.add(
                    f"{where}.{name}",
                    f"reads steps.{ref}, which does not run before it: add {ref!r} to depends_on",
                )


def _check_output_paths(steps: Mapping[str, CompiledStep], v: _Checker) -> None:
    owners: dict[tuple[str, ...], str] = {}
    for sid in sorted(steps):
        path = steps[sid].output_path
        if not path:
            continue
        for other, owner in owners.items():
            shorter, longer = sorted((path, other), key=len)
            if longer[: len(shorter)] == shorter:
                v.add(
                    f"steps.{sid}.output_path",
                    f"overlaps the output_path of step {owner!r} ({'.'.join(other)})",
                )
                break
        owners[path] = sid


async def validate_workflow(
    wf: workflow_pb2.Workflow, schemas: SchemaLookup | None
) -> tuple[CompiledWorkflow, list[FieldViolation]]:
    """compile_workflow plus the registry lookups of every `*_schema_id`."""
    compiled, problems = compile_workflow(wf)
    for sid in sorted(compiled.steps):
        cs = compiled.steps[sid]
        for name in ("input_schema_id", "output_schema_id"):
            schema_id = getattr(cs, name)
            if not schema_id:
                continue
            where = f"steps.{sid}.{name}"
            if schemas is None:
                problems.append(FieldViolation(where, "no schema registry is configured"))
                continue
            schema = await schemas.get_schema(schema_id)
            if schema is None:
                problems.append(FieldViolation(where, f"no schema {schema_id!r} is registered"))
                continue
            problem = schema_problem(schema)
            if problem:
                problems.append(FieldViolation(where, f"schema {schema_id!r} is {problem}"))
    return compiled, problems


def topo_ids(ids: Iterable[str], compiled: CompiledWorkflow) -> list[str]:
    wanted = set(ids)
    return [s for s in compiled.order if s in wanted]
