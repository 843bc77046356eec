"""``client.policy``: ask the safety policy, and administer it.

Asking: :meth:`~AsyncPolicyClient.evaluate` (recorded like a real check),
:meth:`~AsyncPolicyClient.simulate` (no side effects) and :meth:`~AsyncPolicyClient.explain`
(rule by rule) take the fields of ``PolicyCheckInput`` as keywords::

    decision = await client.policy.simulate(topic="job.deploy", labels={"env": "prod"})

Administering: draft bundles (``client.policy.bundles``), :meth:`~AsyncPolicyClient.publish`
as a new immutable version, :meth:`~AsyncPolicyClient.rollback`, the versions and the audit
log, and :meth:`~AsyncPolicyClient.replay` of recorded decisions under a candidate policy.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any, Required, TypedDict, Unpack, cast

from google.protobuf import json_format
from google.protobuf.message import Message

from cordum.agent.v1 import job_pb2 as agent_job_pb2
from cordum.agent.v1 import safety_pb2
from cordum.sdk._paging import apaginate, paginate
from cordum.sdk._transport import AioTransport, SyncTransport
from cordum.sdk.convert import to_value
from cordum.v1 import policy_pb2, policy_service_pb2, policy_service_pb2_grpc

__all__ = [
    "AsyncPolicyBundlesClient",
    "AsyncPolicyClient",
    "PolicyBundlesClient",
    "PolicyCheckFields",
    "PolicyClient",
    "check_input",
]

P = policy_service_pb2
Stub = policy_service_pb2_grpc.PolicyServiceStub
Decision = safety_pb2.PolicyCheckResponse


class PolicyCheckFields(TypedDict, total=False):
    """The fields of ``PolicyCheckInput`` as keyword arguments. ``None`` means "not set";
    ``budget`` and ``meta`` take their message or a mapping of its fields;
    ``effective_config`` any JSON value."""

    topic: Required[str]
    job_id: str | None
    tenant: str | None
    org_id: str | None
    team_id: str | None
    workflow_id: str | None
    step_id: str | None
    principal_id: str | None
    priority: str | None
    estimated_cost: float | None
    budget: agent_job_pb2.Budget | Mapping[str, Any] | None
    labels: Mapping[str, str] | None
    memory_id: str | None
    effective_config: Any
    meta: policy_pb2.PolicyCheckMeta | Mapping[str, Any] | None


_MESSAGES: dict[str, type[Message]] = {
    "budget": agent_job_pb2.Budget,
    "meta": policy_pb2.PolicyCheckMeta,
}


def check_input(fields: Mapping[str, Any]) -> policy_pb2.PolicyCheckInput:
    """A ``PolicyCheckInput`` from keyword-style fields (see :class:`PolicyCheckFields`)."""
    request = policy_pb2.PolicyCheckInput()
    for name, raw in fields.items():
        if raw is None:
            continue
        if name == "effective_config":
            request.effective_config.CopyFrom(to_value(raw))
        elif name in _MESSAGES:
            cls = _MESSAGES[name]
            message = raw if isinstance(raw, cls) else json_format.ParseDict(raw, cls())
            getattr(request, name).CopyFrom(message)
        elif name == "labels":
            request.labels.update(raw)
        else:
            setattr(request, name, raw)
    return request


def _simulate_bundle_request(
    bundle_id: str, content: str | None, fields: Mapping[str, Any]
) -> P.SimulatePolicyBundleRequest:
    return P.SimulatePolicyBundleRequest(
        bundle_id=bundle_id, content=content or "", request=check_input(fields)
    )


def _put_request(
    bundle_id: str, content: str, enabled: bool | None, author: str, message: str
) -> P.PutPolicyBundleRequest:
    request = P.PutPolicyBundleRequest(
        bundle_id=bundle_id, content=content, author=author, message=message
    )
    if enabled is not None:
        request.enabled = enabled
    return request


def _publish_request(
    bundle_ids: Iterable[str] | None, author: str, message: str, note: str
) -> P.PublishPolicyRequest:
    return P.PublishPolicyRequest(
        bundle_ids=list(bundle_ids or ()), author=author, message=message, note=note
    )


def _rollback_request(
    version: int | None, snapshot_id: str | None, author: str, message: str, note: str
) -> P.RollbackPolicyRequest:
    return P.RollbackPolicyRequest(
        version=version or 0,
        snapshot_id=snapshot_id or "",
        author=author,
        message=message,
        note=note,
    )


def _replay_request(
    bundles: Mapping[str, str] | None, remove_bundle_ids: Iterable[str], limit: int | None
) -> P.ReplayPolicyRequest:
    return P.ReplayPolicyRequest(
        bundles=dict(bundles or {}), remove_bundle_ids=list(remove_bundle_ids), limit=limit or 0
    )


class AsyncPolicyBundlesClient:
    """``client.policy.bundles``: draft bundles. Nothing here is enforced until
    :meth:`AsyncPolicyClient.publish`."""

    def __init__(self, transport: AioTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> policy_service_pb2_grpc.PolicyServiceAsyncStub:
        return cast("policy_service_pb2_grpc.PolicyServiceAsyncStub", self._t.stub(Stub))

    async def list_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> P.ListPolicyBundlesResponse:
        request = P.ListPolicyBundlesRequest(page_size=page_size or 0, page_token=page_token)
        return await self._t.unary(self._stub.ListPolicyBundles, request)

    def list(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> AsyncIterator[policy_pb2.PolicyBundle]:
        async def fetch(token: str, size: int | None) -> P.ListPolicyBundlesResponse:
            return await self.list_page(page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.bundles, page_size=page_size, limit=limit)

    async def get(self, bundle_id: str) -> policy_pb2.PolicyBundle:
        request = P.GetPolicyBundleRequest(bundle_id=bundle_id)
        return await self._t.unary(self._stub.GetPolicyBundle, request)

    async def put(
        self,
        bundle_id: str,
        content: str,
        *,
        enabled: bool | None = None,
        author: str = "",
        message: str = "",
    ) -> policy_pb2.PolicyBundle:
        """Create or update a draft bundle (YAML in upstream's safety-policy format).
        ``enabled=None`` keeps the stored flag (true for a new bundle)."""
        request = _put_request(bundle_id, content, enabled, author, message)
        return await self._t.unary(self._stub.PutPolicyBundle, request)

    async def delete(self, bundle_id: str) -> None:
        request = P.DeletePolicyBundleRequest(bundle_id=bundle_id)
        await self._t.unary(self._stub.DeletePolicyBundle, request)

    async def simulate(
        self, bundle_id: str, *, content: str | None = None, **fields: Unpack[PolicyCheckFields]
    ) -> Decision:
        """Evaluate a request with a draft of ``bundle_id`` in place of the stored one:
        ``content`` when given, else the stored draft."""
        request = _simulate_bundle_request(bundle_id, content, fields)
        return await self._t.unary(self._stub.SimulatePolicyBundle, request)


class AsyncPolicyClient:
    def __init__(self, transport: AioTransport) -> None:
        self._t = transport
        self.bundles = AsyncPolicyBundlesClient(transport)

    @property
    def _stub(self) -> policy_service_pb2_grpc.PolicyServiceAsyncStub:
        # On a grpc.aio channel the generated stub's methods are awaitable (see the .pyi).
        return cast("policy_service_pb2_grpc.PolicyServiceAsyncStub", self._t.stub(Stub))

    async def evaluate(self, **fields: Unpack[PolicyCheckFields]) -> Decision:
        """The enforced policy's decision, recorded like a real check."""
        return await self._t.unary(self._stub.EvaluatePolicy, check_input(fields))

    async def simulate(self, **fields: Unpack[PolicyCheckFields]) -> Decision:
        """The enforced policy's decision, without side effects (no cache, no record)."""
        return await self._t.unary(self._stub.SimulatePolicy, check_input(fields))

    async def explain(self, **fields: Unpack[PolicyCheckFields]) -> P.ExplainPolicyResponse:
        """The decision and how each rule fared, up to the one that decided."""
        return await self._t.unary(self._stub.ExplainPolicy, check_input(fields))

    async def snapshots(self) -> builtins.list[str]:
        """Policy snapshots the safety kernel has loaded, newest first."""
        reply = await self._t.unary(self._stub.ListPolicySnapshots, P.ListPolicySnapshotsRequest())
        return builtins.list(reply.snapshots)

    async def rules(self, *, include_disabled: bool = False) -> P.ListPolicyRulesResponse:
        """Every rule of every bundle, and the bundles that failed to load."""
        request = P.ListPolicyRulesRequest(include_disabled=include_disabled)
        return await self._t.unary(self._stub.ListPolicyRules, request)

    async def publish(
        self,
        *,
        bundle_ids: Iterable[str] | None = None,
        author: str = "",
        message: str = "",
        note: str = "",
    ) -> P.PublishPolicyResponse:
        """Publish the enabled bundles (or ``bundle_ids``) as a new immutable version; every
        safety-kernel replica reloads it."""
        request = _publish_request(bundle_ids, author, message, note)
        return await self._t.unary(self._stub.PublishPolicy, request)

    async def rollback(
        self,
        *,
        version: int | None = None,
        snapshot_id: str | None = None,
        author: str = "",
        message: str = "",
        note: str = "",
    ) -> P.RollbackPolicyResponse:
        """Publish a copy of an earlier version, named by number or snapshot id."""
        request = _rollback_request(version, snapshot_id, author, message, note)
        return await self._t.unary(self._stub.RollbackPolicy, request)

    async def versions_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> P.ListPolicyVersionsResponse:
        request = P.ListPolicyVersionsRequest(page_size=page_size or 0, page_token=page_token)
        return await self._t.unary(self._stub.ListPolicyVersions, request)

    def versions(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> AsyncIterator[policy_pb2.PolicyVersion]:
        """Every published version, following page tokens."""

        async def fetch(token: str, size: int | None) -> P.ListPolicyVersionsResponse:
            return await self.versions_page(page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.versions, page_size=page_size, limit=limit)

    async def version(self, version: int) -> policy_pb2.PolicyVersion:
        request = P.GetPolicyVersionRequest(version=version)
        return await self._t.unary(self._stub.GetPolicyVersion, request)

    async def audit_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> P.ListPolicyAuditResponse:
        request = P.ListPolicyAuditRequest(page_size=page_size or 0, page_token=page_token)
        return await self._t.unary(self._stub.ListPolicyAudit, request)

    def audit(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> AsyncIterator[policy_pb2.PolicyAuditEntry]:
        """Every change to the policy (who, when, what), newest first."""

        async def fetch(token: str, size: int | None) -> P.ListPolicyAuditResponse:
            return await self.audit_page(page_size=size, page_token=token)

        return apaginate(fetch, lambda p: p.entries, page_size=page_size, limit=limit)

    async def replay(
        self,
        *,
        bundles: Mapping[str, str] | None = None,
        remove_bundle_ids: Iterable[str] = (),
        limit: int | None = None,
    ) -> P.ReplayPolicyResponse:
        """Replay the last ``limit`` recorded decisions under the published policy with
        ``bundles`` (id → YAML) laid over it and ``remove_bundle_ids`` left out, and report
        the decisions that would change."""
        request = _replay_request(bundles, remove_bundle_ids, limit)
        return await self._t.unary(self._stub.ReplayPolicy, request)


class PolicyBundlesClient:
    """The blocking twin of :class:`AsyncPolicyBundlesClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def list_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> P.ListPolicyBundlesResponse:
        request = P.ListPolicyBundlesRequest(page_size=page_size or 0, page_token=page_token)
        return self._t.unary(self._stub.ListPolicyBundles, request)

    def list(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> Iterator[policy_pb2.PolicyBundle]:
        def fetch(token: str, size: int | None) -> P.ListPolicyBundlesResponse:
            return self.list_page(page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.bundles, page_size=page_size, limit=limit)

    def get(self, bundle_id: str) -> policy_pb2.PolicyBundle:
        request = P.GetPolicyBundleRequest(bundle_id=bundle_id)
        return self._t.unary(self._stub.GetPolicyBundle, request)

    def put(
        self,
        bundle_id: str,
        content: str,
        *,
        enabled: bool | None = None,
        author: str = "",
        message: str = "",
    ) -> policy_pb2.PolicyBundle:
        request = _put_request(bundle_id, content, enabled, author, message)
        return self._t.unary(self._stub.PutPolicyBundle, request)

    def delete(self, bundle_id: str) -> None:
        self._t.unary(
            self._stub.DeletePolicyBundle, P.DeletePolicyBundleRequest(bundle_id=bundle_id)
        )

    def simulate(
        self, bundle_id: str, *, content: str | None = None, **fields: Unpack[PolicyCheckFields]
    ) -> Decision:
        request = _simulate_bundle_request(bundle_id, content, fields)
        return self._t.unary(self._stub.SimulatePolicyBundle, request)


class PolicyClient:
    """The blocking twin of :class:`AsyncPolicyClient`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport
        self.bundles = PolicyBundlesClient(transport)

    @property
    def _stub(self) -> Stub:
        return self._t.stub(Stub)

    def evaluate(self, **fields: Unpack[PolicyCheckFields]) -> Decision:
        return self._t.unary(self._stub.EvaluatePolicy, check_input(fields))

    def simulate(self, **fields: Unpack[PolicyCheckFields]) -> Decision:
        return self._t.unary(self._stub.SimulatePolicy, check_input(fields))

    def explain(self, **fields: Unpack[PolicyCheckFields]) -> P.ExplainPolicyResponse:
        return self._t.unary(self._stub.ExplainPolicy, check_input(fields))

    def snapshots(self) -> builtins.list[str]:
        reply = self._t.unary(self._stub.ListPolicySnapshots, P.ListPolicySnapshotsRequest())
        return builtins.list(reply.snapshots)

    def rules(self, *, include_disabled: bool = False) -> P.ListPolicyRulesResponse:
        request = P.ListPolicyRulesRequest(include_disabled=include_disabled)
        return self._t.unary(self._stub.ListPolicyRules, request)

    def publish(
        self,
        *,
        bundle_ids: Iterable[str] | None = None,
        author: str = "",
        message: str = "",
        note: str = "",
    ) -> P.PublishPolicyResponse:
        request = _publish_request(bundle_ids, author, message, note)
        return self._t.unary(self._stub.PublishPolicy, request)

    def rollback(
        self,
        *,
        version: int | None = None,
        snapshot_id: str | None = None,
        author: str = "",
        message: str = "",
        note: str = "",
    ) -> P.RollbackPolicyResponse:
        request = _rollback_request(version, snapshot_id, author, message, note)
        return self._t.unary(self._stub.RollbackPolicy, request)

    def versions_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> P.ListPolicyVersionsResponse:
        request = P.ListPolicyVersionsRequest(page_size=page_size or 0, page_token=page_token)
        return self._t.unary(self._stub.ListPolicyVersions, request)

    def versions(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> Iterator[policy_pb2.PolicyVersion]:
        def fetch(token: str, size: int | None) -> P.ListPolicyVersionsResponse:
            return self.versions_page(page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.versions, page_size=page_size, limit=limit)

    def version(self, version: int) -> policy_pb2.PolicyVersion:
        request = P.GetPolicyVersionRequest(version=version)
        return self._t.unary(self._stub.GetPolicyVersion, request)

    def audit_page(
        self, *, page_size: int | None = None, page_token: str = ""
    ) -> P.ListPolicyAuditResponse:
        request = P.ListPolicyAuditRequest(page_size=page_size or 0, page_token=page_token)
        return self._t.unary(self._stub.ListPolicyAudit, request)

    def audit(
        self, *, page_size: int | None = None, limit: int | None = None
    ) -> Iterator[policy_pb2.PolicyAuditEntry]:
        def fetch(token: str, size: int | None) -> P.ListPolicyAuditResponse:
            return self.audit_page(page_size=size, page_token=token)

        return paginate(fetch, lambda p: p.entries, page_size=page_size, limit=limit)

    def replay(
        self,
        *,
        bundles: Mapping[str, str] | None = None,
        remove_bundle_ids: Iterable[str] = (),
        limit: int | None = None,
    ) -> P.ReplayPolicyResponse:
        request = _replay_request(bundles, remove_bundle_ids, limit)
        return self._t.unary(self._stub.ReplayPolicy, request)
