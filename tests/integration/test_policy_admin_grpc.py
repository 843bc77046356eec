"""PolicyService over native gRPC: draft bundles, publish as immutable versions, rollback,
audit, rules, snapshots, evaluate / simulate / explain and bundle simulation.

Each test runs its own app (gateway + safety, own namespace): publishing changes what the
whole namespace enforces."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from cordum.agent.v1 import safety_pb2
from cordum.server.app import App
from cordum.server.jsonvalue import from_struct, to_value
from cordum.v1 import (
    config_service_pb2,
    config_service_pb2_grpc,
    policy_pb2,
    policy_service_pb2,
    policy_service_pb2_grpc,
)

from support.admin import error_reason, field_violations, keys_with, own_app

P = policy_service_pb2
D = safety_pb2


def deny_bundle(topic_glob: str, rule_id: str) -> str:
    return (
        "rules:\n"
        f"  - id: {rule_id}\n"
        f'    match: {{topics: ["{topic_glob}"]}}\n'
        "    decision: deny\n"
        "    reason: denied by a published bundle\n"
    )


@pytest_asyncio.fixture
async def app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    async with own_app(nats_url, redis_url, config_dir, roles=["gateway", "safety"]) as running:
        yield running


@pytest_asyncio.fixture
async def policy(app: App) -> AsyncIterator[policy_service_pb2_grpc.PolicyServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield policy_service_pb2_grpc.PolicyServiceStub(channel)


def as_user(name: str) -> tuple[tuple[str, str]]:
    return (("x-principal-id", name),)


def check(app: App, topic: str, job_id: str = "j") -> safety_pb2.PolicyCheckResponse:
    assert app.kernel is not None
    return app.kernel.check(D.PolicyCheckRequest(job_id=job_id, topic=topic, tenant="default"))


async def test_a_draft_is_enforced_only_once_published(
    app: App, policy: policy_service_pb2_grpc.PolicyServiceStub, prefix: str
) -> None:
    topic = f"job.pa.{prefix}.run"
    put = await policy.PutPolicyBundle(
        P.PutPolicyBundleRequest(
            bundle_id=f"secops~deny-{prefix}",  # `~` stands for `/`, as upstream's URLs
            content=deny_bundle(f"job.pa.{prefix}.*", "deny-pa"),
            author="alice",
            message="block pa",
        ),
        metadata=as_user("alice"),
    )
    assert (put.id, put.enabled, put.source, put.revision) == (
        f"secops/deny-{prefix}",
        True,
        "secops",
        1,
    )
    assert len(put.sha256) == 64 and put.author == "alice"
    # A draft is not live (upstream: a PUT was enforced at the next reload).
    assert check(app, topic).decision == D.DECISION_TYPE_ALLOW

    before = app.kernel.snapshot if app.kernel else ""
    published = await policy.PublishPolicy(
        P.PublishPolicyRequest(message="ship it", note="ticket-1"), metadata=as_user("bob")
    )
    assert published.snapshot_before == before
    assert published.snapshot_after == published.version.snapshot != before
    assert list(published.published) == [f"secops/deny-{prefix}"]
    version = published.version
    assert (version.version, version.published_by, version.message, version.note) == (
        1,
        "bob",
        "ship it",
        "ticket-1",
    )
    assert [b.id for b in version.bundles] == [f"secops/deny-{prefix}"]
    # Read-your-writes: this process enforces it when Publish returns.
    denied = check(app, topic)
    assert (denied.decision, denied.rule_id) == (D.DECISION_TYPE_DENY, "deny-pa")
    assert denied.policy_snapshot == version.snapshot
    snapshots = await policy.ListPolicySnapshots(P.ListPolicySnapshotsRequest())
    assert snapshots.snapshots[0] == version.snapshot

    # The version is immutable: editing the draft changes nothing enforced.
    await policy.PutPolicyBundle(
        P.PutPolicyBundleRequest(
            bundle_id=f"secops/deny-{prefix}", content=deny_bundle("job.other.*", "other")
        )
    )
    assert check(app, topic).decision == D.DECISION_TYPE_DENY
    stored = await policy.GetPolicyVersion(P.GetPolicyVersionRequest(version=1))
    assert stored.bundles[0].content == deny_bundle(f"job.pa.{prefix}.*", "deny-pa")
    draft = await policy.GetPolicyBundle(
        P.GetPolicyBundleRequest(bundle_id=f"secops/deny-{prefix}")
    )
    assert draft.revision == 2 and "job.other.*" in draft.content


async def test_publish_selected_bundles_and_the_enabled_flag(
    app: App, policy: policy_service_pb2_grpc.PolicyServiceStub, prefix: str
) -> None:
    a, b = f"team/a-{prefix}", f"team/b-{prefix}"
    await policy.PutPolicyBundle(
        P.PutPolicyBundleRequest(bundle_id=a, content=deny_bundle(f"job.a.{prefix}", "rule-a"))
    )
    await policy.PutPolicyBundle(
        P.PutPolicyBundleRequest(bundle_id=b, content=deny_bundle(f"job.b.{prefix}", "rule-b"))
    )
    first = await policy.PublishPolicy(P.PublishPolicyRequest(bundle_ids=[a]))
    assert [x.id for x in first.version.bundles] == [a]
    assert check(app, f"job.a.{prefix}").decision == D.DECISION_TYPE_DENY
    assert check(app, f"job.b.{prefix}").decision == D.DECISION_TYPE_ALLOW

    disabled = await policy.PutPolicyBundle(
        P.PutPolicyBundleRequest(
            bundle_id=a, content=deny_bundle(f"job.a.{prefix}", "rule-a"), enabled=False
        )
    )
    assert (disabled.enabled, disabled.revision) == (False, 2)
    second = await policy.PublishPolicy(P.PublishPolicyRequest())
    assert {x.id: x.enabled for x in second.version.bundles} == {a: False, b: True}
    assert check(app, f"job.a.{prefix}").decision == D.DECISION_TYPE_ALLOW
    assert check(app, f"job.b.{prefix}").decision == D.DECISION_TYPE_DENY

    enforced = await policy.ListPolicyRules(P.ListPolicyRulesRequest())
    by_id = {r.id: r for r in enforced.rules}
    assert "rule-b" in by_id and "rule-a" not in by_id
    assert by_id["rule-b"].bundle_id == b
    assert from_struct(by_id["rule-b"].rule)["match"] == {"topics": [f"job.b.{prefix}"]}
    assert by_id["deny-rule"].bundle_id.startswith("file:")  # the base file's rules
    assert "legacy:default:allow:1" in by_id
    everything = await policy.ListPolicyRules(P.ListPolicyRulesRequest(include_disabled=True))
    assert {r.id: r.enabled for r in everything.rules}["rule-a"] is False

    # Publishing a deleted draft by id removes it from the next version.
    await policy.DeletePolicyBundle(P.DeletePolicyBundleRequest(bundle_id=b))
    third = await policy.PublishPolicy(P.PublishPolicyRequest(bundle_ids=[b]))
    assert [x.id for x in third.version.bundles] == [a]
    assert check(app, f"job.b.{prefix}").decision == D.DECISION_TYPE_ALLOW

    listed = await policy.ListPolicyBundles(P.ListPolicyBundlesRequest(page_size=10))
    assert [x.id for x in listed.bundles] == [a]
    versions = await policy.ListPolicyVersions(P.ListPolicyVersionsRequest(page_size=2))
    assert [v.version for v in versions.versions] == [3, 2]
    rest = await policy.ListPolicyVersions(
        P.ListPolicyVersionsRequest(page_size=2, page_token=versions.next_page_token)
    )
    assert [v.version for v in rest.versions] == [1] and not rest.next_page_token


async def test_rollback_publishes_a_copy_and_the_audit_log_has_every_change(
    app: App, policy: policy_service_pb2_grpc.PolicyServiceStub, prefix: str
) -> None:
    bundle = f"secops/rb-{prefix}"
    topic = f"job.rb.{prefix}"
    await policy.PutPolicyBundle(
        P.PutPolicyBundleRequest(bundle_id=bundle, content=deny_bundle("job.none", "v1")),
        metadata=as_user("carol"),
    )
    v1 = (await policy.PublishPolicy(P.PublishPolicyRequest(), metadata=as_user("carol"))).version
    await policy.PutPolicyBundle(
        P.PutPolicyBundleRequest(bundle_id=bundle, content=deny_bundle(topic, "v2"))
    )
    v2 = (await policy.PublishPolicy(P.PublishPolicyRequest())).version
    assert check(app, topic).rule_id == "v2"

    rolled = await policy.RollbackPolicy(
        P.RollbackPolicyRequest(version=1, message="bad deploy"), metadata=as_user("dave")
    )
    assert rolled.rollback_to == 1
    assert (rolled.version.version, rolled.version.rollback_of) == (3, 1)
    assert rolled.snapshot_before == v2.snapshot
    assert rolled.snapshot_after == rolled.version.snapshot == v1.snapshot
    assert check(app, topic).decision == D.DECISION_TYPE_ALLOW

    # By snapshot id: the newest version with it (3) is current, so back to v2 by its id.
    again = await policy.RollbackPolicy(P.RollbackPolicyRequest(snapshot_id=v2.snapshot))
    assert (again.rollback_to, again.version.version) == (2, 4)
    assert check(app, topic).rule_id == "v2"

    for request, code in [
        (P.RollbackPolicyRequest(version=4), grpc.StatusCode.FAILED_PRECONDITION),
        (P.RollbackPolicyRequest(version=99), grpc.StatusCode.NOT_FOUND),
        (P.RollbackPolicyRequest(snapshot_id="nope"), grpc.StatusCode.NOT_FOUND),
        (P.RollbackPolicyRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            P.RollbackPolicyRequest(version=1, snapshot_id=v2.snapshot),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await policy.RollbackPolicy(request)
        assert info.value.code() == code, request

    audit = await policy.ListPolicyAudit(P.ListPolicyAuditRequest())
    actions = [(e.action, e.version) for e in audit.entries]
    assert actions == [
        ("rollback", 4),
        ("rollback", 3),
        ("publish", 2),
        ("bundle_put", 0),
        ("publish", 1),
        ("bundle_put", 0),
    ]
    newest_rollback, first_rollback = audit.entries[0], audit.entries[1]
    assert first_rollback.actor_id == "dave" and first_rollback.message == "bad deploy"
    assert list(first_rollback.bundle_ids) == [bundle]
    assert (first_rollback.snapshot_before, first_rollback.snapshot_after) == (
        v2.snapshot,
        v1.snapshot,
    )
    assert f'-    match: {{topics: ["{topic}"]}}' in first_rollback.diff
    assert '+    match: {topics: ["job.none"]}' in first_rollback.diff
    assert newest_rollback.created_at.ToNanoseconds() >= first_rollback.created_at.ToNanoseconds()
    first_put = audit.entries[-1]
    assert (first_put.actor_id, first_put.bundle_ids) == ("carol", [bundle])
    assert first_put.diff.startswith(f"--- /dev/null\n+++ b/{bundle}\n")

    page = await policy.ListPolicyAudit(P.ListPolicyAuditRequest(page_size=4))
    rest = await policy.ListPolicyAudit(
        P.ListPolicyAuditRequest(page_size=4, page_token=page.next_page_token)
    )
    assert [e.id for e in page.entries] + [e.id for e in rest.entries] == [
        e.id for e in audit.entries
    ]


async def test_bad_bundles_are_refused_naming_every_field_and_nothing_is_written(
    app: App, policy: policy_service_pb2_grpc.PolicyServiceStub, prefix: str
) -> None:
    content = (
        "rules:\n"
        "  - id: r1\n"
        "    decision: maybe\n"
        "    match: {topics: ['job.[x']}\n"
        "  - id: r2\n"
        "    colour: red\n"
    )
    cases = [
        (
            P.PutPolicyBundleRequest(bundle_id=f"secops/{prefix}", content=content),
            {
                "content.rules[0].decision",
                "content.rules[0].match.topics[0]",
                "content.rules[1].colour",
            },
        ),
        (
            P.PutPolicyBundleRequest(bundle_id=f"secops/{prefix}", content="rules: [unclosed"),
            {"content.yaml"},
        ),
        (P.PutPolicyBundleRequest(bundle_id=f"secops/{prefix}"), {"content"}),
        (
            P.PutPolicyBundleRequest(bundle_id=f"bad id/{prefix}//", content="rules: []"),
            {"bundle_id"},
        ),
        (P.PutPolicyBundleRequest(content="rules: []"), {"bundle_id"}),
    ]
    for request, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await policy.PutPolicyBundle(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert set(field_violations(info.value)) == fields, request
    assert error_reason(info.value) == "INVALID_ARGUMENT"
    assert await keys_with(app, prefix) == []
    assert not (await policy.ListPolicyAudit(P.ListPolicyAuditRequest())).entries

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await policy.GetPolicyBundle(P.GetPolicyBundleRequest(bundle_id=f"secops/{prefix}"))
    assert error_reason(missing.value) == "POLICY_BUNDLE_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as nothing:
        await policy.PublishPolicy(P.PublishPolicyRequest())
    assert nothing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await policy.PublishPolicy(P.PublishPolicyRequest(bundle_ids=[f"secops/{prefix}"]))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as no_version:
        await policy.GetPolicyVersion(P.GetPolicyVersionRequest(version=1))
    assert error_reason(no_version.value) == "POLICY_VERSION_NOT_FOUND"


async def test_evaluate_simulate_explain_and_bundle_simulation(
    app: App, policy: policy_service_pb2_grpc.PolicyServiceStub, prefix: str
) -> None:
    body = policy_pb2.PolicyCheckInput(
        job_id=f"eval-{prefix}",
        topic="job.t.approve.x",
        priority="batch",
        labels={"a": "b"},
        meta=policy_pb2.PolicyCheckMeta(actor_type="human", capability="deploy"),
    )
    evaluated = await policy.EvaluatePolicy(body)
    assert evaluated.decision == D.DECISION_TYPE_REQUIRE_HUMAN
    assert (evaluated.rule_id, evaluated.approval_ref) == ("approve-rule", f"eval-{prefix}")
    assert (await policy.SimulatePolicy(body)) == evaluated

    explained = await policy.ExplainPolicy(body)
    assert explained.decision == evaluated
    assert explained.tenant == "default"
    traces = [(e.rule_id, e.matched) for e in explained.evaluations]
    assert traces[:2] == [("deny-rule", False), ("approve-rule", True)]
    assert "job.t.deny.*" in explained.evaluations[0].detail

    # Effective config is attached when the body has none: an org denying the topic wins.
    org = f"org-{prefix}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        await config_service_pb2_grpc.ConfigServiceStub(channel).SetConfig(
            config_service_pb2.SetConfigRequest(
                scope="org",
                scope_id=org,
                data=to_value({"safety": {"denied_topics": ["job.t.approve.*"]}}).struct_value,
            )
        )
    scoped = policy_pb2.PolicyCheckInput(topic="job.t.approve.x", org_id=org)
    denied = await policy.EvaluatePolicy(scoped)
    assert denied.decision == D.DECISION_TYPE_DENY
    assert denied.reason == "topic 'job.t.approve.x' denied by effective config"
    given = policy_pb2.PolicyCheckInput(
        topic="job.t.approve.x", org_id=org, effective_config=to_value({"safety": {}})
    )
    assert (await policy.EvaluatePolicy(given)).decision == D.DECISION_TYPE_REQUIRE_HUMAN

    # A draft bundle simulated in place of the stored one, with the base file included.
    bundle = f"secops/sim-{prefix}"
    draft = deny_bundle(f"job.sim.{prefix}.*", "sim-deny")
    request = policy_pb2.PolicyCheckInput(topic=f"job.sim.{prefix}.x")
    simulated = await policy.SimulatePolicyBundle(
        P.SimulatePolicyBundleRequest(bundle_id=bundle, request=request, content=draft)
    )
    assert (simulated.decision, simulated.rule_id) == (D.DECISION_TYPE_DENY, "sim-deny")
    base_rule = await policy.SimulatePolicyBundle(
        P.SimulatePolicyBundleRequest(
            bundle_id=bundle,
            request=policy_pb2.PolicyCheckInput(topic="job.t.deny.x"),
            content=draft,
        )
    )
    assert base_rule.rule_id == "deny-rule"  # upstream left the base file out
    assert (await policy.EvaluatePolicy(request)).decision == D.DECISION_TYPE_ALLOW
    with pytest.raises(grpc.aio.AioRpcError) as no_draft:
        await policy.SimulatePolicyBundle(
            P.SimulatePolicyBundleRequest(bundle_id=bundle, request=request)
        )
    assert no_draft.value.code() == grpc.StatusCode.NOT_FOUND
    await policy.PutPolicyBundle(P.PutPolicyBundleRequest(bundle_id=bundle, content=draft))
    stored = await policy.SimulatePolicyBundle(
        P.SimulatePolicyBundleRequest(bundle_id=bundle, request=request)
    )
    assert stored.rule_id == "sim-deny"

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await policy.EvaluatePolicy(
            policy_pb2.PolicyCheckInput(
                priority="urgent", meta=policy_pb2.PolicyCheckMeta(actor_type="robot")
            )
        )
    assert set(field_violations(bad.value)) == {"topic", "priority", "meta.actor_type"}
    with pytest.raises(grpc.aio.AioRpcError) as bad_sim:
        await policy.SimulatePolicyBundle(
            P.SimulatePolicyBundleRequest(
                bundle_id=bundle, request=policy_pb2.PolicyCheckInput(), content="rules: 3"
            )
        )
    assert set(field_violations(bad_sim.value)) == {"content.rules"}
