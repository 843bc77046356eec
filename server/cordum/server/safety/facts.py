"""What the policy can see of a request, normalised once per evaluation.

Every rule compares against these pre-trimmed, pre-lower-cased values, so a request is
normalised once instead of once per rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from cordum.agent.v1 import job_pb2, safety_pb2

# Upstream reads MCP fields from these labels, first non-blank wins.
_MCP_SERVER = ("mcp.server", "mcp_server", "mcpServer")
_MCP_TOOL = ("mcp.tool", "mcp_tool", "mcpTool")
_MCP_RESOURCE = ("mcp.resource", "mcp_resource", "mcpResource")
_MCP_ACTION = ("mcp.action", "mcp_action", "mcpAction")
_REPO_HOST_LABELS = ("repo.host", "repo_host", "repoHost")
_MCP_KEY_SET = frozenset(_MCP_SERVER + _MCP_TOOL + _MCP_RESOURCE + _MCP_ACTION)
_REPO_HOST_KEY_SET = frozenset(_REPO_HOST_LABELS)
_TRUE_WORDS = frozenset({"true", "1", "yes"})
_ACTOR_TYPES: Mapping[int, str] = MappingProxyType(
    {job_pb2.ACTOR_TYPE_HUMAN: "human", job_pb2.ACTOR_TYPE_SERVICE: "service"}
)
DEFAULT_TENANT = "default"


class McpRequest(NamedTuple):
    server: str = ""
    tool: str = ""
    resource: str = ""
    action: str = ""

    @property
    def used(self) -> bool:
        return bool(self.server or self.tool or self.resource or self.action)


def norm(value: str) -> str:
    """The form list comparisons use: trimmed and lower-cased (upstream's EqualFold+Trim)."""
    return value.strip().lower()


def first_label(labels: Any, keys: tuple[str, ...]) -> str:
    for key in keys:
        value = labels.get(key)
        if value is not None:
            value = value.strip()
            if value:
                return value
    return ""


def extract_mcp(labels: Any) -> McpRequest:
    if not labels:
        return McpRequest()
    return McpRequest(
        server=first_label(labels, _MCP_SERVER),
        tool=first_label(labels, _MCP_TOOL),
        resource=first_label(labels, _MCP_RESOURCE),
        action=first_label(labels, _MCP_ACTION).lower(),
    )


def resolve_tenant(request: safety_pb2.PolicyCheckRequest, default_tenant: str) -> str:
    """request.tenant → meta.tenant_id → policy default_tenant → `default`."""
    tenant = request.tenant.strip()
    if not tenant and request.HasField("meta"):
        tenant = request.meta.tenant_id.strip()
    return tenant or default_tenant.strip() or DEFAULT_TENANT


def secrets_flag(labels: Any, risk_tags: frozenset[str]) -> bool:
    """Label `secrets_present` decides when non-blank; else a `secrets` risk tag does."""
    value = labels.get("secrets_present")
    if value is not None and value.strip():
        return value.strip().lower() in _TRUE_WORDS
    return "secrets" in risk_tags


@dataclass(slots=True)
class Facts:
    request: safety_pb2.PolicyCheckRequest
    topic: str
    tenant: str
    tenant_key: str
    labels: dict[str, str]
    capability: str
    risk_tags: frozenset[str]
    requires: frozenset[str]
    pack_id: str
    actor_id: str
    actor_type: str
    secrets_present: bool
    mcp: McpRequest
    repo_host: str
    # The CEL activation is built on first use only: most requests reach no CEL rule.
    cel_context: Any = field(default=None)


def _norm_set(values: Any) -> frozenset[str]:
    # Blank entries are dropped: upstream never matches an empty value against anything.
    if not values:
        return frozenset()
    return frozenset(n for n in (v.strip().lower() for v in values) if n)


def build_facts(request: safety_pb2.PolicyCheckRequest, topic: str, tenant: str) -> Facts:
    labels = dict(request.labels)
    principal = request.principal_id
    if request.HasField("meta"):
        meta = request.meta
        capability = meta.capability
        capability = capability.strip().lower() if capability else ""
        risk_tags = _norm_set(meta.risk_tags)
        requires = _norm_set(meta.requires)
        pack_id = meta.pack_id
        pack_id = pack_id.strip().lower() if pack_id else ""
        actor_id = (meta.actor_id or principal).strip().lower()
        actor_type = _ACTOR_TYPES.get(meta.actor_type, "")
    else:
        capability = pack_id = actor_type = ""
        risk_tags = requires = frozenset()
        actor_id = principal.strip().lower()
    # Most jobs carry neither MCP nor repo labels: one set test skips both lookups.
    mcp = McpRequest()
    repo_host = ""
    if labels:
        if not _MCP_KEY_SET.isdisjoint(labels):
            mcp = extract_mcp(labels)
        if not _REPO_HOST_KEY_SET.isdisjoint(labels):
            repo_host = first_label(labels, _REPO_HOST_LABELS)
    return Facts(
        request=request,
        topic=topic,
        tenant=tenant,
        tenant_key=tenant.lower(),
        labels=labels,
        capability=capability,
        risk_tags=risk_tags,
        requires=requires,
        pack_id=pack_id,
        actor_id=actor_id,
        actor_type=actor_type,
        secrets_present=secrets_flag(labels, risk_tags),
        mcp=mcp,
        repo_host=repo_host,
    )
