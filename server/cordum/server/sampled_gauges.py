"""Gauges of state shared in Redis, sampled when /metrics is scraped.

Queue depths, the DLQ size and the number of active workflow runs are sizes of sorted sets
the job and workflow scripts already maintain, so a scrape costs one pipelined round trip of
ZCARDs and the hot path nothing. They describe the whole control plane, not one process: every
process running the role reports the same values, so dashboards take `max`, never `sum`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from cordum.server.metrics import Metrics
from cordum.server.stores.jobs import ACTIVE

Sampler = Callable[[], Awaitable[None]]


def job_gauges(redis: Redis, prefix: str, metrics: Metrics) -> Sampler:
    """`cordum_jobs_queue_depth{state}` (jobs:active:<S>) and `cordum_dlq_entries`
    (dlq:idx, bounded by dlq_max_entries)."""

    async def sample() -> None:
        pipe = redis.pipeline(transaction=False)
        for state in ACTIVE:
            pipe.zcard(f"{prefix}jobs:active:{state}")
        pipe.zcard(f"{prefix}dlq:idx")
        *depths, dlq = await pipe.execute()
        for state, depth in zip(ACTIVE, depths, strict=True):
            metrics.jobs_queue_depth.labels(state).set(depth)
        metrics.dlq_entries.set(dlq)

    return sample


def workflow_gauges(redis: Redis, prefix: str, metrics: Metrics) -> Sampler:
    """`cordum_workflow_runs_active` (wf:runs:active: non-terminal runs)."""

    async def sample() -> None:
        metrics.workflow_runs_active.set(await redis.zcard(f"{prefix}wf:runs:active"))

    return sample
