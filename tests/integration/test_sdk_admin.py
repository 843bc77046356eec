"""`client.config`, `client.policy` and `client.schemas` (async and blocking).

Config and schema calls use ids of their own on the session app. Asking the policy is
read-only there; publishing changes what a whole namespace enforces, so the policy
administration tests (and config reload, which rewrites the system scope) run an app of
their own, as the policy admin gRPC tests do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cordum.agent.v1 import job_pb2 as agent_job_pb2
from cordum.agent.v1 import safety_pb2
from cordum.sdk import (
    Aborted,
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PolicyCheckFields,
)
from cordum.sdk.convert import from_struct
from cordum.sdk.policy import check_input
from cordum.server.app import App
from cordum.v1 import policy_pb2

from support.admin import own_app
from support.waiting import eventually

D = safety_pb2


def deny_bundle(glob: str, rule_id: str) -> str:
    return (
        f'rules:\n  - id: {rule_id}\n    match: {{topics: ["{glob}"]}}\n'
        "    decision: deny\n    reason: denied by a bundle\n"
    )


@pytest_asyncio.fixture
async def client(cordum: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cordum.grpc_port}", timeout=10.0) as client:
        yield client


@pytest_asyncio.fixture
async def own(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    async with own_app(nats_url, redis_url, config_dir, roles=["gateway", "safety"]) as app:
        yield app


@pytest_asyncio.fixture
async def admin(own: App) -> AsyncIterator[AsyncClient]:
    # The principal goes with every call (x-principal-id): the audit log names it.
    target = f"127.0.0.1:{own.grpc_port}"
    async with AsyncClient(target, timeout=10.0, metadata={"x-principal-id": "alice"}) as c:
        yield c


# -- config -----------------------------------------------------------------------------------


async def test_config_set_get_and_compare_and_set(client: AsyncClient, prefix: str) -> None:
    org = f"org-{prefix}"
    first = await client.config.set("org", org, {"limits": {"jobs": 3}}, meta={"why": "test"})
    assert (first.scope, first.scope_id, first.revision) == ("org", org, 1)
    got = await client.config.get("org", org)
    assert from_struct(got.data) == {"limits": {"jobs": 3}}  # 3, not 3.0
    assert dict(got.meta) == {"why": "test"}
    second = await client.config.set("org", org, {"limits": {"jobs": 4}}, expected_revision=1)
    assert second.revision == 2
    with pytest.raises(Aborted) as lost:
        await client.config.set("org", org, {"limits": {"jobs": 5}}, expected_revision=1)
    assert lost.value.reason == "REVISION_MISMATCH"
    with pytest.raises(Aborted):
        await client.config.set("org", org, {}, expected_revision=0)  # 0: must not exist yet
    system = await client.config.get()
    assert (system.scope, system.scope_id) == ("system", "default")
    with pytest.raises(InvalidArgument) as bad:
        await client.config.set("galaxy", "x", {"a": 1})
    assert "scope" in bad.value.field_violations
    with pytest.raises(TypeError):
        await client.config.set("org", org, [1])  # type: ignore[arg-type]


async def test_config_effective_merges_the_scopes(client: AsyncClient, prefix: str) -> None:
    org, team = f"o-{prefix}", f"t-{prefix}"
    await client.config.set("org", org, {"retry": {"max": 3, "base_ms": 100}, "model": "s"})
    await client.config.set("team", team, {"retry": {"base_ms": 500}})
    merged = await client.config.effective(org_id=org, team_id=team)
    data = from_struct(merged.data)
    assert data["retry"] == {"max": 3, "base_ms": 500} and data["model"] == "s"
    assert "org:1|team:1" in merged.version and len(merged.hash) == 64


async def test_config_reload_reads_the_files(own: App, admin: AsyncClient) -> None:
    reloaded = await admin.config.reload()
    assert {"pools.yaml", "timeouts.yaml"} <= {Path(f).name for f in reloaded.files}
    assert (reloaded.document.scope, reloaded.document.scope_id) == ("system", "default")
    assert reloaded.document.revision == (await admin.config.get()).revision


# -- schemas ----------------------------------------------------------------------------------

ORDER = {
    "type": "object",
    "required": ["id"],
    "properties": {"id": {"type": "string", "minLength": 3}, "qty": {"type": "integer"}},
}


async def test_schemas_register_validate_list_and_delete(client: AsyncClient, prefix: str) -> None:
    schema_id = f"orders/{prefix}/v1"
    saved = await client.schemas.register(schema_id, ORDER)
    assert saved.id == schema_id and len(saved.sha256) == 64
    assert from_struct((await client.schemas.get(schema_id)).schema) == ORDER

    good = await client.schemas.validate(schema_id, {"id": "abc", "qty": 2})
    assert good.valid and not good.violations
    bad = await client.schemas.validate(schema_id, {"id": "ab", "qty": "two"})
    assert not bad.valid
    assert {v.pointer for v in bad.violations} == {"/id", "/qty"}
    # Any JSON value is a document, not only objects.
    assert not (await client.schemas.validate(schema_id, [1, 2])).valid

    for n in range(4):
        await client.schemas.register(f"orders/{prefix}/x{n}", {"type": "object"})
    mine = [s.id async for s in client.schemas.list(page_size=2) if prefix in s.id]
    assert mine == sorted([schema_id, *(f"orders/{prefix}/x{n}" for n in range(4))])
    assert len([s async for s in client.schemas.list(limit=2)]) == 2

    with pytest.raises(InvalidArgument) as invalid:
        await client.schemas.register(f"orders/{prefix}/bad", {"type": "nope"})
    assert set(invalid.value.field_violations) == {"schema.type"}
    await client.schemas.delete(schema_id)
    with pytest.raises(NotFound) as gone:
        await client.schemas.get(schema_id)
    assert gone.value.reason == "SCHEMA_NOT_FOUND"
    with pytest.raises(NotFound):
        await client.schemas.validate(schema_id, {})


# -- asking the policy (read-only, session app) ----------------------------------------------


def test_check_keywords_cover_every_policy_check_input_field() -> None:
    fields = set(policy_pb2.PolicyCheckInput.DESCRIPTOR.fields_by_name)
    assert set(PolicyCheckFields.__annotations__) == fields
    request = check_input(
        {
            "topic": "job.x",
            "labels": {"a": "b"},
            "budget": {"max_total_tokens": 10},
            "meta": policy_pb2.PolicyCheckMeta(capability="c"),
            "effective_config": {"k": [1]},
            "estimated_cost": 0.5,
            "tenant": None,
        }
    )
    assert request.budget == agent_job_pb2.Budget(max_total_tokens=10)
    assert request.meta.capability == "c" and request.labels["a"] == "b"
    assert not request.tenant and request.HasField("effective_config")


async def test_evaluate_simulate_and_explain(client: AsyncClient, prefix: str) -> None:
    denied = await client.policy.simulate(topic=f"job.t.deny.{prefix}", tenant="default")
    assert (denied.decision, denied.rule_id) == (D.DECISION_TYPE_DENY, "deny-rule")
    allowed = await client.policy.evaluate(topic=f"job.t.ok.{prefix}", job_id=f"ev-{prefix}")
    assert allowed.decision == D.DECISION_TYPE_ALLOW
    cel = await client.policy.simulate(topic=f"job.t.cel.{prefix}", labels={"risk": "high"})
    assert cel.rule_id == "cel-rule"
    explained = await client.policy.explain(topic=f"job.t.approve.{prefix}")
    assert explained.decision.decision == D.DECISION_TYPE_REQUIRE_HUMAN
    traces = {e.rule_id: e for e in explained.evaluations}
    assert [e.rule_id for e in explained.evaluations if e.matched] == ["approve-rule"]
    assert traces["approve-rule"].decision == D.DECISION_TYPE_REQUIRE_HUMAN
    assert not traces["deny-rule"].matched and traces["deny-rule"].detail
    assert await client.policy.snapshots()
    rules = await client.policy.rules()
    assert {"deny-rule", "approve-rule"} <= {r.id for r in rules.rules}
    with pytest.raises(InvalidArgument) as bad:
        await client.policy.simulate(topic="")
    assert "topic" in bad.value.field_violations


# -- administering the policy (own app) -------------------------------------------------------


async def test_bundles_publish_rollback_versions_audit(
    own: App, admin: AsyncClient, prefix: str
) -> None:
    bundle = f"secops/sdk-{prefix}"
    topic = f"job.sdk.{prefix}.run"
    put = await admin.policy.bundles.put(
        bundle, deny_bundle(f"job.sdk.{prefix}.*", "sdk-deny"), message="block sdk"
    )
    assert (put.id, put.enabled, put.revision, put.source) == (bundle, True, 1, "secops")
    assert (await admin.policy.bundles.get(bundle)).content == put.content
    assert [b.id async for b in admin.policy.bundles.list()] == [bundle]

    # Drafts are not enforced; a bundle simulation shows what the draft would do.
    assert (await admin.policy.simulate(topic=topic)).decision == D.DECISION_TYPE_ALLOW
    would = await admin.policy.bundles.simulate(bundle, topic=topic)
    assert (would.decision, would.rule_id) == (D.DECISION_TYPE_DENY, "sdk-deny")
    other = await admin.policy.bundles.simulate(
        bundle, topic=topic, content=deny_bundle("job.none", "none")
    )
    assert other.decision == D.DECISION_TYPE_ALLOW

    v1 = await admin.policy.publish(message="ship", note="t-1")
    assert list(v1.published) == [bundle] and v1.version.version == 1
    assert v1.version.published_by == "alice"
    denied = await admin.policy.evaluate(topic=topic, job_id=f"job-{prefix}")
    assert (denied.decision, denied.policy_snapshot) == (D.DECISION_TYPE_DENY, v1.snapshot_after)

    await admin.policy.bundles.put(bundle, deny_bundle("job.none", "none"), enabled=False)
    v2 = await admin.policy.publish(bundle_ids=[bundle])
    assert v2.version.version == 2
    assert (await admin.policy.simulate(topic=topic)).decision == D.DECISION_TYPE_ALLOW

    rolled = await admin.policy.rollback(version=1, message="undo")
    assert (rolled.rollback_to, rolled.version.version, rolled.version.rollback_of) == (3 - 2, 3, 1)
    assert rolled.snapshot_after == v1.snapshot_after
    assert (await admin.policy.simulate(topic=topic)).decision == D.DECISION_TYPE_DENY
    by_snapshot = await admin.policy.rollback(snapshot_id=v2.snapshot_after)
    assert by_snapshot.rollback_to == 2

    assert [v.version async for v in admin.policy.versions(page_size=2)] == [4, 3, 2, 1]
    assert [v.version async for v in admin.policy.versions(limit=1)] == [4]
    assert (await admin.policy.version(1)).bundles[0].content == put.content
    entries = [e async for e in admin.policy.audit(page_size=2)]
    actions = [e.action for e in entries]
    assert actions[:2] == ["rollback", "rollback"] and actions[-1] == "bundle_put"
    assert actions.count("publish") == 2 and actions.count("bundle_put") == 2
    assert {e.actor_id for e in entries} == {"alice"}
    assert "sdk-deny" in entries[-1].diff

    await admin.policy.bundles.delete(bundle)
    with pytest.raises(NotFound):
        await admin.policy.bundles.get(bundle)
    with pytest.raises(NotFound):
        await admin.policy.rollback(version=99)
    with pytest.raises(InvalidArgument) as neither:
        await admin.policy.rollback()
    assert set(neither.value.field_violations) == {"version"}
    with pytest.raises(FailedPrecondition):
        await admin.policy.rollback(version=4)  # already the current version
    with pytest.raises(InvalidArgument) as bad:
        await admin.policy.bundles.put(f"secops/bad-{prefix}", "rules: [unclosed")
    assert any(f.startswith("content") for f in bad.value.field_violations)


async def test_replay_reports_the_decisions_a_candidate_changes(
    own: App, admin: AsyncClient, prefix: str
) -> None:
    pay, read = f"job.rp.{prefix}.pay", f"job.rp.{prefix}.read"
    for n, topic in enumerate((pay, read, pay)):
        await admin.policy.evaluate(topic=topic, job_id=f"j{n}-{prefix}", tenant="default")
    assert own.redis is not None
    key = f"{own.settings.namespace}policy:decisions"

    async def recorded() -> int:
        return int(await own.redis.llen(key))  # type: ignore[union-attr]

    await eventually(recorded, until=lambda n: n >= 3, what="3 recorded decisions")
    replay = await admin.policy.replay(
        bundles={"secops/block-pay": deny_bundle(pay, "block-pay")}, limit=10
    )
    assert (replay.replayed, replay.unchanged) == (3, 1)
    assert {c.job_id for c in replay.changes} == {f"j0-{prefix}", f"j2-{prefix}"}
    assert all(c.after == D.DECISION_TYPE_DENY for c in replay.changes)
    assert replay.candidate_snapshot
    nothing = await admin.policy.replay(remove_bundle_ids=["secops/none"])
    assert not nothing.changes


async def test_the_blocking_admin_clients(own: App, prefix: str) -> None:
    target = f"127.0.0.1:{own.grpc_port}"

    def blocking_calls() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Client(target, timeout=10.0) as sync:
            sync.config.set("org", f"o-{prefix}", {"a": 1})
            seen["config"] = from_struct(sync.config.get("org", f"o-{prefix}").data)
            seen["effective"] = from_struct(sync.config.effective(org_id=f"o-{prefix}").data)
            sync.schemas.register(f"s/{prefix}", {"type": "integer"})
            seen["schema"] = sync.schemas.validate(f"s/{prefix}", "x").valid
            seen["schemas"] = [s.id for s in sync.schemas.list() if prefix in s.id]
            sync.schemas.delete(f"s/{prefix}")
            bundle = f"team/sync-{prefix}"
            sync.policy.bundles.put(bundle, deny_bundle("job.sync.*", "sync-deny"))
            seen["bundles"] = [b.id for b in sync.policy.bundles.list()]
            seen["sim"] = sync.policy.bundles.simulate(bundle, topic="job.sync.x").rule_id
            seen["published"] = sync.policy.publish().version.version
            seen["decision"] = sync.policy.evaluate(topic="job.sync.x").decision
            seen["explain"] = sync.policy.explain(topic="job.sync.x").decision.rule_id
            seen["snapshots"] = len(sync.policy.snapshots())
            seen["rules"] = {r.id for r in sync.policy.rules().rules}
            sync.policy.bundles.put(bundle, deny_bundle("job.none", "none"), enabled=False)
            sync.policy.publish(message="off")
            seen["versions"] = [v.version for v in sync.policy.versions()]
            seen["version"] = sync.policy.version(1).version
            seen["rollback"] = sync.policy.rollback(version=1).rollback_to
            seen["audit"] = [e.action for e in sync.policy.audit(limit=2)]
            seen["replay"] = sync.policy.replay(limit=5).replayed >= 0
            seen["simulate"] = sync.policy.simulate(topic="job.sync.x").decision
            sync.policy.bundles.delete(bundle)
            seen["reload"] = len(sync.config.reload().files)
        return seen

    seen = await asyncio.to_thread(blocking_calls)
    assert seen["config"] == {"a": 1} and seen["effective"]["a"] == 1
    assert seen["schema"] is False and seen["schemas"] == [f"s/{prefix}"]
    assert seen["bundles"] == [f"team/sync-{prefix}"] and seen["sim"] == "sync-deny"
    assert seen["published"] == 1 and seen["decision"] == D.DECISION_TYPE_DENY
    assert seen["explain"] == "sync-deny" and seen["snapshots"] >= 1
    assert "sync-deny" in seen["rules"]
    assert seen["versions"] == [2, 1] and seen["version"] == 1
    assert seen["rollback"] == 1 and seen["audit"] == ["rollback", "publish"]
    assert seen["replay"] and seen["simulate"] == D.DECISION_TYPE_DENY
    assert seen["reload"] >= 2
