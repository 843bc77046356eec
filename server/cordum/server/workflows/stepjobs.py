"""A step attempt as a job: the same stored record and CAP JobRequest a gateway submit makes,
so it goes through the scheduler and the safety gate like any other job.

Job id `<run>:<step>@<attempt>` (for_each children `<run>:<step>[i]@<attempt>`), the run's
tenant, labels `workflow_id`, `run_id`, `step_id` (over the run's labels and the step's
`route_labels`, which may not override them), budget `deadline_ms` = the step timeout, and
`max_retries = 0`: retries are the engine's, with the step's backoff.
Priority is INTERACTIVE like every other job, memory_id `run:<run id>`; nothing is read from
magic run-input keys (upstream took `priority` and `memory_id` from the run input and
defaulted workflow jobs to BATCH).
"""

from __future__ import annotations

import json

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk import cap
from cordum.server.services.job_validation import parse_actor_type
from cordum.server.stores.jobs import NewJob, ms_timestamp
from cordum.server.workflows.dag import Dispatch
from cordum.server.workflows.definition import CompiledWorkflow
from cordum.v1 import job_pb2, run_pb2


def default_topic(workflow_id: str) -> str:
    return f"job.workflow.{workflow_id}"


def build_step_job(run: run_pb2.Run, wf: CompiledWorkflow, d: Dispatch, now_ms: int) -> NewJob:
    cs = d.step
    step = cs.step
    topic = step.topic or default_topic(wf.workflow.id)
    tenant = run.tenant_id or run.org_id or "default"
    memory_id = f"run:{run.id}"
    labels = dict(run.labels)
    labels.pop("dry_run", None)
    labels.update(step.route_labels)
    if step.worker_id:
        labels["worker_id"] = step.worker_id
    labels.update({"workflow_id": run.workflow_id, "run_id": run.id, "step_id": d.key})
    env = {
        "workflow_id": run.workflow_id,
        "run_id": run.id,
        "step_id": d.key,
        "tenant_id": tenant,
        "memory_id": memory_id,
        "attempt": str(d.attempt),
    }
    if run.team_id:
        env["team_id"] = run.team_id
    if d.index is not None:
        env["foreach_index"] = str(d.index)
        env["foreach_item"] = json.dumps(d.item, separators=(",", ":"))
    meta_in = step.meta
    actor_type = parse_actor_type(meta_in.actor_type) or agent.ACTOR_TYPE_UNSPECIFIED
    principal = meta_in.actor_id or run.triggered_by
    meta = agent.JobMetadata(
        tenant_id=tenant,
        actor_id=principal,
        actor_type=actor_type,  # type: ignore[arg-type]
        idempotency_key=meta_in.idempotency_key,
        capability=meta_in.capability,
        risk_tags=[t.strip() for t in meta_in.risk_tags if t.strip()],
        requires=[r.strip() for r in meta_in.requires if r.strip()],
        pack_id=meta_in.pack_id,
        labels={**meta_in.labels, **labels},
    )
    budget = agent.Budget(deadline_ms=cs.timeout_ms)
    context_key = cap.context_key(d.job_id)
    request = agent.JobRequest(
        job_id=d.job_id,
        topic=topic,
        priority=agent.JOB_PRIORITY_INTERACTIVE,
        context_ptr=cap.redis_pointer(context_key),
        adapter_id=step.worker_id,
        env=env,
        workflow_id=run.workflow_id,
        step_index=d.index or 0,
        memory_id=memory_id,
        budget=budget,
        tenant_id=tenant,
        principal_id=principal,
        labels=labels,
        meta=meta,
    )
    job = job_pb2.Job(
        id=d.job_id,
        trace_id=run.id,
        topic=topic,
        tenant_id=tenant,
        team_id=run.team_id,
        principal_id=principal,
        actor_id=principal,
        actor_type=actor_type,  # type: ignore[arg-type]
        priority=agent.JOB_PRIORITY_INTERACTIVE,
        capability=meta_in.capability,
        pack_id=meta_in.pack_id,
        risk_tags=list(meta.risk_tags),
        requires=list(meta.requires),
        labels=labels,
        adapter_id=step.worker_id,
        memory_id=memory_id,
        context_ptr=request.context_ptr,
        max_retries=0,
        budget=budget,
        workflow_id=run.workflow_id,
        run_id=run.id,
        step_id=d.key,
    )
    if cs.timeout_ms:
        job.deadline.CopyFrom(ms_timestamp(now_ms + cs.timeout_ms))
    ctx = json.dumps(d.payload, separators=(",", ":")).encode()
    return NewJob(job=job, request=request, ctx_key=context_key, ctx_json=ctx)
