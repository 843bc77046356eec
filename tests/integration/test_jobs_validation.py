"""Bad input gets INVALID_ARGUMENT with a google.rpc.BadRequest naming every bad field, and
leaves nothing behind in Redis; a policy file with errors stops the app from starting."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cordum.server.app import App
from cordum.server.errors import CordumError

from support.cordum import TEST_POLICY, app_settings, running_app, write_config
from support.jobs import J, error_reason, field_violations, jobs, json_value

MIB = 1024 * 1024


async def refused(stub: object, request: J.SubmitJobRequest) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitJob(request)  # type: ignore[attr-defined]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "INVALID_ARGUMENT"
    return field_violations(info.value)


async def nothing_written(app: App, prefix: str) -> None:
    assert app.redis is not None
    assert await app.redis.keys(f"*{prefix}*") == []


async def test_missing_topic(cordum: App, channel: grpc.aio.Channel, prefix: str) -> None:
    violations = await refused(
        jobs(channel), J.SubmitJobRequest(prompt="x", job_id=f"j-{prefix}", idempotency_key=prefix)
    )
    assert set(violations) == {"topic"}
    assert violations["topic"] == "required"
    await nothing_written(cordum, prefix)


@pytest.mark.parametrize(
    ("field", "request_fields"),
    [
        ("topic", {"topic": "sys.job.submit"}),
        ("topic", {"topic": "job..double"}),
        ("job_id", {"job_id": "has space"}),
        ("job_id", {"job_id": "slash/inside"}),
        ("trace_id", {"trace_id": "bad trace!"}),
        ("priority", {"priority": "urgent"}),
        ("actor_type", {"actor_type": "robot"}),
        ("tenant_id", {"tenant_id": "no spaces allowed"}),
        ("max_retries", {"max_retries": -1}),
        ("deadline_ms", {"deadline_ms": -5}),
        ("prompt", {"prompt": ""}),
    ],
)
async def test_bad_field_is_named(
    cordum: App,
    channel: grpc.aio.Channel,
    prefix: str,
    field: str,
    request_fields: dict[str, object],
) -> None:
    values: dict[str, object] = {
        "prompt": "x",
        "topic": f"job.t.ok.{prefix}",
        "idempotency_key": f"idem-{prefix}",
    }
    values.update(request_fields)
    if "job_id" not in request_fields:
        values["job_id"] = f"j-{prefix}"
    violations = await refused(jobs(channel), J.SubmitJobRequest(**values))  # type: ignore[arg-type]
    assert set(violations) == {field}, violations
    await nothing_written(cordum, prefix)


async def test_bad_labels(cordum: App, channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    base = {"prompt": "x", "topic": f"job.t.ok.{prefix}", "job_id": f"j-{prefix}"}
    violations = await refused(
        stub,
        J.SubmitJobRequest(
            **base,  # type: ignore[arg-type]
            labels={"bad key!": "v", "cordum.bus_msg_id": "x", "ok": "y" * 1001},
        ),
    )
    assert set(violations) == {"labels[bad key!]", "labels[cordum.bus_msg_id]", "labels[ok]"}
    assert "reserved" in violations["labels[cordum.bus_msg_id]"]
    too_many = {f"k{i}": "v" for i in range(51)}
    violations = await refused(stub, J.SubmitJobRequest(**base, labels=too_many))  # type: ignore[arg-type]
    assert set(violations) == {"labels"}
    await nothing_written(cordum, prefix)


async def test_oversized_input(cordum: App, channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    big = json_value({"blob": "x" * (2 * MIB + 16)})
    violations = await refused(
        stub, J.SubmitJobRequest(topic=f"job.t.ok.{prefix}", job_id=f"j-{prefix}", input=big)
    )
    assert set(violations) == {"input"}
    assert "2097152" in violations["input"]
    big_context = json_value({"blob": "x" * (2 * MIB + 16)})
    violations = await refused(
        stub,
        J.SubmitJobRequest(
            prompt="x", topic=f"job.t.ok.{prefix}", job_id=f"j-{prefix}", context=big_context
        ),
    )
    assert set(violations) == {"context"}
    await nothing_written(cordum, prefix)


async def test_every_problem_is_reported_at_once(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    violations = await refused(
        jobs(channel),
        J.SubmitJobRequest(job_id=f"bad id {prefix}", priority="soon", labels={"": "x"}),
    )
    assert {"prompt", "topic", "job_id", "priority", "labels[]"} <= set(violations)
    await nothing_written(cordum, prefix)


async def test_batch_refuses_only_the_bad_jobs(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    stub = jobs(channel)
    reply = await stub.BatchSubmitJobs(
        J.BatchSubmitJobsRequest(
            jobs=[
                J.SubmitJobRequest(prompt="x", topic=f"job.t.approve.{prefix}"),
                J.SubmitJobRequest(prompt="x", job_id=f"bad {prefix}"),
            ]
        )
    )
    good, bad = reply.results
    assert good.job_id and not good.HasField("error")
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not bad.job_id
    assert cordum.redis is not None
    assert await cordum.redis.keys(f"*bad {prefix}*") == []
    await stub.CancelJob(J.CancelJobRequest(job_id=good.job_id))


async def test_unknown_job_is_not_found(channel: grpc.aio.Channel, prefix: str) -> None:
    stub = jobs(channel)
    for call, request in (
        (stub.GetJob, J.GetJobRequest(job_id=f"missing-{prefix}")),
        (stub.GetJobResult, J.GetJobResultRequest(job_id=f"missing-{prefix}")),
        (stub.ListJobDecisions, J.ListJobDecisionsRequest(job_id=f"missing-{prefix}")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request)  # type: ignore[operator]
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(info.value) == "JOB_NOT_FOUND"


async def test_policy_file_with_errors_stops_the_app(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    broken = TEST_POLICY.replace("decision: deny\n", "decision: maybe\n", 1)
    config = write_config(tmp_path, policy=broken)
    with pytest.raises(CordumError) as info:
        async with running_app(app_settings(nats_url, redis_url, config)):
            raise AssertionError("the app started with a broken policy")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in info.value.violations}
    assert fields == {"rules[0].decision"}
    assert "maybe" in str(info.value)


async def test_policy_errors_are_all_named(nats_url: str, redis_url: str, tmp_path: Path) -> None:
    broken = """\
version: 1
rules:
  - id: a
    decision: allow
    match: {topics: "job.x"}
    colour: red
  - id: b
    decision: allow
    match: {cel: "labels.x ==="}
"""
    config = write_config(tmp_path, policy=broken)
    with pytest.raises(CordumError) as info:
        async with running_app(app_settings(nats_url, redis_url, config)):
            raise AssertionError("the app started with a broken policy")
    fields = {v.field for v in info.value.violations}
    assert {"version", "rules[0].match.topics", "rules[0].colour", "rules[1].match.cel"} <= fields
