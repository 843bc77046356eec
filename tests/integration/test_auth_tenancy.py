"""Tenancy: tenant acme's jobs, approvals, workflows, runs, locks, artifacts, DLQ entries,
config documents and memory are NOT_FOUND to tenant beta's keys, whatever their role, over
native gRPC and REST through Envoy; beta's lists never show them; acme's resources are
untouched by beta's attempts; an all-tenant key sees them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
import pytest_asyncio

from cordum.server.app import App

from support.admin import error_reason
from support.auth import key_of, keyed_app, rpc
from support.cordum import start_envoy_for
from support.waiting import eventually

J = "/cordum.v1.JobService/"
A = "/cordum.v1.ApprovalService/"
W = "/cordum.v1.WorkflowService/"
R = "/cordum.v1.RunService/"
L = "/cordum.v1.LockService/"
ART = "/cordum.v1.ArtifactService/"
D = "/cordum.v1.DLQService/"
C = "/cordum.v1.ConfigService/"
M = "/cordum.v1.MemoryService/"
P = "/cordum.v1.PolicyService/"


@dataclass
class Owned:
    """What tenant acme owns."""

    job: str
    trace: str
    approval_job: str
    denied_job: str
    workflow: str
    run: str
    resource: str
    artifact: str
    team: str


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    async with keyed_app(nats_url, redis_url, config_dir) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def rest(app: App, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    service, url = start_envoy_for(app, tmp_path_factory.mktemp("envoy-tenancy"))
    try:
        yield url
    finally:
        service.stop()


@pytest_asyncio.fixture(scope="module")
async def owned(channel: grpc.aio.Channel) -> Owned:
    op, admin = "acme-operator", "acme-admin"
    job = await rpc(channel, J + "SubmitJob", {"prompt": "x", "topic": "job.t.ten"}, key=op)
    held = await rpc(
        channel, J + "SubmitJob", {"prompt": "x", "topic": "job.t.approve.ten"}, key=op
    )
    denied = await rpc(channel, J + "SubmitJob", {"prompt": "x", "topic": "job.t.deny.ten"}, key=op)
    wf = await rpc(
        channel,
        W + "UpsertWorkflow",
        {"workflow": {"id": "ten-wf", "steps": {"ok": {"type": "approval"}}}},
        key=admin,
    )
    run = await rpc(channel, R + "StartRun", {"workflow_id": wf["id"]}, key=op)
    await rpc(channel, L + "AcquireLock", {"resource": "ten-res", "owner": "me"}, key=op)
    art = await rpc(channel, ART + "PutArtifact", {"content": "acme's secret"}, key=op)
    await rpc(channel, C + "SetConfig", {"scope": "org", "data": {"who": "acme"}}, key=admin)
    await rpc(
        channel,
        C + "SetConfig",
        {"scope": "team", "scope_id": "sre", "data": {"who": "acme-sre"}},
        key=admin,
    )

    async def state(job_id: str) -> str:
        return (await rpc(channel, J + "GetJob", {"job_id": job_id}, key="acme-viewer"))["state"]

    await eventually(
        lambda: state(held["job_id"]), until=lambda s: s == "JOB_STATE_APPROVAL_REQUIRED"
    )
    await eventually(lambda: state(denied["job_id"]), until=lambda s: s == "JOB_STATE_DENIED")
    return Owned(
        job=job["job_id"],
        trace=job["trace_id"],
        approval_job=held["job_id"],
        denied_job=denied["job_id"],
        workflow=wf["id"],
        run=run["run_id"],
        resource="ten-res",
        artifact=art["artifact_ptr"],
        team="sre",
    )


def _cross_tenant_calls(o: Owned) -> list[tuple[str, dict[str, Any], str]]:
    """(method, request, beta key) for every way to reach one of acme's resources."""
    return [
        (J + "GetJob", {"job_id": o.job}, "beta-viewer"),
        (J + "GetJobResult", {"job_id": o.job}, "beta-viewer"),
        (J + "ListJobDecisions", {"job_id": o.job}, "beta-viewer"),
        (J + "WatchJob", {"job_id": o.job}, "beta-viewer"),
        (J + "CancelJob", {"job_id": o.job}, "beta-operator"),
        (J + "RemediateJob", {"job_id": o.denied_job}, "beta-operator"),
        (A + "ApproveJob", {"job_id": o.approval_job}, "beta-operator"),
        (A + "RejectJob", {"job_id": o.approval_job}, "beta-admin"),
        (W + "GetWorkflow", {"workflow_id": o.workflow}, "beta-viewer"),
        (W + "DeleteWorkflow", {"workflow_id": o.workflow}, "beta-admin"),
        (
            W + "UpsertWorkflow",
            {"workflow": {"id": o.workflow, "steps": {"x": {"type": "approval"}}}},
            "beta-admin",
        ),
        (R + "StartRun", {"workflow_id": o.workflow}, "beta-operator"),
        (R + "GetRun", {"run_id": o.run}, "beta-viewer"),
        (R + "GetRunTimeline", {"run_id": o.run}, "beta-viewer"),
        (R + "WatchRun", {"run_id": o.run}, "beta-viewer"),
        (R + "CancelRun", {"run_id": o.run}, "beta-operator"),
        (R + "RerunRun", {"run_id": o.run}, "beta-operator"),
        (R + "ApproveStep", {"run_id": o.run, "step_id": "ok"}, "beta-operator"),
        (R + "DeleteRun", {"run_id": o.run}, "beta-admin"),
        (L + "GetLock", {"resource": o.resource}, "beta-viewer"),
        (L + "ReleaseLock", {"resource": o.resource, "owner": "me"}, "beta-operator"),
        (L + "RenewLock", {"resource": o.resource, "owner": "me"}, "beta-operator"),
        (ART + "GetArtifact", {"artifact_ptr": o.artifact}, "beta-viewer"),
        (ART + "DownloadArtifact", {"artifact_ptr": o.artifact}, "beta-viewer"),
        (ART + "DeleteArtifact", {"artifact_ptr": o.artifact}, "beta-admin"),
        (D + "GetDLQEntry", {"job_id": o.denied_job}, "beta-viewer"),
        (D + "RetryDLQEntry", {"job_id": o.denied_job}, "beta-operator"),
        (D + "DeleteDLQEntry", {"job_id": o.denied_job}, "beta-admin"),
        (C + "GetConfig", {"scope": "org", "scope_id": "acme"}, "beta-viewer"),
        (C + "SetConfig", {"scope": "org", "scope_id": "acme", "data": {}}, "beta-admin"),
        (C + "GetConfig", {"scope": "team", "scope_id": o.team}, "beta-viewer"),
        (M + "ReadMemory", {"ptr": f"redis://ctx:{o.job}"}, "beta-viewer"),
        (M + "ReadMemory", {"key": f"art:{o.artifact.rsplit(':', 1)[-1]}"}, "beta-viewer"),
    ]


async def test_another_tenants_resources_are_not_found_over_grpc(
    channel: grpc.aio.Channel, owned: Owned
) -> None:
    wrong = []
    for path, body, key in _cross_tenant_calls(owned):
        try:
            reply = await rpc(channel, path, body, key=key)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                wrong.append(f"{path} by {key}: {error.code().name} {error.details()}")
            elif not error_reason(error).endswith("NOT_FOUND"):
                wrong.append(f"{path} by {key}: reason {error_reason(error)}")
            continue
        wrong.append(f"{path} by {key} succeeded: {reply}")
    assert not wrong, "\n".join(wrong)
    await _acme_intact(channel, owned)


async def _acme_intact(channel: grpc.aio.Channel, o: Owned) -> None:
    """Nothing beta tried changed acme's resources."""
    v = "acme-viewer"
    assert (await rpc(channel, J + "GetJob", {"job_id": o.job}, key=v))["state"] != (
        "JOB_STATE_CANCELLED"
    )
    held = await rpc(channel, J + "GetJob", {"job_id": o.approval_job}, key=v)
    assert held["state"] == "JOB_STATE_APPROVAL_REQUIRED"
    run = await rpc(channel, R + "GetRun", {"run_id": o.run}, key=v)
    assert run["status"] not in ("RUN_STATUS_CANCELLED", "RUN_STATUS_SUCCEEDED")
    assert (await rpc(channel, W + "GetWorkflow", {"workflow_id": o.workflow}, key=v))[
        "steps"
    ].keys() == {"ok"}
    lock = await rpc(channel, L + "GetLock", {"resource": o.resource}, key=v)
    assert lock["owners"] == {"me": 1}
    art = await rpc(channel, ART + "GetArtifact", {"artifact_ptr": o.artifact}, key=v)
    assert art["artifact_ptr"] == o.artifact
    await rpc(channel, D + "GetDLQEntry", {"job_id": o.denied_job}, key=v)
    org = await rpc(channel, C + "GetConfig", {"scope": "org", "scope_id": "acme"}, key=v)
    assert org["data"] == {"who": "acme"}


async def test_lists_show_only_the_callers_tenant(channel: grpc.aio.Channel, owned: Owned) -> None:
    listings = [
        (J + "ListJobs", {}, "jobs", "id", owned.job),
        (A + "ListApprovals", {}, "approvals", None, owned.approval_job),
        (W + "ListWorkflows", {}, "workflows", "id", owned.workflow),
        (R + "ListRuns", {}, "runs", "id", owned.run),
        (L + "ListLocks", {}, "locks", "resource", owned.resource),
        (ART + "ListArtifacts", {}, "artifacts", "artifact_ptr", owned.artifact),
        (D + "ListDLQEntries", {}, "entries", "job_id", owned.denied_job),
    ]
    for path, body, field, id_field, wanted in listings:

        def ids(
            reply: dict[str, Any], field: str = field, id_field: str | None = id_field
        ) -> set[str]:
            items = reply.get(field, [])
            if id_field is None:  # approvals carry the job
                return {i["job"]["id"] for i in items}
            return {i.get(id_field, "") for i in items}

        assert wanted in ids(await rpc(channel, path, body, key="acme-viewer")), path
        assert wanted not in ids(await rpc(channel, path, body, key="beta-viewer")), path
    trace = await rpc(channel, J + "GetTrace", {"trace_id": owned.trace}, key="beta-viewer")
    assert trace.get("jobs", []) == []
    named = await rpc(channel, J + "ListJobs", {"tenant_id": "acme"}, key="platform")
    assert owned.job in {j["id"] for j in named["jobs"]}


async def test_the_same_name_is_a_different_resource_in_each_tenant(
    channel: grpc.aio.Channel, owned: Owned
) -> None:
    """Locks and tenant config documents are named within their tenant."""
    lock = await rpc(
        channel, L + "AcquireLock", {"resource": owned.resource, "owner": "b"}, key="beta-operator"
    )
    assert lock["owners"] == {"b": 1}
    await rpc(
        channel, L + "ReleaseLock", {"resource": owned.resource, "owner": "b"}, key="beta-operator"
    )
    assert (await rpc(channel, L + "GetLock", {"resource": owned.resource}, key="acme-viewer"))[
        "owners"
    ] == {"me": 1}

    await rpc(
        channel,
        C + "SetConfig",
        {"scope": "team", "scope_id": owned.team, "data": {"who": "beta-sre"}},
        key="beta-admin",
    )
    for tenant, who in (("acme", "acme-sre"), ("beta", "beta-sre")):
        doc = await rpc(
            channel,
            C + "GetConfig",
            {"scope": "team", "scope_id": owned.team},
            key=f"{tenant}-viewer",
        )
        assert doc["data"] == {"who": who}
        effective = await rpc(
            channel, C + "GetEffectiveConfig", {"team_id": owned.team}, key=f"{tenant}-viewer"
        )
        assert effective["data"]["who"] == who
    # The platform's view of each tenant's merge.
    seen = await rpc(
        channel,
        C + "GetEffectiveConfig",
        {"org_id": "beta", "team_id": owned.team},
        key="platform",
    )
    assert seen["data"]["who"] == "beta-sre"


async def test_asking_the_policy_about_another_tenant_is_refused(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rpc(
            channel, P + "EvaluatePolicy", {"topic": "job.t.x", "tenant": "acme"}, key="beta-viewer"
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    decided = await rpc(channel, P + "EvaluatePolicy", {"topic": "job.t.x"}, key="beta-viewer")
    assert decided["decision"]


def _rest_cross_tenant(o: Owned) -> list[tuple[str, str, str, dict[str, Any] | None]]:
    """(HTTP method, path, beta key, JSON body)."""
    art = quote(o.artifact, safe="")
    return [
        ("GET", f"/api/v1/jobs/{o.job}", "beta-viewer", None),
        ("GET", f"/api/v1/jobs/{o.job}/result", "beta-viewer", None),
        ("POST", f"/api/v1/jobs/{o.job}/cancel", "beta-operator", {}),
        ("POST", f"/api/v1/approvals/{o.approval_job}/approve", "beta-operator", {}),
        ("GET", f"/api/v1/workflows/{o.workflow}", "beta-viewer", None),
        ("DELETE", f"/api/v1/workflows/{o.workflow}", "beta-admin", None),
        ("POST", f"/api/v1/workflows/{o.workflow}/runs", "beta-operator", {}),
        ("GET", f"/api/v1/workflow-runs/{o.run}", "beta-viewer", None),
        ("POST", f"/api/v1/workflow-runs/{o.run}/cancel", "beta-operator", {}),
        ("DELETE", f"/api/v1/workflow-runs/{o.run}", "beta-admin", None),
        ("GET", f"/api/v1/locks/{o.resource}", "beta-viewer", None),
        ("POST", "/api/v1/locks/release", "beta-operator", {"resource": o.resource, "owner": "me"}),
        ("GET", f"/api/v1/artifacts/{art}", "beta-viewer", None),
        ("DELETE", f"/api/v1/artifacts/{art}", "beta-admin", None),
        ("GET", f"/api/v1/dlq/{o.denied_job}", "beta-viewer", None),
        ("POST", f"/api/v1/dlq/{o.denied_job}/retry", "beta-operator", {}),
        ("GET", "/api/v1/config?scope=org&scope_id=acme", "beta-viewer", None),
        ("GET", f"/api/v1/memory?ptr=redis://ctx:{o.job}", "beta-viewer", None),
    ]


async def test_another_tenants_resources_are_not_found_over_rest(
    rest: str, channel: grpc.aio.Channel, owned: Owned
) -> None:
    wrong = []
    async with httpx.AsyncClient(base_url=rest, timeout=15) as http:
        mine = await http.get(
            f"/api/v1/jobs/{owned.job}", headers={"x-api-key": key_of("acme-viewer")}
        )
        assert mine.status_code == 200, mine.text
        for method, path, key, body in _rest_cross_tenant(owned):
            reply = await http.request(method, path, json=body, headers={"x-api-key": key_of(key)})
            if reply.status_code != 404 or reply.json()["code"] != 5:
                wrong.append(f"{method} {path} by {key}: {reply.status_code} {reply.text}")
        listed = await http.get(
            "/api/v1/jobs", headers={"authorization": f"Bearer {key_of('beta-viewer')}"}
        )
        assert listed.status_code == 200
        assert owned.job not in {j["id"] for j in listed.json()["jobs"]}
    assert not wrong, "\n".join(wrong)
    await _acme_intact(channel, owned)
