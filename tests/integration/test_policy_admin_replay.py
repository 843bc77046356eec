"""Traffic replay: the kernel records the checks it answers (buffered, one pipeline per
flush) and ReplayPolicy re-decides them under a candidate, reporting exactly the decisions
that would change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from cordum.agent.v1 import safety_pb2
from cordum.server.app import App
from cordum.server.services.policy_recorder import DecisionRecorder
from cordum.server.stores.policy import PolicyStore, StoreLimits
from cordum.v1 import policy_pb2, policy_service_pb2, policy_service_pb2_grpc

from support.admin import field_violations, own_app
from support.waiting import eventually

P = policy_service_pb2
D = safety_pb2


def deny(rule_id: str, glob: str) -> str:
    return (
        f'rules:\n  - id: {rule_id}\n    match: {{topics: ["{glob}"]}}\n'
        "    decision: deny\n    reason: candidate says no\n"
    )


@pytest_asyncio.fixture
async def app(nats_url: str, redis_url: str, config_dir: Path) -> AsyncIterator[App]:
    async with own_app(nats_url, redis_url, config_dir, roles=["gateway", "safety"]) as running:
        yield running


async def recorded(app: App) -> int:
    assert app.redis is not None
    return int(await app.redis.llen(f"{app.settings.namespace}policy:decisions"))


async def test_replay_reports_exactly_the_decisions_a_candidate_changes(
    app: App, prefix: str
) -> None:
    assert app.kernel is not None
    kernel = app.kernel
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        policy = policy_service_pb2_grpc.PolicyServiceStub(channel)
        # Published: reads are blocked.
        await policy.PutPolicyBundle(
            P.PutPolicyBundleRequest(
                bundle_id="secops/block-reads", content=deny("block-reads", "job.rp.read.*")
            )
        )
        await policy.PublishPolicy(P.PublishPolicyRequest())

        traffic = {
            "pay-1": "job.rp.pay.card",
            "pay-2": "job.rp.pay.wire",
            "read-1": "job.rp.read.ledger",
            "read-2": "job.rp.read.audit",
            "other-1": "job.rp.other.x",
            "denied-1": "job.t.deny.x",  # the base file denies it; the candidate too
            "approve-1": "job.t.approve.x",
        }
        before = {}
        for job_id, topic in traffic.items():
            request = D.PolicyCheckRequest(job_id=job_id, topic=topic, tenant="default")
            before[job_id] = kernel.check(request).decision  # recorded by the kernel hook
        # EvaluatePolicy is recorded like a check.
        evaluated = await policy.EvaluatePolicy(
            policy_pb2.PolicyCheckInput(job_id="pay-3", topic="job.rp.pay.cash")
        )
        before["pay-3"] = evaluated.decision
        assert before["read-1"] == D.DECISION_TYPE_DENY
        assert before["pay-1"] == D.DECISION_TYPE_ALLOW
        await eventually(lambda: recorded(app), until=lambda n: n == 8, what="8 recorded")

        # Candidate: payments denied, the read block removed.
        replay = await policy.ReplayPolicy(
            P.ReplayPolicyRequest(
                bundles={"secops/block-pay": deny("block-pay", "job.rp.pay.*")},
                remove_bundle_ids=["secops/block-reads"],
                limit=100,
            )
        )
        assert (replay.replayed, replay.unchanged) == (8, 3)
        changes = {c.job_id: c for c in replay.changes}
        assert set(changes) == {"pay-1", "pay-2", "pay-3", "read-1", "read-2"}
        for job_id in ("pay-1", "pay-2", "pay-3"):
            c = changes[job_id]
            assert (c.before, c.after) == (D.DECISION_TYPE_ALLOW, D.DECISION_TYPE_DENY)
            assert (c.before_rule_id, c.after_rule_id) == ("legacy:default:allow:1", "block-pay")
            assert c.after_reason == "candidate says no"
            assert c.topic == traffic.get(job_id, "job.rp.pay.cash")
            assert c.HasField("checked_at")
        for job_id in ("read-1", "read-2"):
            c = changes[job_id]
            assert (c.before, c.after) == (D.DECISION_TYPE_DENY, D.DECISION_TYPE_ALLOW)
            assert (c.before_rule_id, c.after_rule_id) == ("block-reads", "legacy:default:allow:1")
        # Newest first, as recorded.
        assert replay.changes[0].job_id == "pay-3"
        assert replay.candidate_snapshot and replay.candidate_snapshot != kernel.snapshot

        # Nothing was published by the replay (kernel.evaluate is not recorded).
        unchanged = kernel.evaluate(D.PolicyCheckRequest(job_id="x", topic="job.rp.pay.card"))
        assert unchanged.decision == D.DECISION_TYPE_ALLOW

        newest = await policy.ReplayPolicy(
            P.ReplayPolicyRequest(bundles={"secops/block-pay": deny("b", "job.rp.pay.*")}, limit=2)
        )
        assert newest.replayed == 2  # approve-1 (unchanged) and pay-3 (changed)
        assert [c.job_id for c in newest.changes] == ["pay-3"]

        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await policy.ReplayPolicy(
                P.ReplayPolicyRequest(
                    bundles={"secops/bad": "rules: 3", "bad id": "rules: []"},
                    remove_bundle_ids=["//"],
                    limit=10_001,
                )
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(bad.value)) == {
            "bundles[secops/bad].rules",
            "bundles[bad id]",
            "remove_bundle_ids[0]",
            "limit",
        }


async def test_the_recorder_batches_into_one_pipeline_and_the_log_is_bounded(
    redis_url: str, prefix: str
) -> None:
    redis = Redis.from_url(redis_url)
    try:
        store = PolicyStore(redis, prefix=f"rec{prefix}.", limits=StoreLimits(max_decisions=1000))
        recorder = DecisionRecorder(store, flush_interval_s=60, batch_size=500)
        for i in range(1200):
            recorder.record(
                D.PolicyCheckRequest(job_id=f"j{i}", topic="job.a", input_content=b"x" * 100),
                D.PolicyCheckResponse(decision=D.DECISION_TYPE_ALLOW, rule_id="r"),
            )
        assert await store.decision_count() == 0  # nothing written on the record path
        assert await recorder.flush() == 1200
        assert await store.decision_count() == 1000
        newest = await store.recent_decisions(3)
        assert [r.job_id for r in newest] == ["j1199", "j1198", "j1197"]
        assert newest[0].request.input_content == b""  # never stored
        assert (newest[0].decision, newest[0].rule_id) == (D.DECISION_TYPE_ALLOW, "r")
        await recorder.stop()
        await redis.delete(store.decisions_key)
    finally:
        await redis.aclose()
