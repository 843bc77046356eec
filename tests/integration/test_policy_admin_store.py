"""The policy store's bounds and compare-and-set, against the real Redis-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from redis.asyncio import Redis

from cordum.server.stores.policy import PolicyStore, StoreLimits
from cordum.v1 import policy_pb2


@pytest_asyncio.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def audit(action: str, n: int) -> policy_pb2.PolicyAuditEntry:
    return policy_pb2.PolicyAuditEntry(id=f"{action}-{n}", action=action, version=n)


async def test_versions_audit_and_bundles_stay_bounded(redis: Redis, prefix: str) -> None:
    store = PolicyStore(
        redis,
        prefix=f"ps{prefix}.",
        limits=StoreLimits(max_bundles=2, max_versions=3, max_audit=4),
    )
    for n in range(1, 6):
        version = policy_pb2.PolicyVersion(version=n, snapshot=f"base|cfg:{n}")
        assert await store.publish(n - 1, version, audit("publish", n))
    # A publish built on a stale current version loses.
    assert not await store.publish(3, policy_pb2.PolicyVersion(version=4), audit("late", 4))

    assert await store.current_number() == 5
    versions, _ = await store.list_versions(0, 10)
    assert [v.version for v in versions] == [5, 4, 3]
    assert await store.get_version(2) is None
    assert await store.version_for_snapshot("base|cfg:4") == 4
    assert await store.version_for_snapshot("cfg:3") == 3  # the bundles part alone
    assert await store.version_for_snapshot("base|cfg:1") == 0  # trimmed with its version
    entries, _ = await store.list_audit(0, 10)
    assert [e.id for e in entries] == ["publish-5", "publish-4", "publish-3", "publish-2"]

    bundle = policy_pb2.PolicyBundle(id="a", content="rules: []")
    assert await store.write_draft("a", b"", bundle, audit("bundle_put", 0)) == 1
    assert await store.write_draft("a", b"", bundle, audit("bundle_put", 0)) == 0  # stale read
    assert await store.write_draft("b", b"", bundle, audit("bundle_put", 0)) == 1
    assert await store.write_draft("c", b"", bundle, audit("bundle_put", 0)) == -1  # full
    assert await store.draft_ids() == ["a", "b"]
    await redis.delete(*await redis.keys(f"ps{prefix}.*"))
