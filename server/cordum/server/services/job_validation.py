"""Turning a SubmitJobRequest into a stored job: every field validated (all problems reported
at once, each naming its field), defaults filled, the CAP JobRequest built."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from google.protobuf import json_format

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.server.errors import Violations, invalid_field
from cordum.server.services.caller import Caller
from cordum.server.stores.jobs import NewJob, ms_timestamp
from cordum.v1 import job_pb2, job_service_pb2

ID_RE = re.compile(r"^[A-Za-z0-9._:@\[\]-]{1,200}$")
TENANT_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
TOPIC_RE = re.compile(r"^job\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9._/-]{1,100}$")
# Memory ids name Redis keys (`mem:<id>:...`): ids plus `/`.
MEMORY_ID_RE = re.compile(r"^[A-Za-z0-9._:@/\[\]-]{1,200}$")

MAX_PROMPT_BYTES = 100_000
# A CAP 2.17 worker refuses a context over 2 MiB.
MAX_CONTEXT_BYTES = 2 * 1024 * 1024
MAX_LABELS = 50
MAX_TAGS = 50
MAX_LABEL_VALUE = 1000
MAX_TOKENS = 10_000_000_000
MAX_RETRIES = 100

_PRIORITIES = {
    "": agent.JOB_PRIORITY_INTERACTIVE,
    "interactive": agent.JOB_PRIORITY_INTERACTIVE,
    "batch": agent.JOB_PRIORITY_BATCH,
    "critical": agent.JOB_PRIORITY_CRITICAL,
}
_ACTOR_TYPES = {
    "": agent.ACTOR_TYPE_UNSPECIFIED,
    "human": agent.ACTOR_TYPE_HUMAN,
    "service": agent.ACTOR_TYPE_SERVICE,
}


def parse_priority(value: str) -> int | None:
    key = value.strip().lower().removeprefix("job_priority_")
    return _PRIORITIES.get(key)


def parse_actor_type(value: str) -> int | None:
    key = value.strip().lower().removeprefix("actor_type_")
    return _ACTOR_TYPES.get(key)


def check_id(value: str, field_name: str, pattern: re.Pattern[str] = ID_RE) -> str:
    """An id a request addresses: required, and from the id character set (else a clear
    INVALID_ARGUMENT naming the field, not a NOT_FOUND for something unaddressable)."""
    if not value:
        raise invalid_field(field_name, "required")
    if not pattern.match(value):
        allowed = pattern.pattern.removeprefix("^").removesuffix("$")
        raise invalid_field(field_name, f"must match {allowed}")
    return value


def check_tenant_filter(value: str, field_name: str) -> None:
    if value and not TENANT_RE.match(value):
        raise invalid_field(field_name, "1-100 characters from [A-Za-z0-9._-]")


@dataclass(frozen=True)
class BuiltJob:
    new: NewJob
    idempotency_key: str


def _check_strings(v: Violations, name: str, values: list[str], limit: int) -> None:
    if len(values) > limit:
        v.add(name, f"at most {limit} entries")
    for i, item in enumerate(values):
        if not item.strip() or len(item) > 200:
            v.add(f"{name}[{i}]", "must be 1-200 characters")


def build_job(
    req: job_service_pb2.SubmitJobRequest,
    caller: Caller,
    *,
    now_ms: int,
    idempotency_header: str = "",
    default_retries: int = 0,
    reserved_labels_ok: bool = False,
) -> BuiltJob:
    # Naming another tenant is refused outright (PERMISSION_DENIED), not listed as a problem.
    caller.check_tenant(req.org_id.strip(), "org_id")
    caller.check_tenant(req.tenant_id.strip(), "tenant_id")
    v = Violations()
    has_input = req.HasField("input")
    prompt_size = len(req.prompt.encode())
    if not req.prompt.strip() and not has_input:
        v.add("prompt", "required (or give `input`)")
    if prompt_size > MAX_PROMPT_BYTES:
        v.add("prompt", f"at most {MAX_PROMPT_BYTES} bytes (got {prompt_size})")
    # Required: a job sent to a default topic nobody serves would only time out.
    topic = req.topic.strip()
    if not topic:
        v.add("topic", "required")
    elif not TOPIC_RE.match(topic) or len(topic) > 200:
        v.add("topic", "must look like `job.<name>[.<name>...]` (letters, digits, `_`, `-`)")
    job_id = req.job_id.strip() or str(uuid.uuid4())
    if not ID_RE.match(job_id):
        v.add("job_id", "1-200 characters from [A-Za-z0-9._:@[]-]")
    trace_id = req.trace_id.strip() or uuid.uuid4().hex
    if not ID_RE.match(trace_id):
        v.add("trace_id", "1-200 characters from [A-Za-z0-9._:@[]-]")
    priority = parse_priority(req.priority)
    if priority is None:
        v.add("priority", "must be interactive, batch or critical")
    actor_type = parse_actor_type(req.actor_type)
    if actor_type is None:
        v.add("actor_type", "must be human or service")
    requested_tenant = req.org_id.strip() or req.tenant_id.strip()
    tenant = caller.tenant_for(requested_tenant)
    if not TENANT_RE.match(tenant):
        v.add(
            "org_id" if req.org_id.strip() else "tenant_id", "1-100 characters from [A-Za-z0-9._-]"
        )
    if req.memory_id and not MEMORY_ID_RE.match(req.memory_id):
        v.add("memory_id", "1-200 characters from [A-Za-z0-9._:@/[]-]")
    if len(req.labels) > MAX_LABELS:
        v.add("labels", f"at most {MAX_LABELS} entries")
    for key, value in req.labels.items():
        if not LABEL_KEY_RE.match(key):
            v.add(f"labels[{key}]", "key: 1-100 characters from [A-Za-z0-9._/-]")
        elif key.startswith("cordum.") and not reserved_labels_ok:
            v.add(f"labels[{key}]", "keys starting with `cordum.` are reserved")
        if len(value) > MAX_LABEL_VALUE:
            v.add(f"labels[{key}]", f"value: at most {MAX_LABEL_VALUE} characters")
    _check_strings(v, "tags", list(req.tags), MAX_TAGS)
    _check_strings(v, "risk_tags", list(req.risk_tags), MAX_TAGS)
    _check_strings(v, "requires", list(req.requires), MAX_TAGS)
    for name in ("max_input_tokens", "max_output_tokens", "max_total_tokens"):
        value = getattr(req, name)
        if value < 0 or value > MAX_TOKENS:
            v.add(name, f"must be between 0 and {MAX_TOKENS}")
    if req.deadline_ms < 0:
        v.add("deadline_ms", "must not be negative")
    if req.max_retries < 0 or req.max_retries > MAX_RETRIES:
        v.add("max_retries", f"must be between 0 and {MAX_RETRIES}")
    idem = req.idempotency_key.strip() or idempotency_header.strip()
    if len(idem) > 200:
        v.add("idempotency_key", "at most 200 characters")
    for name in (
        "adapter_id",
        "memory_id",
        "principal_id",
        "actor_id",
        "pack_id",
        "capability",
        "team_id",
        "project_id",
        "context_mode",
    ):
        if len(getattr(req, name)) > 200:
            v.add(name, "at most 200 characters")
    ctx = _context_document(req, topic, tenant, now_ms, has_input)
    if len(ctx) > MAX_CONTEXT_BYTES:
        v.add(
            "input" if has_input else "context", f"the job input exceeds {MAX_CONTEXT_BYTES} bytes"
        )
    v.raise_if_any()
    assert priority is not None and actor_type is not None

    memory_id = req.memory_id or f"mem:{job_id}"
    principal = req.principal_id or caller.principal
    actor_id = req.actor_id or principal
    max_retries = req.max_retries or default_retries
    labels = dict(req.labels)
    meta = agent.JobMetadata(
        tenant_id=tenant,
        actor_id=actor_id,
        actor_type=actor_type,  # type: ignore[arg-type]
        idempotency_key=idem,
        capability=req.capability,
        risk_tags=list(req.risk_tags),
        requires=list(req.requires),
        pack_id=req.pack_id,
        labels=labels,
    )
    env = {"tenant_id": tenant, "memory_id": memory_id}
    for key, value in (
        ("team_id", req.team_id),
        ("project_id", req.project_id),
        ("context_mode", req.context_mode),
        ("max_input_tokens", str(req.max_input_tokens) if req.max_input_tokens else ""),
        ("max_output_tokens", str(req.max_output_tokens) if req.max_output_tokens else ""),
    ):
        if value:
            env[key] = value
    budget = agent.Budget(
        max_input_tokens=req.max_input_tokens,
        max_output_tokens=req.max_output_tokens,
        max_total_tokens=req.max_total_tokens,
        deadline_ms=req.deadline_ms,
    )
    context_key = cap.context_key(job_id)
    request = agent.JobRequest(
        job_id=job_id,
        topic=topic,
        priority=priority,  # type: ignore[arg-type]
        context_ptr=cap.redis_pointer(context_key),
        adapter_id=req.adapter_id,
        env=env,
        memory_id=memory_id,
        context_hints=agent.ContextHints(
            max_input_tokens=min(req.max_input_tokens, 2**31 - 1),
            allow_summarization=req.allow_summarization,
            allow_retrieval=req.allow_retrieval,
            tags=list(req.tags),
        ),
        budget=budget,
        tenant_id=tenant,
        principal_id=principal,
        labels=labels,
        meta=meta,
    )
    job = job_pb2.Job(
        id=job_id,
        trace_id=trace_id,
        topic=topic,
        tenant_id=tenant,
        team_id=req.team_id,
        project_id=req.project_id,
        principal_id=principal,
        actor_id=actor_id,
        actor_type=actor_type,  # type: ignore[arg-type]
        priority=priority,  # type: ignore[arg-type]
        idempotency_key=idem,
        capability=req.capability,
        pack_id=req.pack_id,
        risk_tags=list(req.risk_tags),
        requires=list(req.requires),
        labels=labels,
        adapter_id=req.adapter_id,
        memory_id=memory_id,
        context_ptr=request.context_ptr,
        max_retries=max_retries,
        budget=budget,
    )
    if req.deadline_ms:
        job.deadline.CopyFrom(ms_timestamp(now_ms + req.deadline_ms))
    new = NewJob(job=job, request=request, ctx_key=context_key, ctx_json=ctx, idempotency_key=idem)
    return BuiltJob(new=new, idempotency_key=idem)


def _context_document(
    req: job_service_pb2.SubmitJobRequest, topic: str, tenant: str, now_ms: int, has_input: bool
) -> bytes:
    """What the worker reads at ctx:<id>: the caller's `input` verbatim, else upstream's shape."""
    if has_input:
        value = json_format.MessageToDict(req.input)
    else:
        value = {
            "prompt": req.prompt,
            "adapter_id": req.adapter_id,
            "priority": (req.priority or "interactive").lower(),
            "topic": topic,
            "created_at": now_ms // 1000,
            "tenant_id": tenant,
        }
        if req.HasField("context"):
            value["context"] = json_format.MessageToDict(req.context)
    return json.dumps(value, separators=(",", ":")).encode()
