"""The role table (api/roles.py) covers every RPC of the contract, and nothing else."""

from __future__ import annotations

import grpc
import pytest

from cordum.server.api import roles
from cordum.server.api.auth import Authenticator
from cordum.server.api.registry import platform_services, safety_kernel_service
from cordum.server.errors import CordumError
from cordum.server.services.caller import Caller


def contract_methods() -> set[str]:
    return {
        f"/{s.full_name}/{m.name}"
        for s in [*platform_services(), safety_kernel_service()]
        for m in s.methods
    }


def test_every_rpc_has_a_row() -> None:
    missing = sorted(contract_methods() - set(roles.METHOD_ACCESS))
    assert not missing, f"add these RPCs to api/roles.py: {missing}"


def test_no_row_names_an_rpc_that_does_not_exist() -> None:
    stale = sorted(set(roles.METHOD_ACCESS) - contract_methods())
    assert not stale, f"api/roles.py names RPCs that are not in the contract: {stale}"


def test_every_row_is_a_known_level() -> None:
    assert set(roles.METHOD_ACCESS.values()) <= {
        roles.VIEWER,
        roles.OPERATOR,
        roles.ADMIN,
        roles.PLATFORM,
    }


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("/grpc.health.v1.Health/Check", None),
        ("/grpc.health.v1.Health/Watch", None),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None),
        ("/cordum.v1.StatusService/GetStatus", roles.VIEWER),
        ("/cordum.v1.JobService/SubmitJob", roles.OPERATOR),
        ("/cordum.v1.RunService/DeleteRun", roles.ADMIN),
        ("/cordum.v1.PolicyService/PublishPolicy", roles.PLATFORM),
        # fail closed
        ("/cordum.v1.JobService/SomethingNew", roles.PLATFORM),
        ("/other.Service/Method", roles.PLATFORM),
    ],
)
def test_access_for(method: str, expected: str | None) -> None:
    assert roles.access_for(method) == expected


@pytest.mark.parametrize(
    ("role", "every_tenant", "allowed"),
    [
        ("viewer", False, {roles.VIEWER}),
        ("operator", False, {roles.VIEWER, roles.OPERATOR}),
        ("admin", False, {roles.VIEWER, roles.OPERATOR, roles.ADMIN}),
        ("viewer", True, {roles.VIEWER}),
        ("operator", True, {roles.VIEWER, roles.OPERATOR}),
        ("admin", True, {roles.VIEWER, roles.OPERATOR, roles.ADMIN, roles.PLATFORM}),
    ],
)
def test_levels_include_the_ones_below(role: str, every_tenant: bool, allowed: set[str]) -> None:
    levels = {roles.VIEWER, roles.OPERATOR, roles.ADMIN, roles.PLATFORM}
    assert {lvl for lvl in levels if roles.allows(role, every_tenant, lvl)} == allowed


def test_a_refusal_is_permission_denied_naming_the_missing_level() -> None:
    viewer = Caller(tenant="acme", role="viewer")
    with pytest.raises(CordumError) as caught:
        Authenticator.authorize(viewer, roles.OPERATOR, "JobService/SubmitJob")
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.reason_name == "PERMISSION_DENIED"
    assert caught.value.message == (
        "JobService/SubmitJob needs the operator role; this API key has viewer"
    )
    tenant_admin = Caller(tenant="acme", role="admin")
    with pytest.raises(CordumError, match="shared by every tenant"):
        Authenticator.authorize(tenant_admin, roles.PLATFORM, "PolicyService/PublishPolicy")
    Authenticator.authorize(Caller(tenant=None, role="admin"), roles.PLATFORM, "x")
    Authenticator.authorize(viewer, None, "health")
