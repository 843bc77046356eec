"""Upstream's workflow-engine sharp edges (reference note, end of the workflow file), each
shown fixed here. Test names: test_upstream_sharp_edge_<what>."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from cordum.agent.v1 import job_pb2 as agent
from cordum.sdk.worker import JobContext, JobFailed
from cordum.server.app import App
from cordum.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc, run_service_pb2

from support.waiting import eventually
from support.workflows import Api, Recorder, make_worker, recording, run_status, status, value

RS = run_service_pb2


@pytest.fixture
def api(channel: grpc.aio.Channel) -> Api:
    return Api(channel)


@pytest.fixture
def jobs(channel: grpc.aio.Channel) -> job_service_pb2_grpc.JobServiceStub:
    return job_service_pb2_grpc.JobServiceStub(channel)


async def echo(ctx: JobContext, data: Any) -> Any:
    return data


async def hang(ctx: JobContext, data: Any) -> Any:
    await asyncio.sleep(60)


async def _is(value_: bool) -> bool:
    return value_


async def test_upstream_sharp_edge_skipped_steps_are_skipped_not_succeeded(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream marked a step whose gate was false SUCCEEDED (no event, no output) and ran its
    dependents. Here it is SKIPPED with a `step_skipped` event, and so is what only it feeds."""
    topic = f"job.t.ok.{prefix}.skip"
    seen = Recorder()
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, echo)}):
        wf = await api.upsert(
            {
                "id": f"skip-{prefix}",
                "steps": {
                    "gated": {"topic": topic, "condition": "input.go"},
                    "next": {"topic": topic, "depends_on": ["gated"]},
                },
            }
        )
        run = await api.wait((await api.start(wf.id, {"go": False})).run_id)
    assert (status(run, "gated"), status(run, "next")) == ("SKIPPED", "SKIPPED")
    assert run_status(run) == "SUCCEEDED"
    assert seen.started == []
    types = await api.event_types(run.id)
    assert types.count("step_skipped") == 2


async def test_upstream_sharp_edge_expression_errors_fail_instead_of_hanging(
    api: Api, prefix: str
) -> None:
    """Upstream left a step whose gate or for_each failed to evaluate untouched: the run hung
    in `running` forever. Here the step fails with the error and the run ends."""
    wf = await api.upsert(
        {
            "id": f"hang-{prefix}",
            "steps": {"gated": {"type": "notify", "condition": "input.nope == 1"}},
        }
    )
    run = await api.wait((await api.start(wf.id, {})).run_id)
    assert run_status(run) == "FAILED"
    assert "no such key: nope" in run.steps["gated"].error.message
    fan = await api.upsert(
        {"id": f"hang2-{prefix}", "steps": {"f": {"topic": "job.t.ok.x", "for_each": "input.obj"}}}
    )
    run = await api.wait((await api.start(fan.id, {"obj": {"a": 1}})).run_id)
    assert run_status(run) == "FAILED"
    assert "must return a list, got map" in run.steps["f"].error.message


async def test_upstream_sharp_edge_a_cancelled_job_cancels_the_run(
    api: Api,
    jobs: job_service_pb2_grpc.JobServiceStub,
    nats_url: str,
    redis_url: str,
    prefix: str,
) -> None:
    """Upstream turned a run whose step job was cancelled (e.g. through the jobs API) FAILED.
    Here the step is CANCELLED and so is the run."""
    topic = f"job.t.ok.{prefix}.cj"
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: hang}):
        wf = await api.upsert({"id": f"cj-{prefix}", "steps": {"a": {"topic": topic}}})
        run_id = (await api.start(wf.id)).run_id
        await api.wait_step(run_id, "a", "RUNNING")
        await jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=f"{run_id}:a@1"))
        run = await api.wait(run_id)
    assert run_status(run) == "CANCELLED"
    assert status(run, "a") == "CANCELLED"


async def test_upstream_sharp_edge_a_timed_out_child_times_out_its_parent(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream made a for_each parent FAILED when a child timed out. Here the parent (and,
    unhandled, the run) end TIMED_OUT like the child."""
    topic = f"job.t.ok.{prefix}.tc"

    async def slow_two(ctx: JobContext, data: Any) -> Any:
        if data["x"] == 2:
            await asyncio.sleep(30)
        return data

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: slow_two}):
        wf = await api.upsert(
            {
                "id": f"tc-{prefix}",
                "steps": {
                    "f": {
                        "topic": topic,
                        "for_each": "input.items",
                        "timeout_sec": 1,
                        "input": {"x": "${item}"},
                    }
                },
            }
        )
        run = await api.wait((await api.start(wf.id, {"items": [1, 2, 3]})).run_id)
    assert status(run, "f[1]") == "TIMED_OUT"
    assert status(run, "f") == "TIMED_OUT"
    assert run_status(run) == "TIMED_OUT"


async def test_upstream_sharp_edge_a_failed_run_cancels_its_running_jobs(
    api: Api,
    jobs: job_service_pb2_grpc.JobServiceStub,
    nats_url: str,
    redis_url: str,
    prefix: str,
) -> None:
    """Upstream left the other jobs of a failed run running. Here they are cancelled."""
    fail_topic, slow_topic = f"job.t.ok.{prefix}.ff", f"job.t.ok.{prefix}.fs"
    stopped: list[str] = []

    async def slow(ctx: JobContext, data: Any) -> Any:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(ctx.job_id)
            raise

    async def fail_later(ctx: JobContext, data: Any) -> Any:
        await asyncio.sleep(0.2)
        raise JobFailed("nope")

    async with make_worker(
        nats_url, redis_url, f"w-{prefix}", {fail_topic: fail_later, slow_topic: slow}
    ):
        wf = await api.upsert(
            {
                "id": f"ff-{prefix}",
                "steps": {"bad": {"topic": fail_topic}, "long": {"topic": slow_topic}},
            }
        )
        run = await api.wait((await api.start(wf.id)).run_id)
        await eventually(lambda: _is(bool(stopped)), what="the worker to stop the job")
    assert run_status(run) == "FAILED"
    assert status(run, "long") == "CANCELLED"
    job = await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=f"{run.id}:long@1"))
    assert job.state == job_pb2.JOB_STATE_CANCELLED


async def test_upstream_sharp_edge_cancel_keeps_finished_runs_and_unknown_runs_are_404(
    api: Api, prefix: str
) -> None:
    """Upstream's cancel rewrote finished runs to `cancelled`, answered 400 for unknown runs,
    ignored the workflow id in the path, and served `[]` for an unknown run's timeline."""
    wf = await api.upsert({"id": f"ck-{prefix}", "steps": {"a": {"type": "notify"}}})
    run = await api.wait((await api.start(wf.id)).run_id)
    assert run_status(run) == "SUCCEEDED"
    again = await api.runs.CancelRun(RS.CancelRunRequest(run_id=run.id))
    assert run_status(again) == "SUCCEEDED"
    assert again.completed_at == run.completed_at
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.runs.CancelRun(RS.CancelRunRequest(run_id=run.id, workflow_id="other"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    unknown = "00000000-0000-4000-8000-000000000000"
    for call in (
        api.runs.CancelRun(RS.CancelRunRequest(run_id=unknown)),
        api.runs.ApproveStep(RS.ApproveStepRequest(run_id=unknown, step_id="a")),
        api.runs.GetRunTimeline(RS.GetRunTimelineRequest(run_id=unknown)),
        api.runs.DeleteRun(RS.DeleteRunRequest(run_id=unknown)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_upstream_sharp_edge_constant_and_subsecond_backoff(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream forced multiplier <= 1 to 2 (no constant backoff) and truncated delays to
    whole seconds. Here multiplier 1 is constant and 0.15 s stays 150 ms."""
    topic = f"job.t.ok.{prefix}.cb"

    async def always_fails(ctx: JobContext, data: Any) -> Any:
        raise JobFailed("again")

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: always_fails}):
        wf = await api.upsert(
            {
                "id": f"cb-{prefix}",
                "steps": {
                    "a": {
                        "topic": topic,
                        "retry": {
                            "max_retries": 3,
                            "initial_backoff_sec": 0.15,
                            "multiplier": 1,
                            "jitter": 0.01,
                        },
                    }
                },
            }
        )
        run = await api.wait((await api.start(wf.id)).run_id)
    assert run.steps["a"].attempts == 4
    delays = [
        e.data.fields["delay_ms"].number_value
        for e in await api.timeline(run.id)
        if e.type == "step_retry_scheduled"
    ]
    assert len(delays) == 3 and all(148 <= d <= 152 for d in delays)


async def test_upstream_sharp_edge_denied_jobs_are_not_retried(api: Api, prefix: str) -> None:
    """Upstream retried a step whose job the policy DENIED. A denial is final here."""
    wf = await api.upsert(
        {
            "id": f"dn-{prefix}",
            "steps": {"a": {"topic": f"job.t.deny.{prefix}", "retry": {"max_retries": 5}}},
        }
    )
    run = await api.wait((await api.start(wf.id)).run_id)
    assert run.steps["a"].attempts == 1
    assert run.steps["a"].error.code == "DENIED"
    assert run_status(run) == "FAILED"


async def test_upstream_sharp_edge_workflow_timeout_is_enforced(
    api: Api,
    jobs: job_service_pb2_grpc.JobServiceStub,
    nats_url: str,
    redis_url: str,
    prefix: str,
) -> None:
    """Upstream stored the workflow `timeout_sec` and never enforced it. Here the run ends
    TIMED_OUT and its job is cancelled."""
    topic = f"job.t.ok.{prefix}.wt"
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: hang}):
        wf = await api.upsert(
            {"id": f"wt-{prefix}", "timeout_sec": 1, "steps": {"a": {"topic": topic}}}
        )
        run = await api.wait((await api.start(wf.id)).run_id)
    assert run_status(run) == "TIMED_OUT"
    assert run.error.code == "RUN_TIMEOUT"
    job = await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=f"{run.id}:a@1"))
    assert job.state == job_pb2.JOB_STATE_CANCELLED


async def test_upstream_sharp_edge_on_error_runs_a_handler(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream stored a step's `on_error` and never used it. Here the named step runs when
    the step fails (after its retries), sees the error, and the run continues from it."""
    bad, ok = f"job.t.ok.{prefix}.oe1", f"job.t.ok.{prefix}.oe2"

    async def broken(ctx: JobContext, data: Any) -> Any:
        raise JobFailed("quota exceeded")

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {bad: broken, ok: echo}):
        wf = await api.upsert(
            {
                "id": f"oe-{prefix}",
                "steps": {
                    "charge": {"topic": bad, "on_error": "refund"},
                    "ship": {"topic": ok, "depends_on": ["charge"]},
                    "refund": {"topic": ok, "input": {"why": "${steps.charge.error}"}},
                    "notify": {
                        "type": "notify",
                        "depends_on": ["refund"],
                        "input": {"message": "refunded"},
                    },
                },
            }
        )
        run = await api.wait((await api.start(wf.id)).run_id)
    assert run_status(run) == "SUCCEEDED"
    assert [status(run, s) for s in ("charge", "ship", "refund", "notify")] == [
        "FAILED",
        "SKIPPED",
        "SUCCEEDED",
        "SUCCEEDED",
    ]
    assert value(run.steps["refund"].output) == {"why": "handler failed: quota exceeded"}
    assert "step_failure_handled" in await api.event_types(run.id)


async def test_upstream_sharp_edge_unknown_step_types_are_refused(api: Api, prefix: str) -> None:
    """Upstream dispatched any unknown step type (even a typo) as a job. Here an unknown type
    is refused; upstream's job-dispatching names are kept as aliases of `job`."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.upsert({"id": f"ty-{prefix}", "steps": {"a": {"type": "aproval"}}})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps.a.type" in info.value.details()
    aliases = ["job", "worker", "llm", "http", "container", "script", "transform", "storage"]
    saved = await api.upsert(
        {"id": f"ty2-{prefix}", "steps": {t: {"type": t, "topic": "job.x"} for t in aliases}}
    )
    assert len(saved.steps) == len(aliases)


async def test_upstream_sharp_edge_no_magic_input_keys_and_interactive_priority(
    api: Api,
    jobs: job_service_pb2_grpc.JobServiceStub,
    nats_url: str,
    redis_url: str,
    prefix: str,
) -> None:
    """Upstream read job priority and memory_id from magic run-input keys and defaulted
    workflow jobs to BATCH. Here they are ordinary input; jobs are INTERACTIVE like others."""
    topic = f"job.t.ok.{prefix}.mg"
    seen = Recorder()
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, echo)}):
        wf = await api.upsert({"id": f"mg-{prefix}", "steps": {"a": {"topic": topic}}})
        run_input = {"priority": "batch", "memory_id": "elsewhere", "x": 1}
        run = await api.wait((await api.start(wf.id, run_input)).run_id)
    job = await jobs.GetJob(job_service_pb2.GetJobRequest(job_id=f"{run.id}:a@1"))
    assert job.priority == agent.JOB_PRIORITY_INTERACTIVE
    assert job.memory_id == f"run:{run.id}"
    # Without `input` a step still gets the run input, unchanged (upstream's default, kept).
    assert seen.inputs[f"{run.id}:a@1"] == run_input


async def test_upstream_sharp_edge_for_each_has_index_and_payloads_are_not_rewritten(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream had no `index` variable and injected `item` into every child's payload.
    Here `${index}` exists and a child gets exactly its templated input; children appear
    once (`fan[i]` in steps; the parent lists their ids), and the parent gathers outputs."""
    topic = f"job.t.ok.{prefix}.ix"
    seen = Recorder()
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, echo)}):
        wf = await api.upsert(
            {
                "id": f"ix-{prefix}",
                "steps": {
                    "fan": {
                        "topic": topic,
                        "for_each": "input.items",
                        "input": {"v": "${item}", "pos": "${index}"},
                        "output_path": "all",
                    }
                },
            }
        )
        run = await api.wait((await api.start(wf.id, {"items": ["a", "b"]})).run_id)
    assert sorted(seen.inputs.values(), key=lambda d: d["pos"]) == [
        {"v": "a", "pos": 0},
        {"v": "b", "pos": 1},
    ]
    assert list(run.steps["fan"].children) == ["fan[0]", "fan[1]"]
    assert value(run.steps["fan"].output) == [{"v": "a", "pos": 0}, {"v": "b", "pos": 1}]
    assert value(run.context.fields["all"]) == value(run.steps["fan"].output)


async def test_upstream_sharp_edge_interpolation_is_json_text_not_go_format(
    api: Api, prefix: str
) -> None:
    """Upstream interpolated numbers with Go's %v (`1e+06`) and maps as `map[k:v]`."""
    wf = await api.upsert(
        {
            "id": f"fmt-{prefix}",
            "steps": {
                "t": {
                    "type": "notify",
                    "input": {"message": "n=${input.n} m=${input.m} f=${input.f}"},
                }
            },
        }
    )
    run = await api.wait((await api.start(wf.id, {"n": 1000000, "m": {"k": 1}, "f": 0.5})).run_id)
    assert value(run.steps["t"].output) == {"message": 'n=1000000 m={"k":1} f=0.5'}


async def test_upstream_sharp_edge_large_outputs_keep_a_pointer(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream silently dropped outputs over 256 KiB and wrote the pointer string into
    `output_path`. Here the step records its `result_ptr` and says why the output is not
    inlined; the output schema is still checked against the full result."""
    topic = f"job.t.ok.{prefix}.big"

    async def big(ctx: JobContext, data: Any) -> Any:
        return {"blob": "x" * 300_000}

    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: big}):
        wf = await api.upsert(
            {
                "id": f"big-{prefix}",
                "steps": {"a": {"topic": topic, "output_schema": {"required": ["blob"]}}},
            }
        )
        run = await api.wait((await api.start(wf.id)).run_id)
    assert run_status(run) == "SUCCEEDED"
    assert run.steps["a"].result_ptr == f"redis://res:{run.id}:a@1"
    assert value(run.steps["a"].output) is None
    assert "not inlined" in next(
        e.message for e in await api.timeline(run.id) if e.type == "step_completed"
    )


async def test_upstream_sharp_edge_idempotency_is_scoped_expires_and_is_freed_on_delete(
    cordum: App, api: Api, prefix: str
) -> None:
    """Upstream's run idempotency keys were global, never expired and outlived the run. Here
    they are per tenant and workflow, carry a TTL, and deleting the run frees the key."""
    wf = await api.upsert({"id": f"ik-{prefix}", "steps": {"a": {"type": "notify"}}})
    key = f"k-{prefix}"
    first = await api.start(wf.id, idempotency_key=key)
    assert cordum.redis is not None
    stored = f"{cordum.settings.namespace}wf:idem:default:{wf.id}:{key}"
    ttl = await cordum.redis.ttl(stored)
    assert 0 < ttl <= cordum.settings.idempotency_ttl_s
    await api.wait(first.run_id)
    await api.runs.DeleteRun(RS.DeleteRunRequest(run_id=first.run_id))
    assert not await cordum.redis.exists(stored)
    second = await api.start(wf.id, idempotency_key=key)
    assert second.run_id != first.run_id and not second.idempotent_replay


async def test_upstream_sharp_edge_rerun_keeps_unrelated_steps_and_dry_run_is_not_sticky(
    api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream's rerun re-executed unrelated sibling steps, kept the old run's dry-run flag
    through cloned labels, and carried over every context key. Here a rerun from a step copies
    everything not downstream of it, takes dry_run from the request only, and rebuilds the
    context from the copied steps."""
    topic = f"job.t.ok.{prefix}.rr"
    seen = Recorder()
    async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: recording(seen, echo)}):
        wf = await api.upsert(
            {
                "id": f"rr-{prefix}",
                "steps": {
                    "a": {"topic": topic, "input": {"s": "a"}},
                    "b": {
                        "topic": topic,
                        "depends_on": ["a"],
                        "input": {"s": "b"},
                        "output_path": "b_out",
                    },
                    "sibling": {"topic": topic, "input": {"s": "sib"}},
                },
            }
        )
        dry = await api.wait((await api.start(wf.id, {}, dry_run=True)).run_id)
        assert seen.started == []
        real = await api.runs.RerunRun(RS.RerunRunRequest(run_id=dry.id))
        real_run = await api.wait(real.run_id)
        assert not real_run.dry_run and len(seen.started) == 3
        from_b = await api.runs.RerunRun(RS.RerunRunRequest(run_id=real_run.id, from_step="b"))
        again = await api.wait(from_b.run_id)
    assert [j.split(":")[1] for j in seen.started[3:]] == ["b@1"]
    assert again.steps["sibling"].job_id == real_run.steps["sibling"].job_id
    assert value(again.context.fields["b_out"]) == {"s": "b"}


async def test_upstream_sharp_edge_steps_keep_dispatching_while_an_approval_waits(
    cordum: App, api: Api, nats_url: str, redis_url: str, prefix: str
) -> None:
    """Upstream did not dispatch dependents while a run was `waiting` for an approval until
    the next reconciler tick. Here a completion dispatches its dependents at once; the
    reconciler is stopped for this test to prove it plays no part."""
    topic = f"job.t.ok.{prefix}.wa"
    rt = cordum.workflows
    assert rt is not None and rt.reconciler is not None
    await rt.reconciler.stop()
    try:
        async with make_worker(nats_url, redis_url, f"w-{prefix}", {topic: echo}):
            wf = await api.upsert(
                {
                    "id": f"wa-{prefix}",
                    "steps": {
                        "ok": {"type": "approval"},
                        "a": {"topic": topic, "input": {"n": 1}},
                        "b": {"topic": topic, "depends_on": ["a"], "input": {"n": 2}},
                        "c": {"topic": topic, "depends_on": ["b"], "input": {"n": 3}},
                    },
                }
            )
            run_id = (await api.start(wf.id)).run_id
            run = await api.wait_step(run_id, "c", "SUCCEEDED")
    finally:
        await rt.reconciler.start()
    assert run_status(run) == "WAITING"
    await api.cancel(run_id)


async def test_upstream_sharp_edge_bad_step_ids_unknown_dependencies_and_cycles_are_refused(
    api: Api, prefix: str
) -> None:
    """Upstream accepted step ids with `:`, `@` or `[` (which break job-id routing), unknown
    `depends_on` targets and cycles, and the run then hung. All are refused when saved."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.upsert(
            {
                "id": f"ids-{prefix}",
                "steps": {
                    "a:b": {"type": "notify"},
                    "c@1": {"type": "notify"},
                    "d[0]": {"type": "notify"},
                    "e": {"type": "notify", "depends_on": ["ghost"]},
                    "f": {"type": "notify", "depends_on": ["g"]},
                    "g": {"type": "notify", "depends_on": ["f"]},
                },
            }
        )
    details = info.value.details()
    for field in (
        "steps.a:b",
        "steps.c@1",
        "steps.d[0]",
        "steps.e.depends_on[0]",
        "steps.f.depends_on",
    ):
        assert field in details, field


async def test_upstream_sharp_edge_run_pages_never_skip_runs_sharing_a_timestamp(
    api: Api, prefix: str
) -> None:
    """Upstream paged runs by whole seconds with `cursor - 1`, skipping runs updated in the
    same second. Here a page token is (time, id), so every run is listed exactly once."""
    wf = await api.upsert({"id": f"pg-{prefix}", "steps": {"ok": {"type": "approval"}}})
    ids = await asyncio.gather(*(api.start(wf.id, {"i": i}) for i in range(30)))
    run_ids = sorted(r.run_id for r in ids)
    for run_id in run_ids:
        await api.wait_step(run_id, "ok", "WAITING")
    seen: list[str] = []
    token = ""
    while True:
        page = await api.runs.ListRuns(
            RS.ListRunsRequest(workflow_id=wf.id, page_size=4, page_token=token)
        )
        seen += [r.id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == run_ids
    await api.cancel(*run_ids)
