"""Roles over native gRPC: every RPC of every service, called with a viewer, an operator
and an admin key of one tenant and with an admin key for every tenant, is refused
(PERMISSION_DENIED, reason PERMISSION_DENIED) exactly when api/roles.py says so, and
reaches the service otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from cordum.server.api import roles
from cordum.server.app import App
from cordum.v1 import (
    config_service_pb2,
    config_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
)

from support.admin import error_reason, field_violations
from support.auth import all_methods, call, keyed_app, md, method_named, method_path, request_of

KEYS = ("acme-viewer", "acme-operator", "acme-admin", "platform")
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


@pytest_asyncio.fixture(scope="module")
async def app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    async with keyed_app(nats_url, redis_url, config_dir) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


def _role(key: str) -> tuple[str, bool]:
    return ("admin", True) if key == "platform" else (key.split("-")[1], False)


async def test_every_rpc_is_allowed_or_refused_as_the_role_table_says(
    channel: grpc.aio.Channel,
) -> None:
    wrong: list[str] = []
    counted = 0
    for method in all_methods():
        needed = roles.access_for(method_path(method))
        assert needed is not None and method_path(method) in roles.METHOD_ACCESS
        for key in KEYS:
            role, every_tenant = _role(key)
            allowed = roles.allows(role, every_tenant, needed)
            # Empty requests: the allowed calls end in the service (mostly INVALID_ARGUMENT
            # or NOT_FOUND), changing nothing.
            code = await call(channel, method, key=key)
            counted += 1
            if allowed and code in REFUSED:
                wrong.append(f"{method_path(method)} refused to {key} ({code.name})")
            if not allowed and code != grpc.StatusCode.PERMISSION_DENIED:
                wrong.append(f"{method_path(method)} let {key} through ({code.name})")
    assert counted >= 4 * 70
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("path", "key", "needs"),
    [
        ("/cordum.v1.JobService/SubmitJob", "acme-viewer", "operator role"),
        ("/cordum.v1.WorkflowService/UpsertWorkflow", "acme-operator", "admin role"),
        ("/cordum.v1.PolicyService/PublishPolicy", "acme-operator", "admin role for every"),
        ("/cordum.v1.PolicyService/PublishPolicy", "acme-admin", "shared by every tenant"),
        ("/cordum.v1.SchemaService/RegisterSchema", "acme-admin", "shared by every tenant"),
    ],
)
async def test_a_refusal_names_what_is_missing(
    channel: grpc.aio.Channel, path: str, key: str, needs: str
) -> None:
    method = method_named(path)
    stub = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(request_of(method), metadata=md(key))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(caught.value) == "PERMISSION_DENIED"
    assert needs in (caught.value.details() or "")


async def test_the_system_config_needs_an_admin_for_every_tenant(
    channel: grpc.aio.Channel,
) -> None:
    """SetConfig is an admin call; its system scope is shared, so a tenant's admin may set
    its org's document but not the system one."""
    config = config_service_pb2_grpc.ConfigServiceStub(channel)
    C = config_service_pb2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await config.SetConfig(
            C.SetConfigRequest(scope="system", data={}), metadata=md("acme-admin")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    org = await config.SetConfig(
        C.SetConfigRequest(scope="org", data={"x": 1}), metadata=md("acme-admin")
    )
    assert (org.scope, org.scope_id, org.updated_by) == ("org", "acme", "acme-admin")
    # Every key reads the shared system document.
    system = await config.GetConfig(C.GetConfigRequest(), metadata=md("beta-viewer"))
    assert system.scope_id == "default"
    done = await config.SetConfig(
        C.SetConfigRequest(scope="system", data=system.data, expected_revision=system.revision),
        metadata=md("platform"),
    )
    assert done.revision == system.revision + 1


async def test_naming_another_tenant_is_refused_with_the_field(
    channel: grpc.aio.Channel,
) -> None:
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(prompt="x", topic="job.t.auth", tenant_id="beta"),
            metadata=md("acme-operator"),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert set(field_violations(caught.value)) == {"tenant_id"}
    # Naming its own tenant is fine; an all-tenant key may name any.
    own = await jobs.SubmitJob(
        job_service_pb2.SubmitJobRequest(prompt="x", topic="job.t.auth", org_id="acme"),
        metadata=md("acme-operator"),
    )
    assert own.job.tenant_id == "acme"
    other = await jobs.SubmitJob(
        job_service_pb2.SubmitJobRequest(prompt="x", topic="job.t.auth", tenant_id="beta"),
        metadata=md("platform"),
    )
    assert other.job.tenant_id == "beta"
    for job_id in (own.job_id, other.job_id):
        await jobs.CancelJob(
            job_service_pb2.CancelJobRequest(job_id=job_id), metadata=md("platform")
        )


async def test_the_principal_is_the_key_name_unless_the_caller_names_one(
    channel: grpc.aio.Channel,
) -> None:
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    named = await jobs.SubmitJob(
        job_service_pb2.SubmitJobRequest(prompt="x", topic="job.t.auth"),
        metadata=md("acme-operator"),
    )
    assert named.job.principal_id == "acme-operator"
    claimed = await jobs.SubmitJob(
        job_service_pb2.SubmitJobRequest(prompt="x", topic="job.t.auth"),
        metadata=(*md("acme-operator"), ("x-principal-id", "alice")),
    )
    assert claimed.job.principal_id == "alice"
    for job_id in (named.job_id, claimed.job_id):
        await jobs.CancelJob(
            job_service_pb2.CancelJobRequest(job_id=job_id), metadata=md("acme-operator")
        )
