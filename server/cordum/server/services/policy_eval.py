"""Asking the policy: evaluate, simulate, explain, simulate a draft bundle, replay traffic.

Requests use upstream's check body (`PolicyCheckInput`); when it carries no
`effective_config`, the effective config of its org/team/workflow/step is attached, as the
scheduler attaches it to jobs. Differences from upstream:

- Evaluate records the decision like a scheduler check (it is replayable); Simulate and
  Explain record nothing and bypass the decision cache.
- Explain returns the per-rule trace and the overrides (upstream's explain was Check).
- SimulatePolicyBundle evaluates the base file plus the published bundles with the draft in
  place of the stored bundle (upstream left the base file out).
- ReplayPolicy (new): re-decides the last N recorded requests under a candidate (the current
  version's enabled bundles, overlaid with the given contents, minus removed ids) and lists
  every request whose decision TYPE would differ from the recorded one (a different rule
  reaching the same decision is not a change).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from cordum.agent.v1 import job_pb2, safety_pb2
from cordum.server.errors import Violations
from cordum.server.jsonvalue import from_value
from cordum.server.safety.evaluate import evaluate
from cordum.server.safety.facts import resolve_tenant
from cordum.server.safety.model import PolicySet
from cordum.server.services.caller import Caller
from cordum.server.services.config_service import ConfigService
from cordum.server.services.job_validation import TENANT_RE
from cordum.server.services.policy_admin import PolicyAdmin
from cordum.server.services.policy_bundles import (
    build_candidate,
    bundle_id_from_url,
    check_bundle_id,
    check_content,
)
from cordum.server.services.policy_recorder import DecisionRecorder
from cordum.server.stores.policy import PolicyStore, Recorded
from cordum.v1 import policy_pb2, policy_service_pb2

_PRIORITIES = {
    "": job_pb2.JOB_PRIORITY_UNSPECIFIED,
    "interactive": job_pb2.JOB_PRIORITY_INTERACTIVE,
    "batch": job_pb2.JOB_PRIORITY_BATCH,
    "critical": job_pb2.JOB_PRIORITY_CRITICAL,
}
_ACTOR_TYPES = {
    "": job_pb2.ACTOR_TYPE_UNSPECIFIED,
    "human": job_pb2.ACTOR_TYPE_HUMAN,
    "service": job_pb2.ACTOR_TYPE_SERVICE,
}
DEFAULT_REPLAY = 1000
MAX_REPLAY = 10_000
_REPLAY_CHUNK = 250


@dataclass(frozen=True)
class ReplayResult:
    replayed: int
    unchanged: int
    changes: list[policy_pb2.DecisionChange]
    candidate_snapshot: str


def _has_effective_config(value: policy_pb2.PolicyCheckInput) -> bool:
    if not value.HasField("effective_config"):
        return False
    kind = value.effective_config.WhichOneof("kind")
    return kind is not None and kind != "null_value"


class PolicyEvaluator:
    def __init__(
        self,
        admin: PolicyAdmin,
        store: PolicyStore,
        config: ConfigService,
        recorder: DecisionRecorder | None,
    ) -> None:
        self._admin = admin
        self._kernel = admin.kernel
        self._store = store
        self._config = config
        self._recorder = recorder

    async def check_request(
        self, body: policy_pb2.PolicyCheckInput, caller: Caller, prefix: str = ""
    ) -> safety_pb2.PolicyCheckRequest:
        """PolicyCheckInput → the CAP PolicyCheckRequest the kernel decides; bad fields are
        named (`<prefix>topic`, `<prefix>priority`, `<prefix>meta.actor_type`)."""
        problems = Violations()
        if not body.topic.strip():
            problems.add(f"{prefix}topic", "required")
        priority = _PRIORITIES.get(body.priority.strip().lower().removeprefix("job_priority_"))
        if priority is None:
            problems.add(f"{prefix}priority", "must be interactive, batch or critical")
        actor_type = _ACTOR_TYPES.get(
            body.meta.actor_type.strip().lower().removeprefix("actor_type_")
        )
        if actor_type is None:
            problems.add(f"{prefix}meta.actor_type", "must be human or service")
        # Every tenant field: org_id also picks the org config merged into the request.
        for name, value in (
            ("tenant", body.tenant),
            ("meta.tenant_id", body.meta.tenant_id),
            ("org_id", body.org_id),
        ):
            caller.check_tenant(value.strip(), f"{prefix}{name}")
            if value.strip() and not TENANT_RE.match(value.strip()):
                problems.add(f"{prefix}{name}", "1-100 characters from [A-Za-z0-9._-]")
        tenant = (body.tenant or body.meta.tenant_id or body.org_id).strip()
        problems.raise_if_any()
        tenant = tenant or caller.tenant or ""
        if _has_effective_config(body):
            value = body.effective_config
            raw = (
                value.string_value.encode()
                if value.WhichOneof("kind") == "string_value"
                else json.dumps(from_value(value), separators=(",", ":")).encode()
            )
        else:
            effective = await self._config.effective(
                body.org_id or tenant, body.team_id, body.workflow_id, body.step_id
            )
            raw = effective.to_json()
        meta = body.meta
        return safety_pb2.PolicyCheckRequest(
            job_id=body.job_id,
            topic=body.topic.strip(),
            tenant=tenant,
            priority=priority,  # type: ignore[arg-type]
            estimated_cost=body.estimated_cost,
            budget=body.budget if body.HasField("budget") else None,
            principal_id=body.principal_id or caller.principal,
            labels=dict(body.labels),
            memory_id=body.memory_id,
            effective_config=raw,
            meta=job_pb2.JobMetadata(
                tenant_id=meta.tenant_id,
                actor_id=meta.actor_id,
                actor_type=actor_type,  # type: ignore[arg-type]
                idempotency_key=meta.idempotency_key,
                capability=meta.capability,
                risk_tags=list(meta.risk_tags),
                requires=list(meta.requires),
                pack_id=meta.pack_id,
                labels=dict(meta.labels),
            )
            if body.HasField("meta")
            else None,
        )

    async def evaluate(
        self, body: policy_pb2.PolicyCheckInput, caller: Caller
    ) -> safety_pb2.PolicyCheckResponse:
        request = await self.check_request(body, caller)
        response = self._kernel.evaluate(request)
        if self._recorder is not None:
            self._recorder.record(request, response)
        return response

    async def simulate(
        self, body: policy_pb2.PolicyCheckInput, caller: Caller
    ) -> safety_pb2.PolicyCheckResponse:
        return self._kernel.simulate(await self.check_request(body, caller))

    async def explain(
        self, body: policy_pb2.PolicyCheckInput, caller: Caller
    ) -> policy_service_pb2.ExplainPolicyResponse:
        request = await self.check_request(body, caller)
        evaluation = self._kernel.explain(request)
        policy_set = self._kernel.policy_set
        default_tenant = policy_set.policy.default_tenant if policy_set is not None else ""
        return policy_service_pb2.ExplainPolicyResponse(
            decision=evaluation.response,
            evaluations=[t.to_proto() for t in evaluation.rules],
            tenant=resolve_tenant(request, default_tenant),
            overrides=evaluation.notes,
        )

    async def simulate_bundle(
        self,
        raw_id: str,
        body: policy_pb2.PolicyCheckInput | None,
        content: str,
        caller: Caller,
    ) -> safety_pb2.PolicyCheckResponse:
        bundle_id = bundle_id_from_url(raw_id)
        problems = Violations()
        check_bundle_id("bundle_id", bundle_id, problems)
        if body is None:
            problems.add("request", "required (the check to simulate)")
        if content:
            check_content("content", content, problems)
        problems.raise_if_any()
        assert body is not None
        if not content:
            content = (await self._admin.get_bundle(bundle_id)).content
        request = await self.check_request(body, caller, prefix="request.")
        bundles = [b for b in await self._admin.published_bundles() if b.id != bundle_id]
        bundles.append(policy_pb2.PolicyBundle(id=bundle_id, content=content, enabled=True))
        candidate = build_candidate(self._admin.base(), bundles)
        return evaluate(candidate, request).response

    async def replay(
        self, contents: Mapping[str, str], remove_ids: Sequence[str], limit: int
    ) -> ReplayResult:
        problems = Violations()
        overlay: dict[str, str] = {}
        for raw_id, text in sorted(contents.items()):
            bundle_id = bundle_id_from_url(raw_id)
            check_bundle_id(f"bundles[{raw_id}]", bundle_id, problems)
            check_content(f"bundles[{raw_id}]", text, problems)
            overlay[bundle_id] = text
        removed = {bundle_id_from_url(i) for i in remove_ids}
        for i, bundle_id in enumerate(sorted(removed)):
            check_bundle_id(f"remove_bundle_ids[{i}]", bundle_id, problems)
        if limit < 0 or limit > MAX_REPLAY:
            problems.add("limit", f"must be 0 (default {DEFAULT_REPLAY}) to {MAX_REPLAY}")
        problems.raise_if_any()
        bundles = {b.id: b for b in await self._admin.published_bundles()}
        for bundle_id, text in overlay.items():
            bundles[bundle_id] = policy_pb2.PolicyBundle(id=bundle_id, content=text, enabled=True)
        for bundle_id in removed:
            bundles.pop(bundle_id, None)
        candidate = build_candidate(self._admin.base(), bundles.values())
        if self._recorder is not None:
            await self._recorder.flush()  # include what this process decided a moment ago
        recorded = await self._store.recent_decisions(limit or DEFAULT_REPLAY)
        return await _replay(candidate, recorded)


async def _replay(candidate: PolicySet, recorded: Sequence[Recorded]) -> ReplayResult:
    changes: list[policy_pb2.DecisionChange] = []
    for start in range(0, len(recorded), _REPLAY_CHUNK):
        for entry in recorded[start : start + _REPLAY_CHUNK]:
            after = evaluate(candidate, entry.request).response
            if after.decision == entry.decision:
                continue
            checked = Timestamp()
            checked.FromMilliseconds(entry.checked_ms)
            changes.append(
                policy_pb2.DecisionChange(
                    job_id=entry.job_id,
                    checked_at=checked,
                    topic=entry.request.topic,
                    tenant=entry.request.tenant,
                    before=entry.decision,  # type: ignore[arg-type]
                    after=after.decision,
                    before_rule_id=entry.rule_id,
                    after_rule_id=after.rule_id,
                    after_reason=after.reason,
                )
            )
        # Thousands of evaluations: let other requests run between chunks.
        await asyncio.sleep(0)
    return ReplayResult(
        replayed=len(recorded),
        unchanged=len(recorded) - len(changes),
        changes=changes,
        candidate_snapshot=candidate.snapshot,
    )
