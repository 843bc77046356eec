"""Runs survive the engine: stopping it mid-run (a pending delay, an approval, a running job)
and starting a new engine instance finishes the run with every step run exactly once; a
dispatch lost between the run write and the job submit is re-sent; two engines share runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import grpc
import pytest

from cordum.sdk.worker import JobContext
from cordum.server.app import App
from cordum.server.workflows.runtime import WorkflowRuntime
from cordum.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc, run_service_pb2

from support.cordum import app_settings, running_app
from support.waiting import eventually
from support.workflows import Api, make_worker, run_status, status


@pytest.fixture
def api(channel: grpc.aio.Channel) -> Api:
    return Api(channel)


def runtime(app: App) -> WorkflowRuntime:
    assert app.workflows is not None
    return app.workflows


async def test_a_new_engine_resumes_a_run_mid_delay_mid_job_and_mid_approval(
    cordum: App, api: Api, channel: grpc.aio.Channel, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.restart"
    runs: Counter[str] = Counter()
    release = asyncio.Event()

    async def work(ctx: JobContext, data: Any) -> Any:
        runs[ctx.job_id] += 1
        if data.get("block"):
            await release.wait()
        return data

    rt = runtime(cordum)
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: work}):
        wf = await api.upsert(
            {
                "id": f"restart-{prefix}",
                "steps": {
                    "nap": {"type": "delay", "delay_sec": 1},
                    "after_nap": {"topic": topic, "depends_on": ["nap"], "input": {"s": 1}},
                    "long": {"topic": topic, "input": {"block": True}},
                    "after_long": {"topic": topic, "depends_on": ["long"], "input": {"s": 2}},
                    "ok": {"type": "approval"},
                    "after_ok": {"topic": topic, "depends_on": ["ok"], "input": {"s": 3}},
                },
            }
        )
        run_id = (await api.start(wf.id)).run_id
        await api.wait(
            run_id,
            lambda r: (
                (status(r, "nap"), status(r, "long"), status(r, "ok"))
                == ("RUNNING", "RUNNING", "WAITING")
                and runs[f"{run_id}:long@1"] == 1
            ),
            what="the delay, the job and the approval to be pending",
        )

        await rt.stop_engine()
        # While no engine runs: the job finishes (its event reaches nobody), the approval is
        # given (its advance message reaches nobody) and the delay falls due.
        release.set()
        jobs = job_service_pb2_grpc.JobServiceStub(channel)

        async def long_job() -> job_pb2.Job:
            return await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=f"{run_id}:long@1"))

        await eventually(long_job, until=lambda j: j.state == job_pb2.JOB_STATE_SUCCEEDED)
        approved = await api.runs.ApproveStep(
            run_service_pb2.ApproveStepRequest(run_id=run_id, step_id="ok")
        )
        assert status(approved, "ok") == "SUCCEEDED"
        assert status(approved, "after_ok") == "PENDING"
        stalled = await api.get(run_id)
        assert (status(stalled, "long"), status(stalled, "after_long")) == ("RUNNING", "PENDING")

        await rt.start_engine()
        run = await api.wait(run_id)
    assert run_status(run) == "SUCCEEDED"
    expected = {f"{run_id}:{s}@1" for s in ("long", "after_nap", "after_long", "after_ok")}
    assert set(runs) == expected
    assert all(n == 1 for n in runs.values()), runs
    assert all(run.steps[s].attempts == 1 for s in ("long", "after_nap", "after_long"))


async def test_a_dispatch_lost_after_the_run_write_is_sent_again(
    cordum: App, api: Api, nats_url: str, redis_url: str, prefix: str, monkeypatch: Any
) -> None:
    topic = f"job.t.ok.{prefix}.lost"
    runs: Counter[str] = Counter()

    async def work(ctx: JobContext, data: Any) -> Any:
        runs[ctx.job_id] += 1
        return data

    effects = runtime(cordum).effects
    real = effects.dispatch
    dropped: list[str] = []

    async def crash_once(run: Any, wf: Any, dispatches: Any) -> None:
        if run.workflow_id == f"lost-{prefix}" and not dropped:
            dropped.extend(d.job_id for d in dispatches)
            return  # as if the engine died right after writing the run
        await real(run, wf, dispatches)

    monkeypatch.setattr(effects, "dispatch", crash_once)
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: work}):
        wf = await api.upsert({"id": f"lost-{prefix}", "steps": {"a": {"topic": topic}}})
        run_id = (await api.start(wf.id, {"x": 1})).run_id
        run = await api.wait(run_id)
    assert dropped == [f"{run_id}:a@1"]
    assert run_status(run) == "SUCCEEDED"
    assert runs == Counter({f"{run_id}:a@1": 1})


async def test_two_engines_share_runs_without_running_a_step_twice(
    cordum: App, api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    topic = f"job.t.ok.{prefix}.two"
    runs: Counter[str] = Counter()

    async def work(ctx: JobContext, data: Any) -> Any:
        runs[ctx.job_id] += 1
        return data["x"]

    second = runtime(cordum).new_engine()
    await second.start()
    try:
        async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: work}, max_parallel=32):
            wf = await api.upsert(
                {
                    "id": f"two-{prefix}",
                    "steps": {
                        "fan": {
                            "topic": topic,
                            "for_each": "input.items",
                            "max_parallel": 8,
                            "input": {"x": "${item}"},
                        },
                        "after": {"topic": topic, "depends_on": ["fan"], "input": {"x": 0}},
                    },
                }
            )
            run_ids = [
                (await api.start(wf.id, {"items": list(range(40))})).run_id for _ in range(3)
            ]
            finished = [await api.wait(r, within=60) for r in run_ids]
    finally:
        await second.stop()
    assert second.writes > 0  # the second engine took its share
    assert [run_status(r) for r in finished] == ["SUCCEEDED"] * 3
    assert len(runs) == 3 * 41
    assert set(runs.values()) == {1}


async def test_a_gateway_without_an_engine_asks_the_engines_over_the_bus(
    cordum: App, api: Api, nats_url: str, redis_url: str, config_dir: Any, prefix: str
) -> None:
    """A gateway-only process serves the API; the session app's engine advances the runs
    (start and approval reach it as advance messages through the engines' queue group)."""
    settings = app_settings(
        nats_url, redis_url, config_dir, roles=["gateway"], namespace=cordum.settings.namespace
    )
    async with running_app(settings) as gateway:
        assert gateway.workflows is not None and gateway.workflows.engine is None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            remote = Api(channel)
            wf = await remote.upsert(
                {
                    "id": f"gw-{prefix}",
                    "steps": {
                        "ok": {"type": "approval"},
                        "tell": {"type": "notify", "depends_on": ["ok"]},
                    },
                }
            )
            run_id = (await remote.start(wf.id)).run_id
            await remote.wait_step(run_id, "ok", "WAITING")
            await remote.runs.ApproveStep(
                run_service_pb2.ApproveStepRequest(run_id=run_id, step_id="ok")
            )
            run = await remote.wait(run_id)
    assert run_status(run) == "SUCCEEDED"
    assert status(run, "tell") == "SUCCEEDED"
