"""PolicyService over gRPC: proto in, policy admin / evaluator call, proto out."""

from __future__ import annotations

import grpc

from cordum.agent.v1 import safety_pb2
from cordum.server.api.metadata import caller
from cordum.server.services.policy_admin import PolicyAdmin
from cordum.server.services.policy_eval import PolicyEvaluator
from cordum.v1 import policy_pb2, policy_service_pb2, policy_service_pb2_grpc

Ctx = grpc.aio.ServicerContext
S = policy_service_pb2


class PolicyServicer(policy_service_pb2_grpc.PolicyServiceServicer):
    def __init__(self, admin: PolicyAdmin, evaluator: PolicyEvaluator) -> None:
        self._admin = admin
        self._eval = evaluator

    # -- asking the policy -----------------------------------------------------------------

    async def EvaluatePolicy(
        self, request: policy_pb2.PolicyCheckInput, context: Ctx
    ) -> safety_pb2.PolicyCheckResponse:
        return await self._eval.evaluate(request, caller(context))

    async def SimulatePolicy(
        self, request: policy_pb2.PolicyCheckInput, context: Ctx
    ) -> safety_pb2.PolicyCheckResponse:
        return await self._eval.simulate(request, caller(context))

    async def ExplainPolicy(
        self, request: policy_pb2.PolicyCheckInput, context: Ctx
    ) -> S.ExplainPolicyResponse:
        return await self._eval.explain(request, caller(context))

    async def SimulatePolicyBundle(
        self, request: S.SimulatePolicyBundleRequest, context: Ctx
    ) -> safety_pb2.PolicyCheckResponse:
        return await self._eval.simulate_bundle(
            request.bundle_id,
            request.request if request.HasField("request") else None,
            request.content,
            caller(context),
        )

    async def ReplayPolicy(
        self, request: S.ReplayPolicyRequest, context: Ctx
    ) -> S.ReplayPolicyResponse:
        result = await self._eval.replay(
            dict(request.bundles), list(request.remove_bundle_ids), request.limit
        )
        return S.ReplayPolicyResponse(
            replayed=result.replayed,
            unchanged=result.unchanged,
            changes=result.changes,
            candidate_snapshot=result.candidate_snapshot,
        )

    # -- snapshots and rules ---------------------------------------------------------------

    async def ListPolicySnapshots(
        self, request: S.ListPolicySnapshotsRequest, context: Ctx
    ) -> S.ListPolicySnapshotsResponse:
        return S.ListPolicySnapshotsResponse(snapshots=self._admin.snapshots())

    async def ListPolicyRules(
        self, request: S.ListPolicyRulesRequest, context: Ctx
    ) -> S.ListPolicyRulesResponse:
        rules, errors = await self._admin.rules(request.include_disabled)
        return S.ListPolicyRulesResponse(rules=rules, errors=errors)

    # -- bundles ---------------------------------------------------------------------------

    async def ListPolicyBundles(
        self, request: S.ListPolicyBundlesRequest, context: Ctx
    ) -> S.ListPolicyBundlesResponse:
        bundles, token = await self._admin.list_bundles(request.page_size, request.page_token)
        return S.ListPolicyBundlesResponse(bundles=bundles, next_page_token=token)

    async def GetPolicyBundle(
        self, request: S.GetPolicyBundleRequest, context: Ctx
    ) -> policy_pb2.PolicyBundle:
        return await self._admin.get_bundle(request.bundle_id)

    async def PutPolicyBundle(
        self, request: S.PutPolicyBundleRequest, context: Ctx
    ) -> policy_pb2.PolicyBundle:
        return await self._admin.put_bundle(
            request.bundle_id,
            request.content,
            request.enabled if request.HasField("enabled") else None,
            request.author,
            request.message,
            caller(context),
        )

    async def DeletePolicyBundle(
        self, request: S.DeletePolicyBundleRequest, context: Ctx
    ) -> S.DeletePolicyBundleResponse:
        await self._admin.delete_bundle(request.bundle_id, caller(context))
        return S.DeletePolicyBundleResponse()

    # -- versions and audit ----------------------------------------------------------------

    async def PublishPolicy(
        self, request: S.PublishPolicyRequest, context: Ctx
    ) -> S.PublishPolicyResponse:
        done = await self._admin.publish(
            list(request.bundle_ids),
            request.author,
            request.message,
            request.note,
            caller(context),
        )
        return S.PublishPolicyResponse(
            snapshot_before=done.snapshot_before,
            snapshot_after=done.snapshot_after,
            published=done.published,
            version=done.version,
        )

    async def RollbackPolicy(
        self, request: S.RollbackPolicyRequest, context: Ctx
    ) -> S.RollbackPolicyResponse:
        done, target = await self._admin.rollback(
            request.version,
            request.snapshot_id,
            request.author,
            request.message,
            request.note,
            caller(context),
        )
        return S.RollbackPolicyResponse(
            snapshot_before=done.snapshot_before,
            snapshot_after=done.snapshot_after,
            rollback_to=target,
            version=done.version,
        )

    async def ListPolicyVersions(
        self, request: S.ListPolicyVersionsRequest, context: Ctx
    ) -> S.ListPolicyVersionsResponse:
        versions, token = await self._admin.list_versions(request.page_size, request.page_token)
        return S.ListPolicyVersionsResponse(versions=versions, next_page_token=token)

    async def GetPolicyVersion(
        self, request: S.GetPolicyVersionRequest, context: Ctx
    ) -> policy_pb2.PolicyVersion:
        return await self._admin.get_version(request.version)

    async def ListPolicyAudit(
        self, request: S.ListPolicyAuditRequest, context: Ctx
    ) -> S.ListPolicyAuditResponse:
        entries, token = await self._admin.list_audit(request.page_size, request.page_token)
        return S.ListPolicyAuditResponse(entries=entries, next_page_token=token)
