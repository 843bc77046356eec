"""The workflow store against a real Valkey: compare-and-set run updates, the bounded
timeline, timers with leases, TTLs once terminal, and deletion of everything a run names."""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from cordum.server.workflows import dag
from cordum.server.workflows.store import StoreLimits, WorkflowStore
from cordum.v1 import run_pb2, workflow_pb2

R = run_pb2


def new_run(tenant: str = "acme") -> run_pb2.Run:
    return R.Run(
        id=str(uuid.uuid4()),
        workflow_id="wf",
        tenant_id=tenant,
        org_id=tenant,
        status=R.RUN_STATUS_PENDING,
    )


def event(run: run_pb2.Run, kind: str, seq: int) -> run_pb2.RunEvent:
    e = dag.new_event(run, 1000, kind)
    e.seq = seq
    return e


async def test_run_updates_are_compare_and_set(redis_url: str, prefix: str) -> None:
    redis = Redis.from_url(redis_url)
    store = WorkflowStore(redis, prefix=f"{prefix}.", limits=StoreLimits(timeline_limit=5))
    try:
        run = new_run()
        wf = workflow_pb2.Workflow(id="wf", revision=3)
        created = await store.create_run(
            run, wf, [event(run, "run_created", 1)], now_ms=1, wake_ms=1
        )
        assert created.status == "ok"
        first = await store.load_run(run.id)
        second = await store.load_run(run.id)
        assert first is not None and second is not None and first.def_key.startswith("wf@3#")
        first.run.status = R.RUN_STATUS_RUNNING
        assert (
            await store.save_run(first, first.run, [event(run, "a", 2)], now_ms=2, wake_ms=-1)
            == "2"
        )
        # The second writer read version 1: refused, nothing of it written.
        second.run.status = R.RUN_STATUS_FAILED
        assert (
            await store.save_run(second, second.run, [event(run, "b", 2)], now_ms=3, wake_ms=5)
            is None
        )
        stored = await store.load_run(run.id)
        assert stored is not None and stored.run.status == R.RUN_STATUS_RUNNING
        assert stored.seq == 2
        assert await redis.zscore(f"{prefix}.wf:timers", run.id) is None
        running = await redis.zrange(f"{prefix}.wf:runs:t:acme:s:RUN_STATUS_RUNNING", 0, -1)
        assert running == [run.id.encode()]
        assert not await redis.zrange(f"{prefix}.wf:runs:t:acme:s:RUN_STATUS_PENDING", 0, -1)
    finally:
        await redis.aclose()


async def test_timeline_is_bounded_and_terminal_runs_expire(redis_url: str, prefix: str) -> None:
    redis = Redis.from_url(redis_url)
    store = WorkflowStore(
        redis, prefix=f"{prefix}.", limits=StoreLimits(timeline_limit=5, run_ttl_s=100)
    )
    try:
        run = new_run()
        await store.create_run(
            run, workflow_pb2.Workflow(id="wf"), [event(run, "e", 1)], now_ms=1, wake_ms=-1
        )
        for n in range(2, 9):
            stored = await store.load_run(run.id)
            assert stored is not None
            if n == 8:
                stored.run.status = R.RUN_STATUS_SUCCEEDED
            assert await store.save_run(
                stored, stored.run, [event(run, f"e{n}", n)], now_ms=n, wake_ms=-1
            )
        page = await store.timeline(run.id, 1, 100)
        assert page is not None
        events, last = page
        assert last == 8 and [e.seq for e in events] == [4, 5, 6, 7, 8]
        page = await store.timeline(run.id, 6, 2)
        assert page is not None and [e.seq for e in page[0]] == [6, 7]
        assert 0 < await redis.ttl(store.run_key(run.id)) <= 100
        assert 0 < await redis.ttl(store.run_key(run.id) + ":tl") <= 100
        assert not await redis.zscore(f"{prefix}.wf:runs:active", run.id)
    finally:
        await redis.aclose()


async def test_timers_are_claimed_with_a_lease(redis_url: str, prefix: str) -> None:
    redis = Redis.from_url(redis_url)
    store = WorkflowStore(redis, prefix=f"{prefix}.")
    try:
        runs = [new_run() for _ in range(3)]
        for i, run in enumerate(runs):
            await store.create_run(
                run, workflow_pb2.Workflow(id="wf"), [], now_ms=1, wake_ms=100 * (i + 1)
            )
        assert await store.claim_due(150, 10, 1000) == [runs[0].id]
        # Leased: not claimed again until the lease ends, unless a write moves it.
        assert await store.claim_due(250, 10, 1000) == [runs[1].id]
        assert sorted(await store.claim_due(1200, 10, 1000)) == sorted([runs[0].id, runs[2].id])
        stored = await store.load_run(runs[2].id)
        assert stored is not None
        assert not await store.set_timer(runs[2].id, "99", -1)  # stale version: ignored
        assert await store.set_timer(runs[2].id, stored.ver, -1)
        assert await redis.zscore(f"{prefix}.wf:timers", runs[2].id) is None
    finally:
        await redis.aclose()


async def test_deleting_a_run_removes_everything_that_names_it(redis_url: str, prefix: str) -> None:
    redis = Redis.from_url(redis_url)
    store = WorkflowStore(redis, prefix=f"{prefix}.")
    try:
        run = new_run()
        key = store.idempotency_key("acme", "wf", "k1")
        outcome = await store.create_run(
            run,
            workflow_pb2.Workflow(id="wf"),
            [event(run, "e", 1)],
            now_ms=1,
            wake_ms=5,
            idempotency=(key, "h"),
        )
        assert outcome.status == "ok"
        replay = await store.create_run(
            new_run(),
            workflow_pb2.Workflow(id="wf"),
            [],
            now_ms=2,
            wake_ms=5,
            idempotency=(key, "h2"),
        )
        assert (replay.status, replay.run_id, replay.request_hash) == ("replay", run.id, "h")
        assert await store.delete_run(run.id)
        # (`wf:tenants` lists tenants that have runs, for index trimming.)
        assert await redis.keys(f"{prefix}.*") == [f"{prefix}.wf:tenants".encode()]
        assert not await store.delete_run(run.id)
    finally:
        await redis.aclose()
