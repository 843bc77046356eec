"""Whose is a job or a run: the reads the event streams need to scope bus events by tenant.

Bus messages about a job (a worker's result, a state change) name only the job; its tenant,
topic and run are in the job's record, and a run's tenant in the run's record. Both are
fixed for the life of the record, so callers may cache what these reads return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from cordum.v1 import job_pb2


@dataclass(frozen=True, slots=True)
class JobScope:
    tenant: str
    topic: str
    run_id: str


class ScopeStore:
    """Reads job and run owners with one pipelined round trip per batch of ids."""

    def __init__(
        self,
        redis: Redis,
        *,
        job_key: Callable[[str], str],
        run_key: Callable[[str], str] | None,
    ) -> None:
        self._redis = redis
        # The stores' own key functions, so the key layout is written down once.
        self._job_key = job_key
        self._run_key = run_key

    async def read(
        self, job_ids: Sequence[str], run_ids: Sequence[str]
    ) -> tuple[dict[str, JobScope], dict[str, str]]:
        """The scope of every job and the tenant of every run that exists (others are left
        out: they belong to another control plane, or are gone)."""
        if not job_ids and not (run_ids and self._run_key):
            return {}, {}
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self._job_key(job_id), "job")
        runs = list(run_ids) if self._run_key is not None else []
        for run_id in runs:
            pipe.hget(self._run_key(run_id), "tenant")  # type: ignore[misc]
        replies = await pipe.execute()
        jobs: dict[str, JobScope] = {}
        for job_id, raw in zip(job_ids, replies[: len(job_ids)], strict=True):
            if raw:
                job = job_pb2.Job.FromString(raw)
                jobs[job_id] = JobScope(job.tenant_id, job.topic, job.run_id)
        tenants = {
            run_id: raw.decode()
            for run_id, raw in zip(runs, replies[len(job_ids) :], strict=True)
            if raw is not None
        }
        return jobs, tenants
