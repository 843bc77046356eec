"""Who may call what: the one table mapping every RPC to the least access it needs.

Access levels, each including the ones before it:

- `viewer`: reads (get, list, watch, stream, status, evaluate/explain/simulate, validate,
  timelines, results, decisions, traces, memory reads);
- `operator`: work on the caller's tenant (submit, cancel, remediate, approvals, run
  start/cancel/rerun and step approvals, locks, artifact writes, DLQ retry, the context engine);
- `admin`: administration of the caller's tenant (workflow definitions, tenant config
  documents, deletes of runs, DLQ entries and artifacts);
- `platform`: changes to what every tenant shares (policy bundles, publish, rollback and
  replay; the system config document and config reload; the schema registry). Needs an
  admin key for every tenant (tenant `*`): a tenant's own admin cannot change another
  tenant's policy.

`OPEN` methods (gRPC health and reflection) need no key at all. A method missing from the
table is treated as `platform` (fail closed) and logged; `tests/unit/test_auth_role_table.py`
fails when an RPC in the contract has no row here, so add one with every new RPC.
"""

from __future__ import annotations

from typing import Final

VIEWER: Final = "viewer"
OPERATOR: Final = "operator"
ADMIN: Final = "admin"
PLATFORM: Final = "platform"

# The roles a key can have (platform is admin + every tenant, not a role of its own).
ROLES: Final = (VIEWER, OPERATOR, ADMIN)
RANK: Final = {VIEWER: 1, OPERATOR: 2, ADMIN: 3, PLATFORM: 3}

# Method-path prefixes served without a key: load balancers and tooling need them, and they
# reveal nothing beyond the public contract.
OPEN_PREFIXES: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_TABLE: Final[dict[str, dict[str, str]]] = {
    "cordum.v1.ApprovalService": {
        "ListApprovals": VIEWER,
        "ApproveJob": OPERATOR,
        "RejectJob": OPERATOR,
    },
    "cordum.v1.ArtifactService": {
        "PutArtifact": OPERATOR,
        "GetArtifact": VIEWER,
        "UploadArtifact": OPERATOR,
        "DownloadArtifact": VIEWER,
        "DeleteArtifact": ADMIN,
        "ListArtifacts": VIEWER,
    },
    "cordum.v1.ConfigService": {
        "GetConfig": VIEWER,
        # The system scope needs `platform` too: checked by the config service.
        "SetConfig": ADMIN,
        "GetEffectiveConfig": VIEWER,
        "ReloadConfig": PLATFORM,
    },
    "cordum.v1.ContextEngine": {
        "BuildWindow": OPERATOR,
        "UpdateMemory": OPERATOR,
    },
    "cordum.v1.DLQService": {
        "ListDLQEntries": VIEWER,
        "GetDLQEntry": VIEWER,
        "DeleteDLQEntry": ADMIN,
        "RetryDLQEntry": OPERATOR,
    },
    "cordum.v1.EventService": {
        "StreamEvents": VIEWER,
    },
    "cordum.v1.JobService": {
        "SubmitJob": OPERATOR,
        "BatchSubmitJobs": OPERATOR,
        "SubmitJobAndWait": OPERATOR,
        "GetJob": VIEWER,
        "ListJobs": VIEWER,
        "CancelJob": OPERATOR,
        "GetJobResult": VIEWER,
        "ListJobDecisions": VIEWER,
        "RemediateJob": OPERATOR,
        "GetTrace": VIEWER,
        "WatchJob": VIEWER,
    },
    "cordum.v1.LockService": {
        "AcquireLock": OPERATOR,
        "ReleaseLock": OPERATOR,
        "RenewLock": OPERATOR,
        "GetLock": VIEWER,
        "ListLocks": VIEWER,
    },
    "cordum.v1.MemoryService": {
        "ReadMemory": VIEWER,
    },
    "cordum.v1.PolicyService": {
        "EvaluatePolicy": VIEWER,
        "SimulatePolicy": VIEWER,
        "ExplainPolicy": VIEWER,
        "ListPolicySnapshots": VIEWER,
        "ListPolicyRules": VIEWER,
        "ListPolicyBundles": VIEWER,
        "GetPolicyBundle": VIEWER,
        "PutPolicyBundle": PLATFORM,
        "DeletePolicyBundle": PLATFORM,
        "SimulatePolicyBundle": VIEWER,
        # Replays recorded decisions of every tenant: platform data.
        "ReplayPolicy": PLATFORM,
        "PublishPolicy": PLATFORM,
        "RollbackPolicy": PLATFORM,
        "ListPolicyVersions": VIEWER,
        "GetPolicyVersion": VIEWER,
        "ListPolicyAudit": VIEWER,
    },
    "cordum.v1.RunService": {
        "StartRun": OPERATOR,
        "GetRun": VIEWER,
        "ListRuns": VIEWER,
        "CancelRun": OPERATOR,
        "RerunRun": OPERATOR,
        "DeleteRun": ADMIN,
        "GetRunTimeline": VIEWER,
        "ApproveStep": OPERATOR,
        "RejectStep": OPERATOR,
        "WatchRun": VIEWER,
    },
    "cordum.v1.SchemaService": {
        "RegisterSchema": PLATFORM,
        "GetSchema": VIEWER,
        "ListSchemas": VIEWER,
        "DeleteSchema": PLATFORM,
        "ValidateDocument": VIEWER,
    },
    "cordum.v1.StatusService": {
        # Not open: the status names the NATS URL and dependency errors.
        "GetStatus": VIEWER,
        "ListWorkers": VIEWER,
    },
    "cordum.v1.WorkflowService": {
        "UpsertWorkflow": ADMIN,
        "ValidateWorkflow": VIEWER,
        "GetWorkflow": VIEWER,
        "ListWorkflows": VIEWER,
        "DeleteWorkflow": ADMIN,
    },
    "cordum.agent.v1.SafetyKernel": {
        # Check records the decision for ReplayPolicy (the scheduler's call); the others
        # only answer.
        "Check": OPERATOR,
        "Evaluate": VIEWER,
        "Explain": VIEWER,
        "Simulate": VIEWER,
        "ListSnapshots": VIEWER,
    },
}

# "/package.Service/Method" -> access level.
METHOD_ACCESS: Final[dict[str, str]] = {
    f"/{service}/{method}": level
    for service, methods in _TABLE.items()
    for method, level in methods.items()
}


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


def access_for(method: str) -> str | None:
    """The access `method` needs: None when it is open, `platform` when it is unknown."""
    if is_open(method):
        return None
    return METHOD_ACCESS.get(method, PLATFORM)


def allows(role: str, all_tenants: bool, needed: str) -> bool:
    """Whether a key with `role` (for every tenant, or for one) may call at `needed`."""
    if RANK.get(role, 0) < RANK[needed]:
        return False
    return needed != PLATFORM or all_tenants
