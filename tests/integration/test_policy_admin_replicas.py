"""Publish and rollback reach every kernel replica through the policy event, fast.

Two scheduler replicas (roles scheduler + safety, each with its own kernel) and a gateway
share one namespace. Their file watchers are slowed to 60 s, so only the bus event can make
them converge: a published bundle that denies a topic is enforced by both within one second,
and a rollback restores the old decision on both, also within one second.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from cordum.agent.v1 import safety_pb2
from cordum.server.app import App
from cordum.v1 import policy_service_pb2, policy_service_pb2_grpc

from support.admin import own_app
from support.waiting import eventually

P = policy_service_pb2
D = safety_pb2


def decision(app: App, topic: str, job_id: str) -> int:
    assert app.kernel is not None
    request = D.PolicyCheckRequest(job_id=job_id, topic=topic, tenant="default")
    return app.kernel.check(request).decision


async def both_decide(replicas: list[App], topic: str, wanted: int, started: float) -> float:
    """Seconds from `started` until every replica decides `wanted` for `topic`."""
    counter = 0

    async def probe() -> list[int]:
        nonlocal counter
        counter += 1
        return [decision(r, topic, f"probe-{counter}") for r in replicas]

    await eventually(
        probe,
        until=lambda got: all(d == wanted for d in got),
        within=5.0,
        interval=0.005,
        what=f"both replicas to decide {D.DecisionType.Name(wanted)} for {topic}",
    )
    return time.monotonic() - started


async def test_publish_and_rollback_reach_both_replicas_within_a_second(
    nats_url: str, redis_url: str, config_dir: Path, prefix: str
) -> None:
    namespace = f"rep{prefix}."
    common = {"namespace": namespace, "policy_watch_s": 60.0}
    topic = f"job.replica.{prefix}.deploy"
    async with (
        own_app(nats_url, redis_url, config_dir, roles=["scheduler", "safety"], **common) as one,
        own_app(nats_url, redis_url, config_dir, roles=["scheduler", "safety"], **common) as two,
        own_app(nats_url, redis_url, config_dir, roles=["gateway"], **common) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        replicas = [one, two]
        assert one.scheduler is not None and two.scheduler is not None
        assert [decision(r, topic, "before") for r in replicas] == [D.DECISION_TYPE_ALLOW] * 2
        policy = policy_service_pb2_grpc.PolicyServiceStub(channel)

        # v1: a baseline that does not touch the topic.
        await policy.PutPolicyBundle(
            P.PutPolicyBundleRequest(
                bundle_id=f"secops/baseline-{prefix}",
                content=deny_rule("baseline", f"job.elsewhere.{prefix}.*"),
            )
        )
        baseline = await policy.PublishPolicy(P.PublishPolicyRequest(message="baseline"))
        await both_decide(replicas, topic, D.DECISION_TYPE_ALLOW, time.monotonic())

        # A draft that denies the topic is not live on any replica.
        await policy.PutPolicyBundle(
            P.PutPolicyBundleRequest(
                bundle_id=f"secops/freeze-{prefix}",
                content=deny_rule("replica-deny", f"job.replica.{prefix}.*"),
            )
        )
        assert [decision(r, topic, "draft") for r in replicas] == [D.DECISION_TYPE_ALLOW] * 2

        started = time.monotonic()
        published = await policy.PublishPolicy(
            P.PublishPolicyRequest(message="freeze deploys"), metadata=(("x-principal-id", "ops"),)
        )
        elapsed = await both_decide(replicas, topic, D.DECISION_TYPE_DENY, started)
        print(f"publish -> both replicas deny: {elapsed * 1000:.1f} ms")
        assert elapsed < 1.0, f"replicas enforced the publish after {elapsed:.3f}s"
        for replica in replicas:
            assert replica.kernel is not None
            assert replica.kernel.snapshot == published.version.snapshot
            assert replica.kernel.snapshots()[0] == published.version.snapshot

        started = time.monotonic()
        rolled = await policy.RollbackPolicy(
            P.RollbackPolicyRequest(version=baseline.version.version, message="thaw"),
            metadata=(("x-principal-id", "oncall"),),
        )
        elapsed = await both_decide(replicas, topic, D.DECISION_TYPE_ALLOW, started)
        print(f"rollback -> both replicas allow: {elapsed * 1000:.1f} ms")
        assert elapsed < 1.0, f"replicas enforced the rollback after {elapsed:.3f}s"
        for replica in replicas:
            assert replica.kernel is not None
            assert replica.kernel.snapshot == baseline.version.snapshot
        assert (published.version.version, rolled.version.version) == (2, 3)

        audit = (await policy.ListPolicyAudit(P.ListPolicyAuditRequest())).entries
        changes = [(e.action, e.version, e.actor_id) for e in audit]
        assert changes[:2] == [("rollback", 3, "oncall"), ("publish", 2, "ops")]
        assert audit[0].snapshot_before == published.version.snapshot
        assert audit[0].snapshot_after == baseline.version.snapshot
        assert list(audit[1].bundle_ids) == [f"secops/freeze-{prefix}"]
        assert f'+    match: {{topics: ["job.replica.{prefix}.*"]}}' in audit[1].diff
        assert f'-    match: {{topics: ["job.replica.{prefix}.*"]}}' in audit[0].diff


def deny_rule(rule_id: str, glob: str) -> str:
    return (
        "rules:\n"
        f"  - id: {rule_id}\n"
        f'    match: {{topics: ["{glob}"]}}\n'
        "    decision: deny\n"
        "    reason: frozen\n"
    )
