"""LockService over native gRPC: exclusive and shared locks, re-entry, fencing tokens, TTL
expiry, renew/release errors, waiting, listing, tenancy and bad input."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from cordum.server.app import App
from cordum.server.services.caller import Caller
from cordum.v1 import lock_service_pb2, lock_service_pb2_grpc

from support.admin import error_reason, field_violations, keys_with
from support.waiting import eventually

L = lock_service_pb2


def stub(channel: grpc.aio.Channel) -> lock_service_pb2_grpc.LockServiceStub:
    return lock_service_pb2_grpc.LockServiceStub(channel)


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_exclusive_lock_is_reentrant_and_its_fencing_token_only_grows(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    locks = stub(channel)
    resource = f"db/{prefix}"
    first = await locks.AcquireLock(L.AcquireLockRequest(resource=resource, owner="a"))
    assert (first.resource, first.mode, dict(first.owners)) == (resource, "exclusive", {"a": 1})
    assert first.fencing_token > 0
    # Default TTL: 30 s.
    lifetime = first.expires_at.ToMilliseconds() - first.updated_at.ToMilliseconds()
    assert 29_000 <= lifetime <= 30_000

    again = await locks.AcquireLock(L.AcquireLockRequest(resource=resource, owner="a"))
    assert dict(again.owners) == {"a": 2}
    assert again.fencing_token == first.fencing_token  # same hold, same token

    held = await failure(locks.AcquireLock(L.AcquireLockRequest(resource=resource, owner="b")))
    assert held.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(held) == "LOCK_HELD"

    # Asking for `shared` while holding it exclusively re-enters the exclusive hold.
    shared = await locks.AcquireLock(
        L.AcquireLockRequest(resource=resource, owner="a", mode="shared")
    )
    assert (shared.mode, dict(shared.owners)) == ("exclusive", {"a": 3})

    for left in (2, 1):
        out = await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="a"))
        assert out.released and dict(out.lock.owners) == {"a": left}
    last = await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="a"))
    assert last.released and not last.HasField("lock")
    gone = await failure(locks.GetLock(L.GetLockRequest(resource=resource)))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(gone) == "LOCK_NOT_FOUND"

    # A new hold after the release gets a larger token, never the old one again.
    second = await locks.AcquireLock(L.AcquireLockRequest(resource=resource, owner="b"))
    assert second.fencing_token > first.fencing_token
    await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="b"))


async def test_fifty_concurrent_contenders_never_share_an_exclusive_lock(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    locks = stub(channel)
    resource = f"hot/{prefix}"
    holders: set[str] = set()
    overlaps: list[set[str]] = []
    tokens: list[int] = []

    async def contender(i: int) -> None:
        owner = f"worker-{i}"
        lock = await locks.AcquireLock(
            L.AcquireLockRequest(resource=resource, owner=owner, ttl_ms=30_000, wait_ms=60_000)
        )
        holders.add(owner)
        if len(holders) > 1:
            overlaps.append(set(holders))
        tokens.append(lock.fencing_token)
        # Some work while holding it: a Redis round trip and a read of the lock itself.
        assert cordum.redis is not None
        await cordum.redis.ping()
        seen = await locks.GetLock(L.GetLockRequest(resource=resource))
        assert dict(seen.owners) == {owner: 1}
        holders.discard(owner)
        await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner=owner))

    await asyncio.gather(*(contender(i) for i in range(50)))
    assert overlaps == []
    assert len(tokens) == 50
    # In the order the holds were granted, every token is larger than the one before.
    assert all(a < b for a, b in itertools.pairwise(tokens))


async def test_shared_and_exclusive_interplay(channel: grpc.aio.Channel, prefix: str) -> None:
    locks = stub(channel)
    resource = f"doc/{prefix}"

    def acquire(owner: str, mode: str) -> object:
        return locks.AcquireLock(L.AcquireLockRequest(resource=resource, owner=owner, mode=mode))

    a = await acquire("a", "shared")
    assert (a.mode, a.fencing_token) == ("shared", 0)
    b = await acquire("b", "SHARED")
    assert dict(b.owners) == {"a": 1, "b": 1}

    writer = await failure(acquire("c", "exclusive"))
    assert error_reason(writer) == "LOCK_HELD"
    # An owner may upgrade only when it is the sole owner.
    upgrade = await failure(acquire("a", "exclusive"))
    assert error_reason(upgrade) == "LOCK_HELD"

    await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="b"))
    upgraded = await acquire("a", "exclusive")
    assert (upgraded.mode, dict(upgraded.owners)) == ("exclusive", {"a": 2})
    assert upgraded.fencing_token > 0
    reader = await failure(acquire("b", "shared"))
    assert error_reason(reader) == "LOCK_HELD"

    for _ in range(2):
        await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="a"))
    c = await acquire("c", "exclusive")
    assert c.fencing_token > upgraded.fencing_token
    await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="c"))


async def test_holds_expire_with_their_ttl_owner_by_owner(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    locks = stub(channel)
    resource = f"ttl/{prefix}"
    short = await locks.AcquireLock(
        L.AcquireLockRequest(resource=resource, owner="a", mode="shared", ttl_ms=300)
    )
    await locks.AcquireLock(
        L.AcquireLockRequest(resource=resource, owner="b", mode="shared", ttl_ms=30_000)
    )

    async def owners() -> dict[str, int]:
        return dict((await locks.GetLock(L.GetLockRequest(resource=resource))).owners)

    # a's hold ends on its own; b's (longer) hold is not cut short by a's TTL.
    assert await eventually(owners, until=lambda o: o == {"b": 1}, what="a expired")
    expired = await failure(locks.RenewLock(L.RenewLockRequest(resource=resource, owner="a")))
    assert error_reason(expired) == "LOCK_NOT_HELD"
    await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="b"))

    solo = f"ttl-solo/{prefix}"
    held = await locks.AcquireLock(L.AcquireLockRequest(resource=solo, owner="a", ttl_ms=200))

    async def present() -> bool:
        try:
            await locks.GetLock(L.GetLockRequest(resource=solo))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return False
        return True

    await eventually(present, until=lambda p: not p, what="the lock expired")
    nxt = await locks.AcquireLock(L.AcquireLockRequest(resource=solo, owner="b"))
    assert nxt.fencing_token > held.fencing_token > short.fencing_token
    await locks.ReleaseLock(L.ReleaseLockRequest(resource=solo, owner="b"))


async def test_renew_and_release_report_the_same_errors(
    channel: grpc.aio.Channel, prefix: str
) -> None:
    locks = stub(channel)
    resource = f"renew/{prefix}"
    held = await locks.AcquireLock(L.AcquireLockRequest(resource=resource, owner="a", ttl_ms=1000))
    renewed = await locks.RenewLock(L.RenewLockRequest(resource=resource, owner="a", ttl_ms=60_000))
    assert renewed.expires_at.ToMilliseconds() > held.expires_at.ToMilliseconds() + 50_000
    assert renewed.fencing_token == held.fencing_token

    # Someone who does not hold it: the same error for renew and release (upstream reported
    # success for such a release, and 404 for the renew).
    for call in (
        locks.RenewLock(L.RenewLockRequest(resource=resource, owner="b")),
        locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="b")),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(error) == "LOCK_NOT_HELD"
    still = await locks.GetLock(L.GetLockRequest(resource=resource))
    assert dict(still.owners) == {"a": 1}

    # Nobody holds it: NOT_FOUND for both.
    await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="a"))
    for call in (
        locks.RenewLock(L.RenewLockRequest(resource=resource, owner="a")),
        locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="a")),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(error) == "LOCK_NOT_FOUND"


async def test_wait_ms_waits_for_the_lock(channel: grpc.aio.Channel, prefix: str) -> None:
    locks = stub(channel)
    resource = f"wait/{prefix}"
    await locks.AcquireLock(L.AcquireLockRequest(resource=resource, owner="a"))
    # Not free within the wait: LOCK_HELD, as without waiting.
    busy = await failure(
        locks.AcquireLock(L.AcquireLockRequest(resource=resource, owner="b", wait_ms=150))
    )
    assert error_reason(busy) == "LOCK_HELD"

    # Free within the wait (a's short hold expires): granted once it is free.
    short = await locks.AcquireLock(
        L.AcquireLockRequest(resource=f"{resource}-short", owner="a", ttl_ms=400)
    )
    got = await locks.AcquireLock(
        L.AcquireLockRequest(resource=f"{resource}-short", owner="b", wait_ms=30_000)
    )
    assert dict(got.owners) == {"b": 1}
    assert got.updated_at.ToMilliseconds() >= short.expires_at.ToMilliseconds()
    assert got.fencing_token > short.fencing_token

    # Freed by a release while several wait: each gets it in turn.
    waiters = [
        asyncio.ensure_future(
            locks.AcquireLock(
                L.AcquireLockRequest(resource=resource, owner=f"w{i}", wait_ms=30_000)
            )
        )
        for i in range(3)
    ]
    await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner="a"))
    for _ in range(3):
        done, _pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            waiters.remove(task)
            winner = next(iter(task.result().owners))
            await locks.ReleaseLock(L.ReleaseLockRequest(resource=resource, owner=winner))
    await locks.ReleaseLock(L.ReleaseLockRequest(resource=f"{resource}-short", owner="b"))


async def test_list_locks_by_prefix_in_pages(channel: grpc.aio.Channel, prefix: str) -> None:
    locks = stub(channel)
    names = [f"list-{prefix}/{i:02d}" for i in range(7)]
    for name in reversed(names):
        await locks.AcquireLock(L.AcquireLockRequest(resource=name, owner="me", ttl_ms=60_000))
    await locks.AcquireLock(L.AcquireLockRequest(resource=f"lisT-{prefix}", owner="me"))
    # An expired lock is not listed.
    await locks.AcquireLock(
        L.AcquireLockRequest(resource=f"list-{prefix}/zz", owner="me", ttl_ms=100)
    )

    async def listed() -> tuple[list[str], int]:
        seen: list[str] = []
        token, pages = "", 0
        while True:
            page = await locks.ListLocks(
                L.ListLocksRequest(prefix=f"list-{prefix}/", page_size=3, page_token=token)
            )
            pages += 1
            seen += [lock.resource for lock in page.locks]
            token = page.next_page_token
            if not token:
                return seen, pages

    _, pages = await eventually(listed, until=lambda r: r[0] == names, what="7 locks")
    assert pages >= 3
    page = await locks.ListLocks(L.ListLocksRequest(prefix=f"list-{prefix}/01"))
    assert [lock.resource for lock in page.locks] == [names[1]]
    assert dict(page.locks[0].owners) == {"me": 1}

    bad = await failure(locks.ListLocks(L.ListLocksRequest(page_size=-1, page_token="%%%")))
    assert set(field_violations(bad)) == {"page_size", "page_token"}
    token = await locks.ListLocks(L.ListLocksRequest(prefix=f"list-{prefix}/", page_size=1))
    other = await failure(
        locks.ListLocks(L.ListLocksRequest(prefix="other/", page_token=token.next_page_token))
    )
    assert set(field_violations(other)) == {"page_token"}
    for name in [*names, f"lisT-{prefix}"]:
        await locks.ReleaseLock(L.ReleaseLockRequest(resource=name, owner="me"))


async def test_bad_input_names_every_field_and_writes_nothing(
    cordum: App, channel: grpc.aio.Channel, prefix: str
) -> None:
    locks = stub(channel)
    error = await failure(
        locks.AcquireLock(
            L.AcquireLockRequest(resource=" ", owner="", mode="weird", ttl_ms=-1, wait_ms=-5)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {"resource", "owner", "mode", "ttl_ms", "wait_ms"}

    error = await failure(
        locks.AcquireLock(
            L.AcquireLockRequest(resource=f"x{prefix}\tz", owner="o" * 300, ttl_ms=10**12)
        )
    )
    assert set(field_violations(error)) == {"resource", "owner", "ttl_ms"}
    for call in (
        locks.RenewLock(L.RenewLockRequest(resource=prefix, owner="", ttl_ms=-1)),
        locks.ReleaseLock(L.ReleaseLockRequest(resource="", owner="")),
        locks.GetLock(L.GetLockRequest(resource="")),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(error)
    assert await keys_with(cordum, prefix) == []


async def test_locks_are_scoped_to_the_tenant(cordum: App, prefix: str) -> None:
    """Another tenant's lock of the same name is a different lock, invisible to others."""
    acme, other = Caller(tenant="acme"), Caller(tenant="other")
    resource = f"shared-name/{prefix}"
    mine = await cordum.locks.acquire(resource, "a", "", 0, 0, acme)
    assert mine.owners.keys() == {"a"}
    with pytest.raises(Exception) as hidden:
        await cordum.locks.get(resource, other)
    assert getattr(hidden.value, "reason_name", "") == "LOCK_NOT_FOUND"
    theirs = await cordum.locks.acquire(resource, "b", "", 0, 0, other)
    assert theirs.fencing_token > mine.fencing_token
    assert [lock.resource for lock in (await cordum.locks.list(resource, 0, "", acme)).locks] == [
        resource
    ]
    with pytest.raises(Exception) as not_mine:
        await cordum.locks.release(resource, "a", other)
    assert getattr(not_mine.value, "reason_name", "") == "LOCK_NOT_HELD"
    assert await cordum.locks.release(resource, "a", acme) is None
    assert await cordum.locks.release(resource, "b", other) is None
