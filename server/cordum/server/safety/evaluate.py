"""Deciding one request against a PolicySet: upstream's algorithm with its holes closed.

Order of evaluation:

1. Tenant = `tenant` → `meta.tenant_id` → policy `default_tenant` → `default`.
2. Empty topic → DENY `missing topic`; a topic not under `job.` → DENY `unsupported topic`
   (neither carries a snapshot or rule id).
3. Tenant gate, when `tenants.<tenant>` exists: a `deny_topics` match → DENY; a non-empty
   `allow_topics` the topic misses → DENY; a `repo.host` label (also `repo_host`,
   `repoHost`) in `denied_repo_hosts`, or outside a non-empty `allowed_repo_hosts` → DENY.
4. Rules in order, first match wins (cheap conditions first, CEL last); no match → ALLOW
   (rule id `legacy:<tenant>:allow:<n>` when a tenant `allow_topics` entry admitted it).
5. Tenant MCP lists: a violation forces DENY with the MCP reason (rule id, constraints and
   remediations of the matched rule are kept, as upstream).
6. Decision mapping; `allow` with constraints → ALLOW_WITH_CONSTRAINTS; tenant
   `max_concurrent_jobs` → `constraints.budgets.max_concurrent_jobs` on allow decisions.
7. Effective config (`effective_config` JSON, `safety` at the top or under `data.safety`):
   `denied_topics`, `allowed_topics`, `denied_repo_hosts`/`allowed_repo_hosts`, `mcp`; each
   violation forces DENY, the last one's reason wins; applied after everything above.
8. `approval_required`/`approval_ref` (= job id) when the final decision is REQUIRE_HUMAN.
9. THROTTLE: the retry delay (rule `retry_after_ms`, default 5000) is appended to the reason
   as ` (retry_after_ms=<n>)` and exposed as `Evaluation.retry_after_ms`.

Differences from upstream (deliberate):

- Tenant `allow_topics`/`deny_topics` always apply. Upstream dropped them as soon as any
  source had `rules` (so one pack overlay silently disabled every tenant deny list), and its
  `allow_topics` never denied anything. Here `deny_topics` deny before rules and a non-empty
  `allow_topics` is a real allowlist (`topic "X" not allowed for tenant "T"`).
- A rule whose `match.mcp` has any non-empty list no longer matches requests without MCP
  labels (upstream: "satisfied automatically", so an mcp-only rule matched every job).
- `allowed_repo_hosts`/`denied_repo_hosts` (tenant and effective config) are enforced
  against the job's repo-host label when present, and tenant `max_concurrent_jobs` reaches
  the scheduler as a constraint; upstream parsed and merged them but never used them.
- `approval_required` is set only when the final decision is REQUIRE_HUMAN. Upstream also
  set it when a require_approval rule's decision was overridden to DENY (MCP lists,
  effective config), producing a DENY that claims to need approval.
- The `secrets_present` label is compared case-insensitively for all of `true`/`1`/`yes`
  (upstream: only `yes` case-insensitively, so `TRUE` read as false).
- Topic globs that are malformed or empty are load errors (upstream: silently never match).
  Effective-config globs arrive per request, so there they still simply never match.
- CEL conditions (`match.cel`) and `retry_after_ms` are extensions; Explain returns
  per-rule traces and override notes (upstream's Explain was identical to Check).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cordum.agent.v1 import safety_pb2
from cordum.server.safety import glob
from cordum.server.safety.celexpr import CelEvalError, CelExpression, Needs, activation
from cordum.server.safety.facts import Facts, build_facts, norm, resolve_tenant
from cordum.server.safety.model import (
    Decision,
    McpPolicy,
    Policy,
    PolicySet,
    Rule,
    TenantPolicy,
    quote,
)
from cordum.v1 import policy_pb2

logger = logging.getLogger(__name__)

PROTO_DECISION: Mapping[Decision, int] = MappingProxyType(
    {
        Decision.ALLOW: safety_pb2.DECISION_TYPE_ALLOW,
        Decision.DENY: safety_pb2.DECISION_TYPE_DENY,
        Decision.REQUIRE_APPROVAL: safety_pb2.DECISION_TYPE_REQUIRE_HUMAN,
        Decision.ALLOW_WITH_CONSTRAINTS: safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS,
        Decision.THROTTLE: safety_pb2.DECISION_TYPE_THROTTLE,
    }
)
_ALLOWING = (safety_pb2.DECISION_TYPE_ALLOW, safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS)
_RETRY_AFTER = re.compile(r"\(retry_after_ms=(\d+)\)\s*$")


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """How one rule fared, for Explain (`cordum.v1.RuleEvaluation`)."""

    rule_id: str
    source: str
    matched: bool
    decision: int
    detail: str

    def to_proto(self) -> policy_pb2.RuleEvaluation:
        return policy_pb2.RuleEvaluation(
            rule_id=self.rule_id,
            source=self.source,
            matched=self.matched,
            decision=self.decision,  # type: ignore[arg-type]
            detail=self.detail,
        )


@dataclass(slots=True)
class Evaluation:
    response: safety_pb2.PolicyCheckResponse
    # The rule that decided (None: tenant gate, no match, or topic checks).
    rule: Rule | None = None
    # Set for THROTTLE: how long the scheduler should wait before asking again.
    retry_after_ms: int | None = None
    # Explain only: every rule in order, and what overrode or shaped the decision.
    rules: list[RuleTrace] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def with_retry_after(reason: str, retry_after_ms: int) -> str:
    return f"{reason or 'throttled'} (retry_after_ms={retry_after_ms})"


def retry_after_ms(response: safety_pb2.PolicyCheckResponse) -> int | None:
    """The THROTTLE retry delay carried in the reason, or None (e.g. upstream's kernel)."""
    if response.decision != safety_pb2.DECISION_TYPE_THROTTLE:
        return None
    found = _RETRY_AFTER.search(response.reason)
    return int(found.group(1)) if found else None


def evaluate(
    policy_set: PolicySet, request: safety_pb2.PolicyCheckRequest, *, explain: bool = False
) -> Evaluation:
    """Decide `request`. Never raises for anything a request can contain."""
    policy = policy_set.policy
    out = Evaluation(safety_pb2.PolicyCheckResponse())
    resp = out.response
    notes = out.notes if explain else None
    topic = request.topic.strip()
    tenant = resolve_tenant(request, policy.default_tenant)
    if not topic or not topic.startswith("job."):
        resp.decision = safety_pb2.DECISION_TYPE_DENY
        resp.reason = "missing topic" if not topic else "unsupported topic"
        if notes is not None:
            notes.append(f"{resp.reason}: rejected before any policy is consulted")
        return out

    f = build_facts(request, topic, tenant)
    tenant_policy = policy.tenants.get(tenant)
    gate: tuple[str, str] | None = None
    legacy_allow_id = ""
    if tenant_policy is not None:
        gate, legacy_allow_id = _tenant_gate(tenant_policy, tenant, f, notes)

    winner: Rule | None = None
    if gate is None or explain:
        winner = _first_match(policy, f, out.rules if explain else None, gate)

    resp.policy_snapshot = policy_set.snapshot
    if gate is not None:
        resp.rule_id, reason = gate
        decision = Decision.DENY
        if explain:
            trace = RuleTrace(
                gate[0], f"tenants.{tenant}", True, safety_pb2.DECISION_TYPE_DENY, reason
            )
            out.rules.insert(0, trace)
        winner = None
    elif winner is not None:
        resp.rule_id = winner.id
        decision, reason = winner.decision, winner.reason
    else:
        resp.rule_id = legacy_allow_id
        decision, reason = Decision.ALLOW, ""
        if notes is not None:
            via = f" via tenant allow_topics ({legacy_allow_id})" if legacy_allow_id else ""
            notes.append(f"no rule matched: allowed by default{via}")

    if tenant_policy is not None and gate is None:
        violation = tenant_policy.mcp.violation(f.mcp)
        if violation is not None:
            decision, reason = Decision.DENY, violation
            if notes is not None:
                notes.append(f"tenant {quote(tenant)} MCP lists override to DENY: {violation}")

    if winner is not None:
        out.rule = winner
        if winner.proto_constraints is not None:
            resp.constraints.CopyFrom(winner.proto_constraints)
        resp.remediations.extend(winner.proto_remediations)

    kind = PROTO_DECISION[decision]
    if kind == safety_pb2.DECISION_TYPE_ALLOW and resp.HasField("constraints"):
        kind = safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS
    if kind not in _ALLOWING:
        resp.reason = reason
    elif tenant_policy is not None and tenant_policy.max_concurrent_jobs > 0:
        kind = _apply_tenant_limit(resp, tenant_policy.max_concurrent_jobs)
        if notes is not None:
            notes.append(
                f"tenant {quote(tenant)} max_concurrent_jobs="
                f"{tenant_policy.max_concurrent_jobs} applied as a budget constraint"
            )
    resp.decision = kind  # type: ignore[assignment]

    if request.effective_config:
        _apply_effective_config(request.effective_config, f, resp, notes)

    if resp.decision == safety_pb2.DECISION_TYPE_REQUIRE_HUMAN:
        resp.approval_required = True
        resp.approval_ref = request.job_id
    elif resp.decision == safety_pb2.DECISION_TYPE_THROTTLE and winner is not None:
        out.retry_after_ms = winner.retry_after_ms
        resp.reason = with_retry_after(resp.reason, winner.retry_after_ms)
    return out


def _tenant_gate(
    tp: TenantPolicy, tenant: str, f: Facts, notes: list[str] | None
) -> tuple[tuple[str, str] | None, str]:
    """(rule id, reason) of a tenant-level denial, and the legacy allow rule id if any."""
    topic = f.topic
    for i, g in enumerate(tp.deny_globs, 1):
        if g.match(topic):
            reason = f"topic {quote(g.pattern)} denied by tenant policy"
            if notes is not None:
                notes.append(f"tenant {quote(tenant)} deny_topics[{i - 1}]: {reason}")
            return (f"legacy:{tenant}:deny:{i}", reason), ""
    allow_id = ""
    if tp.allow_globs:
        for i, g in enumerate(tp.allow_globs, 1):
            if g.match(topic):
                allow_id = f"legacy:{tenant}:allow:{i}"
                break
        else:
            reason = f"topic {quote(topic)} not allowed for tenant {quote(tenant)}"
            if notes is not None:
                notes.append(f"tenant allow_topics {list(tp.allow_topics)}: {reason}")
            return (f"legacy:{tenant}:allow_topics", reason), ""
    host = f.repo_host
    if host:
        reason = _repo_host_violation(
            host, tp.allowed_repo_hosts, tp.allowed_hosts, tp.denied_hosts
        )
        if reason is not None:
            reason = f"{reason} for tenant {quote(tenant)}"
            if notes is not None:
                notes.append(reason)
            return (f"legacy:{tenant}:repo_host", reason), ""
    return None, allow_id


def _repo_host_violation(
    host: str, allowed_raw: Any, allowed: frozenset[str], denied: frozenset[str]
) -> str | None:
    key = norm(host)
    if key in denied:
        return f"repo host {quote(host)} denied"
    if allowed_raw and key not in allowed:
        return f"repo host {quote(host)} not allowed"
    return None


def _first_match(
    policy: Policy, f: Facts, traces: list[RuleTrace] | None, gate: tuple[str, str] | None
) -> Rule | None:
    winner: Rule | None = None
    needs = policy.cel_needs
    for rule in policy.rules:
        m = rule.match
        failure = m.first_failure(f)
        cel_detail = ""
        if failure is None and m.cel is not None:
            ok, cel_detail = _cel(m.cel, f, needs)
            if not ok:
                failure = "cel"
        if traces is None:
            if failure is None:
                return rule
            continue
        if failure is None:
            detail = m.describe_success()
            if winner is not None:
                detail += f"; not decisive: rule {winner.label} matched first"
            elif gate is not None:
                detail += f"; not decisive: tenant policy denied first ({gate[0]})"
            else:
                winner = rule
        else:
            detail = cel_detail if failure == "cel" else m.describe_failure(failure, f)
        decision = PROTO_DECISION[rule.decision]
        traces.append(RuleTrace(rule.label, rule.source, failure is None, decision, detail))
    return winner


def _cel(expression: CelExpression, f: Facts, needs: Needs) -> tuple[bool, str]:
    if f.cel_context is None:
        f.cel_context = activation(f, needs)
    try:
        result = expression.evaluate(f)
    except CelEvalError as error:
        logger.debug("cel rule did not match: %s", error)
        return False, f"cel: evaluation error, rule does not match: {error}"
    if result is True:
        return True, "cel: true"
    if result is False:
        return False, "cel: false"
    return False, f"cel: result {result!r} is not a bool, rule does not match"


def _apply_tenant_limit(resp: safety_pb2.PolicyCheckResponse, limit: int) -> int:
    if not resp.HasField("constraints"):
        # Same shape upstream sends: all four sub-messages present.
        for part in ("budgets", "sandbox", "toolchain", "diff"):
            getattr(resp.constraints, part).SetInParent()
    budgets = resp.constraints.budgets
    current = budgets.max_concurrent_jobs
    budgets.max_concurrent_jobs = min(current, limit) if current > 0 else limit
    return safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS


# -- effective config ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EffectiveSafety:
    allowed_topics: tuple[str, ...] = ()
    denied_topics: tuple[str, ...] = ()
    allowed_repo_hosts: tuple[str, ...] = ()
    denied_repo_hosts: tuple[str, ...] = ()
    mcp: McpPolicy = field(default_factory=McpPolicy)


_EFFECTIVE_LISTS = ("allowed_topics", "denied_topics", "allowed_repo_hosts", "denied_repo_hosts")


def parse_effective_safety(raw: bytes) -> EffectiveSafety | None:
    """The `safety` section (top level, else `data.safety`) of an effective config.

    Like upstream, a payload that is not JSON, or a section of the wrong shape, is ignored
    (logged), and the nested location is tried when the top-level one does not parse.
    """
    if not raw:
        return None
    try:
        top = json.loads(raw)
    except ValueError as error:
        logger.warning("effective config is not JSON, ignored: %s", error)
        return None
    if not isinstance(top, dict):
        return None
    data = top.get("data")
    for section in (top.get("safety"), data.get("safety") if isinstance(data, dict) else None):
        parsed = _effective_section(section)
        if parsed is not None:
            return parsed
    return None


def _string_list(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _effective_section(section: Any) -> EffectiveSafety | None:
    if not isinstance(section, dict):
        if section is not None:
            logger.warning("effective config safety section is not an object, ignored")
        return None
    lists: dict[str, tuple[str, ...]] = {}
    for key in _EFFECTIVE_LISTS:
        value = _string_list(section.get(key))
        if value is None:
            logger.warning("effective config safety.%s is not a list of strings, ignored", key)
            return None
        lists[key] = value
    mcp_raw = section.get("mcp") or {}
    if not isinstance(mcp_raw, dict):
        logger.warning("effective config safety.mcp is not an object, ignored")
        return None
    mcp_lists: dict[str, tuple[str, ...]] = {}
    for key, value in mcp_raw.items():
        parsed = _string_list(value)
        if parsed is None:
            logger.warning("effective config safety.mcp.%s is not a list of strings", key)
            return None
        mcp_lists[key] = parsed
    return EffectiveSafety(**lists, mcp=McpPolicy.from_lists(mcp_lists))


def _matches_any(patterns: tuple[str, ...], topic: str) -> bool:
    return any(glob.match(p.strip(), topic) for p in patterns)


def _apply_effective_config(
    raw: bytes, f: Facts, resp: safety_pb2.PolicyCheckResponse, notes: list[str] | None
) -> None:
    eff = parse_effective_safety(raw)
    if eff is None:
        return
    reasons: list[str] = []
    topic = f.topic
    if _matches_any(eff.denied_topics, topic):
        reasons.append(f"topic '{topic}' denied by effective config")
    if eff.allowed_topics and not _matches_any(eff.allowed_topics, topic):
        reasons.append(f"topic '{topic}' not allowed by effective config")
    if f.repo_host:
        violation = _repo_host_violation(
            f.repo_host,
            eff.allowed_repo_hosts,
            frozenset(map(norm, eff.allowed_repo_hosts)),
            frozenset(map(norm, eff.denied_repo_hosts)),
        )
        if violation is not None:
            reasons.append(f"{violation} by effective config")
    mcp_violation = eff.mcp.violation(f.mcp)
    if mcp_violation is not None:
        reasons.append(mcp_violation)
    if reasons:
        resp.decision = safety_pb2.DECISION_TYPE_DENY
        # Upstream applies the checks in this order, each overwriting the reason.
        resp.reason = reasons[-1]
        if notes is not None:
            notes.extend(f"effective config overrides to DENY: {r}" for r in reasons)
