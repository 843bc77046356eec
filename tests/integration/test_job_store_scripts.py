"""Scripts are called by SHA (no SCRIPT EXISTS round trip), and survive a server that lost
them (restart, SCRIPT FLUSH): the NOSCRIPT calls are reloaded and repeated."""

from __future__ import annotations

from redis.asyncio import Redis

from cordum.agent.v1 import job_pb2 as agent
from cordum.server.stores.jobs import JobStore, NewJob
from cordum.v1 import job_pb2


def new_job(job_id: str, tenant: str) -> NewJob:
    job = job_pb2.Job(id=job_id, trace_id="t", topic="job.x", tenant_id=tenant)
    request = agent.JobRequest(job_id=job_id, topic="job.x", tenant_id=tenant)
    return NewJob(job=job, request=request, ctx_key=f"ctx:{job_id}", ctx_json=b"{}")


async def test_pipelined_scripts_recover_from_a_flushed_script_cache(
    redis_url: str, prefix: str
) -> None:
    redis = Redis.from_url(redis_url)
    try:
        store = JobStore(redis, prefix=f"{prefix}.")
        first = await store.submit_many([new_job(f"{prefix}-a", prefix)], 1000)
        assert [o.status for o in first] == ["ok"]
        await redis.script_flush()
        again = await store.submit_many(
            [new_job(f"{prefix}-b", prefix), new_job(f"{prefix}-a", prefix)], 2000
        )
        # Both calls ran exactly once after the reload: a new job, and a duplicate id.
        assert [o.status for o in again] == ["ok", "exists"]
        await redis.script_flush()
        moved = await store.transition(
            f"{prefix}-b", allowed_from=["PENDING"], to="CANCELLED", message="x", now_ms=3000
        )
        assert moved.ok
        record = await store.get(f"{prefix}-b")
        assert record is not None and record.state == "CANCELLED"
    finally:
        await redis.aclose()
